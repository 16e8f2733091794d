"""Peer accelerators driven through their public API (optional extra ``catprune[peers]``).

Today: cache-dit's DBCache (``pip install cache-dit``). cache-dit knows a list of diffusers pipelines; for any other
pipeline whose transformer is an ``SD3Transformer2DModel`` (the embedded shapes model is one) it is driven through
its documented ``BlockAdapter`` with ``ForwardPattern.Pattern_1`` (the pattern of SD3's ``JointTransformerBlock``).
Anything else is reported as skipped with the reason, never silently dropped.
"""

from __future__ import annotations

import contextlib
import io
import logging


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (not installed, or it does not support this model); the message says why."""


@contextlib.contextmanager
def _quiet():
    """cache-dit logs a table per call at INFO level; keep the evaluation's log readable."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if "cache" in name.lower()]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class DBCachePeer:
    """cache-dit's DBCache on a pipeline: `enable` before a generation, `stats` after it, `disable` to undo.

    Example:
        >>> peer = DBCachePeer({"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08})
        >>> peer.settings["Fn_compute_blocks"]
        1
    """

    def __init__(self, settings: dict):
        self.settings = {k: v for k, v in settings.items() if k not in ("library", "cache")}
        self._target = None

    @staticmethod
    def check(pipe) -> None:
        """Raise PeerUnavailable (with the reason) unless cache-dit is installed and can drive ``pipe``."""
        try:
            import cache_dit  # noqa: F401
        except ImportError as exc:
            raise PeerUnavailable(
                f"cache-dit is not installed ({exc}); install the optional extra: pip install 'catprune[peers]'"
            ) from None
        except Exception as exc:  # an installed cache-dit that fails to import (version mismatch, ...)
            raise PeerUnavailable(f"cache-dit failed to import: {type(exc).__name__}: {exc}") from None
        from diffusers import SD3Transformer2DModel

        transformer = getattr(pipe, "transformer", None)
        if not isinstance(transformer, SD3Transformer2DModel):
            raise PeerUnavailable(
                f"catprune drives cache-dit only on SD3Transformer2DModel pipelines (officially supported ones or "
                f"through a BlockAdapter); this pipeline's transformer is {type(transformer).__name__}"
            )

    def enable(self, pipe) -> None:
        """Install DBCache on ``pipe`` (officially supported pipeline, else a BlockAdapter over its blocks)."""
        self.check(pipe)
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern

        config = DBCacheConfig(**self.settings)
        with _quiet():
            try:
                cache_dit.enable_cache(pipe, cache_config=config)
                self._target = pipe
                return
            except (ValueError, AssertionError, TypeError, KeyError, AttributeError):
                pass  # not in cache-dit's list of pipelines: describe the blocks ourselves
            adapter = BlockAdapter(
                pipe=pipe,
                transformer=pipe.transformer,
                blocks=pipe.transformer.transformer_blocks,
                forward_pattern=ForwardPattern.Pattern_1,
            )
            try:
                cache_dit.enable_cache(adapter, cache_config=config)
            except Exception as exc:  # cache-dit raises many types (asserts included) for models it cannot drive
                raise PeerUnavailable(f"cache-dit could not drive {type(pipe).__name__}: {exc}") from None
            self._target = pipe

    def stats(self) -> dict:
        """Steps cached in the last generation (cache-dit's own count) and the blocks computed on them."""
        import cache_dit

        with _quiet():
            summaries = cache_dit.summary(self._target, logging=False)
        cached = sorted({int(s) for st in summaries for s in (st.cached_steps or [])})
        return {
            "cached_steps": cached,
            "computed_blocks_on_cached_steps": self.settings["Fn_compute_blocks"] + self.settings["Bn_compute_blocks"],
        }

    def disable(self) -> None:
        if self._target is None:
            return
        import cache_dit

        with _quiet():
            cache_dit.disable_cache(self._target)
        self._target = None
