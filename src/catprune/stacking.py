"""Stacking CAT Pruning with diffusers' step-level caching (First Block Cache), where the family supports it.

First Block Cache (``diffusers.hooks.FirstBlockCacheConfig``) runs the first transformer block every step and skips
the others when its residual barely changed, reusing their cached residual. In diffusers 0.42.1 it needs three
things, which only Flux has among catprune's families:

- the transformer's blocks in diffusers' ``TransformerBlockRegistry`` (SD3's ``JointTransformerBlock``, PixArt's
  ``BasicTransformerBlock`` and Flux's blocks are registered);
- ``CacheMixin`` on the transformer (``enable_cache`` / ``disable_cache``): Flux has it, ``SD3Transformer2DModel``
  and ``PixArtTransformer2DModel`` do not;
- a pipeline that opens ``transformer.cache_context(...)`` around each call (FBCache keeps its state per context):
  ``FluxPipeline`` does; ``StableDiffusion3Pipeline``, ``PixArtSigmaPipeline`` and catprune's ``ShapesPipeline`` do
  not.

How the two compose: a CAT pruned step runs catprune's own block code, so FBCache acts only on the dense steps
before ``start_step``. One of them must not be skipped: the capture step (``start_step - 1``), whose dense forward
fills CAT's per-block K/V caches through hooks on the blocks' projections; a skipped block would leave its cache
stale. `apply_step_cache` therefore installs a guard (a forward pre-hook on the transformer) that, while CAT
Pruning is applied, makes FBCache compute every block from the capture step on. The guard reads the step index
from the pipeline's scheduler, so the step cache is applied to a pipeline, not a bare transformer.

cache-dit's DBCache (the ``peers`` extra; ``catprune eval`` compares against it) is not driven from here: apply it
with cache-dit's own API; catprune does not depend on cache-dit.

Example:
    >>> from catprune.models.testing import tiny_sd3_transformer
    >>> step_cache_support(tiny_sd3_transformer(), "fbcache")  # doctest: +ELLIPSIS
    'SD3Transformer2DModel has no CacheMixin ...'
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch

from . import api
from .config import Context

KINDS = ("fbcache",)
_LEADER_HOOK = "fbc_leader_block_hook"  # the name diffusers 0.42 registers FBCache's first-block hook under
_GUARD = "_catprune_step_cache_guard"  # the (pre, post) hook handles of the capture guard, on the transformer


def _parts(obj) -> tuple[torch.nn.Module, object]:
    if isinstance(obj, torch.nn.Module):
        return obj, None
    if isinstance(getattr(obj, "transformer", None), torch.nn.Module):
        return obj.transformer, obj
    raise TypeError(
        f"catprune.stacking: pipe_or_transformer: expected a diffusers pipeline with a .transformer, got "
        f"{type(obj).__name__}. Pass e.g. a FluxPipeline."
    )


def _opens_cache_context(pipe) -> bool:
    try:
        return "cache_context" in inspect.getsource(type(pipe).__call__)
    except (OSError, TypeError):
        return False


def step_cache_support(pipe_or_transformer, kind: str = "fbcache") -> str | None:
    """None when the step cache ``kind`` can be applied to this pipeline, else why not (one sentence).

    Example:
        >>> step_cache_support(torch.nn.Linear(2, 2), "dbcache")  # doctest: +ELLIPSIS
        "cache-dit's DBCache is not driven by catprune.stacking..."
    """
    if kind == "dbcache":
        return (
            "cache-dit's DBCache is not driven by catprune.stacking: apply it with cache-dit's own enable_cache "
            "(optional extra `peers`); catprune has no dependency on cache-dit"
        )
    if kind not in KINDS:
        return f"unknown step cache kind {kind!r}; expected one of {', '.join(KINDS)}"
    model, pipe = _parts(pipe_or_transformer)
    model = getattr(model, "_orig_mod", model)
    name = type(model).__name__
    if not hasattr(model, "enable_cache") or not hasattr(model, "cache_context"):
        return (
            f"{name} has no CacheMixin in this diffusers version (no enable_cache / cache_context), and its "
            "pipelines open no cache_context, which FBCache keeps its state in"
        )
    if pipe is None:
        return (
            f"FBCache on {name} needs the pipeline: its state lives in the cache_context the pipeline opens, and "
            "the capture guard reads the step from the pipeline's scheduler; pass the pipeline"
        )
    if not _opens_cache_context(pipe):
        return f"{type(pipe).__name__} opens no transformer.cache_context around its calls, which FBCache needs"
    return None


def _head_hook(model: torch.nn.Module):
    """FBCache's first-block hook on ``model`` (the first block of its first block list), or None."""
    from diffusers.hooks import HookRegistry

    for child in model.children():
        if isinstance(child, torch.nn.ModuleList) and len(child):
            return HookRegistry.check_if_exists_or_initialize(child[0]).get_hook(_LEADER_HOOK)
    return None


