"""Batched, deterministic k-means over per-token features (pure torch, no host synchronisation)."""

from __future__ import annotations

import torch


def grid_positions(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised (row / h, col / w) position of every token of an ``h x w`` grid in row-major order.

    Returns:
        (h * w, 2) tensor with values in [0, 1).

    Example:
        >>> grid_positions(2, 2).tolist()
        [[0.0, 0.0], [0.0, 0.5], [0.5, 0.0], [0.5, 0.5]]
    """
    rows = torch.arange(height, device=device, dtype=dtype) / height
    cols = torch.arange(width, device=device, dtype=dtype) / width
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(height * width, 2)


def cluster_features(output: torch.Tensor, grid_hw: tuple[int, int], weight: float) -> torch.Tensor:
    """Clustering features: ``weight * output`` next to the normalised grid position (docs/method.md, step 2).

    Args:
        output: (S, M, P) per-token model output, M = h * w in row-major order.
        grid_hw: (h, w) of the token grid.
        weight: w, weight of the output against position.

    Returns:
        (S, M, P + 2) float32 features.
    """
    s, m, _ = output.shape
    pos = grid_positions(*grid_hw, device=output.device).expand(s, m, 2)  # (S, M, 2)
    return torch.cat([weight * output.float(), pos], dim=-1)  # (S, M, P + 2)


def _sq_dist(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, clamped at 0 against rounding
    d = (x * x).sum(-1, keepdim=True) - 2 * torch.bmm(x, centroids.transpose(1, 2))  # (S, M, C)
    return (d + (centroids * centroids).sum(-1).unsqueeze(1)).clamp_min_(0)  # (S, M, C)


def kmeans_init_uniforms(num_clusters: int, seed: int) -> torch.Tensor:
    """The random numbers of the k-means++ initialisation: (C,) uniforms drawn on the CPU from ``seed``."""
    return torch.rand(num_clusters, generator=torch.Generator(device="cpu").manual_seed(seed))


def kmeans(
    x: torch.Tensor, num_clusters: int, iters: int = 10, seed: int = 0, uniforms: torch.Tensor | None = None
) -> torch.Tensor:
    """Cluster the tokens of every sample independently with k-means (k-means++ init, ``iters`` Lloyd steps).

    Deterministic for a given ``seed``, and the same for a sample whatever its position in the batch: the
    random numbers of the k-means++ initialisation are drawn once from ``seed`` and shared by every sample.
    The iteration count is fixed, so the cost is static and there is no data-dependent host synchronisation.
    Empty clusters keep their previous centroid.

    Args:
        x: (S, M, F) features.
        num_clusters: C, 1 <= C <= M.
        iters: Lloyd iterations.
        seed: seed of the initialisation.
        uniforms: optional precomputed ``kmeans_init_uniforms(C, seed)`` already on ``x``'s device (no host copy:
            needed inside CUDA-graph capture).

    Returns:
        (S, M) int64 labels in [0, C).

    Example:
        >>> x = torch.tensor([[[0.0], [0.1], [5.0], [5.1]]])
        >>> labels = kmeans(x, 2)
        >>> bool(labels[0, 0] == labels[0, 1]) and bool(labels[0, 2] == labels[0, 3]) and bool(labels[0, 0] != labels[0, 2])
        True
    """
    s, m, f = x.shape
    if not 1 <= num_clusters <= m:
        raise ValueError(f"kmeans: num_clusters must be in [1, {m}] (the number of tokens), got {num_clusters}.")
    x = x.float()
    u = kmeans_init_uniforms(num_clusters, seed).to(x.device) if uniforms is None else uniforms  # (C,) every sample
    rows = torch.arange(s, device=x.device)

    # k-means++: first centre uniform, then proportional to the squared distance to the nearest centre
    first = (u[0] * m).long().clamp_(max=m - 1).expand(s)  # (S,)
    centroids = x.new_empty(s, num_clusters, f)
    centroids[:, 0] = x[rows, first]
    nearest = ((x - centroids[:, :1]) ** 2).sum(-1)  # (S, M)
    for c in range(1, num_clusters):
        cdf = nearest.cumsum(-1)  # (S, M)
        total = cdf[:, -1:]
        target = u[c] * total  # (S, 1)
        pick = torch.searchsorted(cdf, target).squeeze(1).clamp_(max=m - 1)  # (S,)
        # all-zero distances (duplicate points): fall back to a uniform pick
        pick = torch.where(total.squeeze(1) > 0, pick, (u[c] * m).long().clamp(max=m - 1))
        centroids[:, c] = x[rows, pick]
        nearest = torch.minimum(nearest, ((x - centroids[:, c : c + 1]) ** 2).sum(-1))

    labels = _sq_dist(x, centroids).argmin(-1)  # (S, M)
    for _ in range(iters):
        # scatter_add instead of one_hot (one_hot validates its input with a host sync on CUDA)
        counts = x.new_zeros(s, num_clusters).scatter_add_(1, labels, x.new_ones(s, m))  # (S, C)
        sums = x.new_zeros(s, num_clusters, f).scatter_add_(1, labels.unsqueeze(-1).expand(-1, -1, f), x)  # (S, C, F)
        new = sums / counts.clamp_min(1).unsqueeze(-1)
        centroids = torch.where(counts.unsqueeze(-1) > 0, new, centroids)  # (S, C, F)
        labels = _sq_dist(x, centroids).argmin(-1)  # (S, M)
    return labels
