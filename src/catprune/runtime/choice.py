"""Which tokens the next pruned step computes: the `Selection` rules over a generation's state.

The rules themselves are pure functions in `catprune.algorithm.selection`; this module reads the generation's
buffers, dispatches on ``config.selection`` and keeps the per-token drift rates that `Selection.DRIFT` needs.
Everything here runs without host synchronisation (inside the fused step's CUDA graph), except the RANDOM rule's
CPU generator, which is why that rule is never fused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..algorithm import (
    cluster_scores,
    drift_priority,
    ras_priority,
    select_tokens,
    token_change,
    topk_tokens,
    update_rate,
)
from ..config import CATConfig, Selection
from .generation import Generation


def choose_tokens(config: CATConfig, gen: Generation, select: Callable[..., torch.Tensor] | None) -> torch.Tensor:
    """The next step's ``gen.k`` tokens per selection group, (S, k) int64 sorted ascending. ``select``: the
    rule's `selection_fn` for ``gen.k`` (as the runner built it, e.g. compiled); None for `Selection.RANDOM`, which
    draws from the generation's CPU generator here instead."""
    if config.selection is Selection.RANDOM:
        m, device = gen.outputs.shape[1], gen.outputs.device
        noise = torch.rand(m, generator=gen.rng).to(device)  # (M,) same for every sample
        return topk_tokens(noise.expand(gen.staleness.shape), gen.k)
    return select(**selection_inputs(gen))


def selection_inputs(gen: Generation) -> dict[str, torch.Tensor | None]:
    """The tensors a `selection_fn` reads, by name, from the generation's buffers."""
    return dict(
        outputs=gen.outputs, score_rows=gen.score_rows, reference=gen.reference, labels=gen.labels,
        staleness=gen.staleness, age=gen.age, quotas=gen.quotas, rate=gen.rate,
    )  # fmt: skip


def selection_fn(config: CATConfig, k: int, num_clusters: int) -> Callable[..., torch.Tensor]:
    """The selection rule of ``config`` (any but `Selection.RANDOM`) for ``k`` tokens as a function of tensors
    only (`selection_inputs`): what the runner compiles on the compile backends (about 80 small kernels in eager,
    most of them elementwise, gathers and scatters that inductor fuses around the sorts).

    Example:
        >>> import catprune
        >>> select = selection_fn(catprune.CATConfig(selection="magnitude"), 1, 1)
        >>> outputs, reference = torch.tensor([[[0.0], [3.0]]]), torch.zeros(1, 2, 1)
        >>> select(outputs, None, reference, None, None, None, None, None).tolist()
        [[1]]
    """
    policy = config.selection
    if policy is Selection.RANDOM:
        raise ValueError("selection_fn: Selection.RANDOM draws from a CPU generator; use choose_tokens.")
    share = 0.0 if policy is Selection.STALENESS else config.magnitude_share
    weights, starvation = config.cluster_share_weights, config.ras_starvation

    def select(outputs, score_rows, reference, labels, staleness, age, quotas, rate) -> torch.Tensor:
        current = outputs if score_rows is None else outputs[score_rows]  # (S, M, P) the rows that score
        if policy is Selection.RAS:
            return topk_tokens(ras_priority(current, age, starvation), k)
        if policy is Selection.DRIFT:
            return topk_tokens(drift_priority(rate, age), k)
        # the change-based rules: only they read n_i - n_ref
        delta = current.float() - reference  # (S, M, P)
        score = delta.norm(dim=-1)  # (S, M)
        if policy is Selection.MAGNITUDE:
            return topk_tokens(score, k)
        # CAT, NO_CLUSTERING (one cluster), STALENESS (no magnitude part)
        if policy is Selection.CAT:
            per_cluster = cluster_scores(delta, labels, num_clusters)  # (S, C)
        else:
            per_cluster = score.new_zeros(score.shape[0], 1)  # (S, 1) a single cluster
        return select_tokens(score, per_cluster, labels, staleness, k, share, weights, age=age, quotas=quotas)

    return select


def start_rates(gen: Generation) -> None:
    """At the capture step: every token's drift rate is its change over the one step since the reference output
    (taken at ``start_step - 2``). A no-op unless the generation keeps rates (`Selection.DRIFT`)."""
    if gen.rate is not None:
        gen.rate.copy_(token_change(gen.score_view(gen.outputs), gen.reference))  # (S, M)


def note_computed(gen: Generation, idx: torch.Tensor, fresh: torch.Tensor) -> None:
    """Before a step's fresh outputs replace the stored ones: update the drift rates of the computed tokens.

    Args:
        idx: (S, k) tokens the step computed, per selection group.
        fresh: (B, k, P) their fresh outputs, per batch row (the rows of ``gen.idx_rows``).
    A no-op unless the generation keeps rates (`Selection.DRIFT`); call it before ``gen.age`` is updated.
    """
    if gen.rate is None:
        return
    p = fresh.shape[-1]
    old = gen.score_view(gen.outputs).gather(1, idx.unsqueeze(-1).expand(-1, -1, p))  # (S, k, P)
    gen.rate.copy_(update_rate(gen.rate, idx, old, gen.score_view(fresh), gen.age))


def note_all_computed(gen: Generation, fresh: torch.Tensor) -> None:
    """`note_computed` for a step that computed every token (a refresh step); ``fresh`` is (B, M, P)."""
    if gen.rate is None:
        return
    every = torch.arange(fresh.shape[1], device=fresh.device).expand(gen.rate.shape)  # (S, M)
    note_computed(gen, every, fresh)
