"""Everything the evaluation reads from the catprune runtime while a pipeline runs, behind one small interface.

    with watch(pipe, selections=True) as watched:
        images = pipe(...)
        macs = watched.macs()            # read while the method is still applied
    watched.calls                        # transformer calls of the watched pipeline call(s)
    watched.grid                         # (h, w) image-token grid, or None for an unknown model
    watched.dense_macs_per_call          # analytic MACs of one dense transformer call, or None
    watched.step_selections()            # per call: (B, k) selected token indices per row, None = all computed

This is the only module that knows how the runtime keeps its state today: it hooks the transformer, copies the
runtime's persistent selection buffer (``idx_rows``) before each call, decides from the recorded step that follows
whether the call was pruned, finds the runtime through the private marker on the patched ``forward``, and charges
every call at the dense cost when the runtime recorded nothing (pruning off, a dense method). When catprune offers a
public per-step view of a generation, only this module changes.

Example:
    >>> import torch
    >>> from catprune.models.shapes import build_random_shapes_pipeline
    >>> pipe = build_random_shapes_pipeline(num_layers=1, attention_head_dim=8, num_attention_heads=2)
    >>> with watch(pipe) as watched:
    ...     _ = pipe(["a red circle at the center"], num_inference_steps=2, output_type="pt", height=32, width=32)
    ...     macs = watched.macs()
    >>> watched.calls, watched.step_selections(), macs == 2 * watched.dense_macs_per_call
    (2, [None, None], True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .. import api

_RUNTIME_MARKER = "__catprune_runtime__"  # set by catprune.api.apply on the patched forward


def _runtime(transformer: torch.nn.Module):
    """The catprune runtime applied to ``transformer``, or None."""
    return getattr(transformer.__dict__.get("forward"), _RUNTIME_MARKER, None)


class Watched:
    """What `watch` observed; see the module docstring for the attributes."""

    def __init__(self, pipe, selections: bool):
        self.pipe = pipe
        self.transformer: torch.nn.Module = pipe.transformer
        self.record_selections = selections
        self.calls = 0
        self.grid: tuple[int, int] | None = None
        self.dense_macs_per_call: int | None = None
        self._selections: list[torch.Tensor | None] = []
        self._pending = None
        self._handles = [
            self.transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.transformer.register_forward_hook(self._post),
        ]

    def _pre(self, module, args, kwargs):
        if self.dense_macs_per_call is None:
            with contextlib.suppress(Exception):  # MACs are informative; an unknown model just has none
                from ..adapters import adapter_for

                adapter = adapter_for(module)
                info = adapter.inspect_call(args, kwargs)
                self.dense_macs_per_call = int(adapter.macs(info, info.num_tokens))
                self.grid = tuple(info.grid)
        runtime = _runtime(module)
        self._pending = None
        if self.record_selections and runtime is not None:
            idx = runtime.idx_rows
            # idx_rows is a persistent buffer that the step overwrites in place with the next selection: copy it
            self._pending = (runtime.stats, len(runtime.stats.steps), idx.clone() if idx is not None else None)
        return None

    def _post(self, module, args, output):
        self.calls += 1
        if not self.record_selections:
            return None
        runtime = _runtime(module)
        selected = None
        if runtime is not None and self._pending is not None:
            stats_before, len_before, idx_before = self._pending
            recorded = runtime.stats is not stats_before or len(runtime.stats.steps) > len_before
            if recorded and runtime.stats.steps and runtime.stats.steps[-1].phase == "pruned":
                selected = idx_before
        self._selections.append(selected)
        return None

    def step_selections(self) -> list[torch.Tensor | None]:
        """Per watched transformer call: the (B, k) image-token indices each batch row computed, or None when the
        call computed every token (dense and capture steps). Empty unless watched with ``selections=True``."""
        return list(self._selections)

    def macs(self) -> int | None:
        """Analytic MACs of the watched calls: catprune's per-step records while a catprune method is applied and
        recorded its steps, else every call at the dense cost (None for a model without a MACs model). Read it
        before the method is removed."""
        if api.is_applied(self.pipe):
            stats = api.stats(self.pipe)
            if stats.steps:
                return int(stats.macs)
        return None if self.dense_macs_per_call is None else self.dense_macs_per_call * self.calls

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextlib.contextmanager
def watch(pipe, selections: bool = True) -> Iterator[Watched]:
    """Observe the transformer calls of ``pipe`` inside the ``with`` block (hooks removed on exit).

    Args:
        pipe: a diffusers pipeline with a ``transformer``.
        selections: record which tokens each call computed (`Watched.step_selections`); costs one small copy of
            the selection per call while a catprune method is applied.
    """
    watched = Watched(pipe, selections)
    try:
        yield watched
    finally:
        watched.close()


def selection_counts(selections: list[torch.Tensor | None], n_images: int, num_tokens: int) -> torch.Tensor:
    """How many of the calls computed each image token, per image: (n_images, num_tokens) int32.

    The images' own rows are the last ``n_images`` rows of a selection (under classifier-free guidance the
    unconditional rows come first); a call without a selection (None) computed every token.

    Example:
        >>> sel = [None, torch.tensor([[0, 1], [2, 3]])]
        >>> selection_counts(sel, n_images=1, num_tokens=4).tolist()
        [[1, 1, 2, 2]]
    """
    counts = torch.zeros(n_images, num_tokens, dtype=torch.int32)
    for selected in selections:
        if selected is None:
            counts += 1
        else:
            rows = selected[-n_images:].to("cpu", torch.long)  # (n, k)
            counts.scatter_add_(1, rows, torch.ones_like(rows, dtype=torch.int32))
    return counts  # (n, M)


__all__ = ["Watched", "selection_counts", "watch"]
