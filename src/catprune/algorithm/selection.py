"""Scoring and cluster-aware selection of exactly k tokens per sample (docs/method.md, step 4).

All functions are batched over S independent samples, use static shapes (exactly k tokens out) and never
synchronise with the host, so they can run inside a CUDA graph.
"""

from __future__ import annotations

import torch


def token_change(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-token change score ``||n(j) - n_ref(j)||_2``.

    Args:
        output: (S, M, P) current per-token output n_i.
        reference: (S, M, P) reference output n_ref.

    Returns:
        (S, M) float32 scores.

    Example:
        >>> token_change(torch.tensor([[[3.0, 4.0]]]), torch.zeros(1, 1, 2)).tolist()
        [[5.0]]
    """
    return (output.float() - reference.float()).norm(dim=-1)  # (S, M)


def cluster_scores(delta: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Cluster change score: L2 norm over channels of the channel-wise max of ``|delta|`` over the cluster's tokens.

    Why the absolute value: a signed max would ignore tokens that moved strongly in the negative direction; the
    paper's "channel-wise max of delta" is read as the largest movement per channel. Empty clusters score 0.

    Args:
        delta: (S, M, P) ``n_i - n_ref``.
        labels: (S, M) int64 cluster labels in [0, C).
        num_clusters: C.

    Returns:
        (S, C) float32 scores.

    Example:
        >>> delta = torch.tensor([[[1.0, 0.0], [0.0, -2.0], [5.0, 5.0]]])
        >>> cluster_scores(delta, torch.tensor([[0, 0, 1]]), 2).tolist()  # cluster 0: max|.| = (1, 2)
        [[2.2360680103302, 7.071067810058594]]
    """
    s, _, p = delta.shape
    pooled = delta.new_zeros(s, num_clusters, p, dtype=torch.float32)
    index = labels.unsqueeze(-1).expand(-1, -1, p)  # (S, M, P)
    pooled.scatter_reduce_(1, index, delta.float().abs(), reduce="amax", include_self=True)  # (S, C, P)
    return pooled.norm(dim=-1)  # (S, C)


def update_age(age: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Steps since each token was last computed: 0 for the selected tokens, +1 for the others.

    Example:
        >>> update_age(torch.tensor([[0, 3, 1]]), torch.tensor([[1]])).tolist()
        [[1, 0, 2]]
    """
    return (age + 1).scatter_(1, idx, 0)


def update_staleness(staleness: torch.Tensor, idx: torch.Tensor, decay: float) -> torch.Tensor:
    """``f <- decay * f + 1[selected]`` (returns a new tensor). Low f means stale.

    Args:
        staleness: (S, M) float32 counters.
        idx: (S, k) selected token indices.
        decay: gamma in [0, 1).

    Example:
        >>> update_staleness(torch.tensor([[1.0, 0.0, 0.5]]), torch.tensor([[1]]), 0.5).tolist()
        [[0.5, 1.0, 0.25]]
    """
    selected = torch.zeros_like(staleness).scatter_(1, idx, 1.0)  # (S, M)
    return staleness * decay + selected


def cluster_quotas(budget: int, num_clusters: int, weights: tuple[float, ...]) -> list[int]:
    """Split ``budget`` tokens over clusters ranked by change: rank r gets ``weights[min(r, len-1)]`` parts.

    Floors the shares, then hands the remainder one by one to the top ranks, so the quotas sum to ``budget``.

    Example:
        >>> cluster_quotas(10, 4, (3, 2, 1))  # parts 3:2:1:1 of 10 -> 4.3, 2.9, 1.4, 1.4
        [5, 3, 1, 1]
    """
    parts = [weights[min(r, len(weights) - 1)] for r in range(num_clusters)]
    total = sum(parts)
    quotas = [int(budget * p // total) for p in parts]
    for r in range(budget - sum(quotas)):
        quotas[r % num_clusters] += 1
    return quotas


def _rank_within_cluster(labels: torch.Tensor, order: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Rank of every token inside its cluster, given a global priority ``order`` (S, M) (best first)."""
    grouped = labels.gather(1, order).sort(dim=1, stable=True).indices  # (S, M) stable: keeps priority per cluster
    by_cluster = order.gather(1, grouped)  # (S, M) tokens grouped by cluster, best first within each
    counts = torch.zeros(labels.shape[0], num_clusters, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))  # (S, C) no one_hot: it syncs on CUDA
    starts = counts.cumsum(1) - counts  # (S, C)
    position = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)  # (S, M)
    rank_sorted = position - starts.gather(1, labels.gather(1, by_cluster))  # (S, M)
    return torch.empty_like(rank_sorted).scatter_(1, by_cluster, rank_sorted)  # (S, M) back in token order