def _install_guard(model: torch.nn.Module, pipe, hook) -> None:
    """While CAT Pruning is applied, FBCache computes every block from the first step whose dense forward fills CAT's
    caches on: the capture step (start_step - 1), or the reference step (start_step - 2) with the context forecast,
    which also captures the previous K/V there."""
    saved = {}

    def before(module, args, kwargs):
        if not api.is_applied(module):
            return None
        step = getattr(getattr(pipe, "scheduler", None), "step_index", None) or 0
        config = api.get_config(module)
        first_capture = config.start_step - (2 if config.context is Context.EXTRAPOLATE else 1)
        if step >= first_capture:
            saved["threshold"] = hook.threshold
            hook.threshold = -math.inf  # every relative change exceeds it: the remaining blocks run
        return None

    def after(module, args, kwargs, output):
        if "threshold" in saved:
            hook.threshold = saved.pop("threshold")
        return None

    handles = (
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True, always_call=True),
    )
    setattr(model, _GUARD, handles)


def apply_step_cache(pipe_or_transformer, kind: str = "fbcache", threshold: float = 0.05):
    """Enable diffusers' First Block Cache on the pipeline's transformer, composable with CAT Pruning in either
    order. Raises NotImplementedError naming why for families diffusers cannot cache (`step_cache_support`).

    ``threshold``: FBCache's relative change of the first block's residual below which the other blocks are
    skipped; higher is faster and drifts further from dense. Undo with `remove_step_cache`.

    Example:
        >>> from catprune.models.testing import tiny_pixart_transformer
        >>> apply_step_cache(tiny_pixart_transformer())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        NotImplementedError: catprune.stacking.apply_step_cache: PixArtTransformer2DModel has no CacheMixin ...
    """
    reason = step_cache_support(pipe_or_transformer, kind)
    if reason is not None:
        raise NotImplementedError(f"catprune.stacking.apply_step_cache: {reason}.")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not (0 < threshold < math.inf):
        raise ValueError(
            f"catprune.stacking.apply_step_cache: threshold: expected a finite number > 0, got {threshold!r}. "
            "Pass e.g. threshold=0.05 (diffusers' default)."
        )
    from diffusers.hooks import FirstBlockCacheConfig

    model, pipe = _parts(pipe_or_transformer)
    model = getattr(model, "_orig_mod", model)
    remove_step_cache(pipe_or_transformer)
    model.enable_cache(FirstBlockCacheConfig(threshold=float(threshold)))
    hook = _head_hook(model)
    if hook is None:
        model.disable_cache()
        raise NotImplementedError(
            f"catprune.stacking.apply_step_cache: FBCache's first-block hook ({_LEADER_HOOK!r}) was not found on "
            f"{type(model).__name__} after enable_cache; this diffusers version is not supported by the guard."
        )
    _install_guard(model, pipe, hook)
    return pipe_or_transformer


def remove_step_cache(pipe_or_transformer):
    """Undo `apply_step_cache` (a no-op when no step cache is enabled). Returns its argument.

    Example:
        >>> from catprune.models.testing import tiny_flux_transformer
        >>> model = tiny_flux_transformer()
        >>> remove_step_cache(model) is model
        True
    """
    model, _ = _parts(pipe_or_transformer)
    model = getattr(model, "_orig_mod", model)
    for handle in model.__dict__.pop(_GUARD, ()):
        handle.remove()
    if getattr(model, "is_cache_enabled", False):
        model.disable_cache()
    return pipe_or_transformer


__all__ = ["KINDS", "apply_step_cache", "remove_step_cache", "step_cache_support"]
