"""Everything the evaluation reads from the catprune runtime while a pipeline runs, behind one small interface.

    with watch(pipe, selections=True) as watched:
        images = pipe(...)
        macs = watched.macs()            # read while the method is still applied
    watched.calls                        # transformer calls of the watched pipeline call(s)
    watched.grid                         # (h, w) image-token grid, or None for an unknown model
    watched.dense_macs_per_call          # analytic MACs of one dense transformer call, or None
    watched.step_selections()            # per call: (B, k) selected token indices per row, None = all computed

Built on catprune's public API only: `catprune.observe` delivers each counted call's `StepRecord` (its kind,
tokens computed, the (B, k) selected indices of a pruned step) while a catprune method is applied, and
`catprune.stats` its MACs; a forward pre-hook counts the calls and reads the model's grid and dense MACs through
its adapter, so dense methods (nothing applied) are charged at the dense cost.

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
        self._records: list = []  # StepRecords delivered by catprune.observe
        self._records_before = 0
        self._observer = api.observe(pipe, self._records.append) if api.is_applied(pipe) else None
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
        if self._observer is None and api.is_applied(self.pipe):  # applied after `watch` began
            self._observer = api.observe(self.pipe, self._records.append)
        self._records_before = len(self._records)
        return None

    def _post(self, module, args, output):
        self.calls += 1
        if self.record_selections:
            new = self._records[self._records_before :]  # the record of this call (none for an auxiliary call)
            self._selections.append(new[-1].selected if new else None)
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
        if self._observer is not None:
            self._observer.remove()
            self._observer = None


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