def _magnitude_part(cluster_score, labels, staleness, quotas, by_score, by_age) -> torch.Tensor:
    """(S, M) bool: the magnitude part of `select_tokens`: per cluster, by its rank's quota, half (rounded up) of
    the largest-score tokens and the rest of its stalest remaining tokens."""
    s, num_clusters = cluster_score.shape
    device = cluster_score.device
    cluster_order = cluster_score.float().sort(dim=1, descending=True, stable=True).indices  # (S, C)
    rank_of_cluster = torch.empty_like(cluster_order).scatter_(
        1, cluster_order, torch.arange(num_clusters, device=device).expand(s, -1)
    )  # (S, C)
    quota = quotas[rank_of_cluster]  # (S, C)
    quota_score = (quota + 1) // 2  # (S, C) largest-score share (rounded up)
    quota_stale = quota - quota_score  # (S, C)

    rank_score = _rank_within_cluster(labels, by_score, num_clusters)  # (S, M)
    chosen = rank_score < quota_score.gather(1, labels)  # (S, M)

    # stalest remaining tokens of each cluster; chosen tokens sort last (+inf), ties by score
    stale_key = torch.where(chosen, torch.inf, staleness.float()).gather(1, by_age)  # (S, M) in by_age order
    by_stale = by_age.gather(1, stale_key.sort(dim=1, stable=True).indices)  # (S, M)
    rank_stale = _rank_within_cluster(labels, by_stale, num_clusters)  # (S, M)
    return chosen | (rank_stale < quota_stale.gather(1, labels))  # (S, M)


