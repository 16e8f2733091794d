"""Which tokens the next pruned step computes: the `Selection` rules over a generation's state.

The rules themselves are pure functions in `catprune.algorithm.selection`; this module reads the generation's
buffers, dispatches on ``config.selection`` and keeps the per-token drift rates that `Selection.DRIFT` needs.
Everything here runs without host synchronisation (inside the fused step's CUDA graph), except the RANDOM rule's
CPU generator, which is why that rule is never fused.
"""

from __future__ import annotations

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


def choose_tokens(config: CATConfig, gen: Generation) -> torch.Tensor:
    """The next step's ``gen.k`` tokens per selection group, (S, k) int64 sorted ascending."""
    k = gen.k
    current = gen.score_view(gen.outputs)  # (S, M, P)
    policy = config.selection
    if policy is Selection.RANDOM:
        noise = torch.rand(current.shape[1], generator=gen.rng).to(current.device)  # (M,) same for every sample
        return topk_tokens(noise.expand(current.shape[:2]), k)
    if policy is Selection.RAS:
        return topk_tokens(ras_priority(current, gen.age, config.ras_starvation), k)
    if policy is Selection.DRIFT:
        return topk_tokens(drift_priority(gen.rate, gen.age), k)
    # the change-based rules: only they read n_i - n_ref
    delta = current.float() - gen.reference  # (S, M, P)
    score = delta.norm(dim=-1)  # (S, M)
    if policy is Selection.MAGNITUDE:
        return topk_tokens(score, k)
    # CAT, NO_CLUSTERING (one cluster), STALENESS (no magnitude part)
    if policy is Selection.CAT:
        per_cluster = cluster_scores(delta, gen.labels, gen.num_clusters)  # (S, C)
    else:
        per_cluster = score.new_zeros(score.shape[0], 1)  # (S, 1) a single cluster
    share = 0.0 if policy is Selection.STALENESS else config.magnitude_share
    weights = config.cluster_share_weights
    staleness, age, quotas = gen.staleness, gen.age, gen.quotas
    return select_tokens(score, per_cluster, gen.labels, staleness, k, share, weights, age=age, quotas=quotas)


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