def select_tokens(
    score: torch.Tensor,
    cluster_score: torch.Tensor,
    labels: torch.Tensor,
    staleness: torch.Tensor,
    k: int,
    magnitude_share: float,
    share_weights: tuple[float, ...] = (3.0, 2.0, 1.0),
    age: torch.Tensor | None = None,
    quotas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cluster-aware selection of exactly k tokens per sample.

    1. Magnitude part, ``m = round(magnitude_share * k)`` tokens: clusters are ranked by ``cluster_score`` and get
       quotas by rank (`cluster_quotas`); inside a cluster, half of its quota (rounded up) goes to its largest-score
       tokens and the rest to its stalest remaining tokens. A cluster smaller than its quota gives what it has.
    2. Staleness part: the rest, up to exactly k, are the stalest (lowest f) tokens not yet chosen.
    Ties in staleness are broken by larger ``age`` (steps since the token was last computed) when given, then by
    larger score, then by lower index. With all-zero staleness (the first selection) this reduces to "the
    largest-score tokens, cluster-aware", as docs/method.md step 2 asks.

    Why ``age``: f alone cannot order tokens once ``decay**age`` is 0 (decay 0, or long runs in float32), and then
    ties would go to the largest scores and starve low-score tokens. Breaking ties by age keeps a refresh guarantee
    for every decay (docs/design.md decision 6, checked by a property test): every token is recomputed at least once
    in every ``ceil(M / s) + L + 1`` steps, with ``s = k - m`` staleness picks per step and
    ``L = ceil(log(1 - decay) / log(decay))`` (1 for decay 0).

    Args:
        score: (S, M) per-token change score.
        cluster_score: (S, C) per-cluster change score.
        labels: (S, M) int64 cluster labels.
        staleness: (S, M) counters f (low = stale).
        k: tokens to select, 1 <= k <= M.
        magnitude_share: rho in [0, 1].
        share_weights: quota parts by cluster rank.
        age: optional (S, M) steps since each token was last computed (tie-break of staleness).
        quotas: optional precomputed ``cluster_quotas(round(magnitude_share * k), C, share_weights)`` as a device
            tensor; pass it to avoid a host-to-device copy (required inside CUDA-graph capture).

    Returns:
        (S, k) int64 unique token indices per row, sorted ascending.

    Example:
        >>> score = torch.tensor([[0.0, 9.0, 1.0, 0.0]])
        >>> labels = torch.tensor([[0, 0, 1, 1]])
        >>> # quotas 3:2 of k=3 by cluster rank -> 2 tokens from cluster 0, 1 from cluster 1
        >>> select_tokens(score, torch.tensor([[9.0, 1.0]]), labels, torch.zeros(1, 4), 3, 1.0).tolist()
        [[0, 1, 2]]
    """
    s, m = score.shape
    num_clusters = cluster_score.shape[1]
    device = score.device
    budget = round(magnitude_share * k)
    score = score.float()

    by_score = score.sort(dim=1, descending=True, stable=True).indices  # (S, M) best score first
    by_age = by_score  # (S, M) tie-break order for staleness: oldest first, then best score
    if age is not None:
        by_age = by_score.gather(1, age.gather(1, by_score).sort(dim=1, descending=True, stable=True).indices)
    chosen = torch.zeros(s, m, dtype=torch.bool, device=device)
    if budget > 0:
        if quotas is None:
            quotas = torch.tensor(cluster_quotas(budget, num_clusters, share_weights), device=device)  # (C,) by rank
        chosen = _magnitude_part(cluster_score, labels, staleness, quotas, by_score, by_age)  # (S, M)

    # fill up to exactly k: chosen first, then stalest, ties by age and score (kept by the stable sort)
    fill_key = torch.where(chosen, -torch.inf, staleness.float()).gather(1, by_age)  # (S, M)
    final = by_age.gather(1, fill_key.sort(dim=1, stable=True).indices)  # (S, M)
    return final[:, :k].sort(dim=1).values  # (S, k)


def topk_tokens(priority: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-priority tokens per row, sorted ascending (ties to the lower index).

    Example:
        >>> topk_tokens(torch.tensor([[0.1, 0.9, 0.5, 0.9]]), 2).tolist()
        [[1, 3]]
    """
    order = priority.float().sort(dim=1, descending=True, stable=True).indices  # (S, M)
    return order[:, :k].sort(dim=1).values  # (S, k)


def ras_priority(output: torch.Tensor, age: torch.Tensor, starvation: float) -> torch.Tensor:
    """Region-adaptive priority in the manner of RAS: the spread (std over channels) of each token's current
    output, boosted by ``exp(starvation * age)`` so tokens left out for long come back.

    Args:
        output: (S, M, P) latest per-token output.
        age: (S, M) steps since each token was last computed.

    Example:
        >>> out = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])
        >>> ras_priority(out, torch.tensor([[0, 0]]), 0.1).tolist()
        [[1.4142135381698608, 0.0]]
    """
    return output.float().std(dim=-1) * torch.exp(starvation * age.float())  # (S, M)


def update_rate(rate: torch.Tensor, idx: torch.Tensor, old: torch.Tensor, new: torch.Tensor, age: torch.Tensor):
    """Per-token drift rate after a step that computed the tokens ``idx``: ``||new - old|| / (age + 1)`` there
    (the output's change between its last two computations, per step between them), unchanged elsewhere.
    Returns a new tensor.

    Args:
        rate: (S, M) float32 drift rates.
        idx: (S, k) tokens computed by the step.
        old: (S, k, P) their outputs before the step (from their last computation).
        new: (S, k, P) their fresh outputs.
        age: (S, M) steps since each token was last computed, before this step's update (`update_age`).

    Example:
        >>> rate, age = torch.zeros(1, 3), torch.tensor([[0, 1, 0]])
        >>> update_rate(rate, torch.tensor([[1]]), torch.zeros(1, 1, 2), torch.tensor([[[3.0, 4.0]]]), age).tolist()
        [[0.0, 2.5, 0.0]]
    """
    gap = age.gather(1, idx).float() + 1.0  # (S, k) steps between the two computations
    return rate.scatter(1, idx, (new.float() - old.float()).norm(dim=-1) / gap)  # (S, M)


def drift_priority(rate: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """Predicted drift of every token's reused output at the next step: ``rate * (age + 1)`` (its drift rate per
    step times the steps since its last computation, counting the next one). `Selection.DRIFT` recomputes the k
    largest.

    Example:
        >>> drift_priority(torch.tensor([[1.0, 0.5, 2.0]]), torch.tensor([[0, 3, 0]])).tolist()
        [[1.0, 2.0, 2.0]]
    """
    return rate.float() * (age.float() + 1.0)  # (S, M)
