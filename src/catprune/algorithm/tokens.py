"""Batched gather / scatter of image tokens with per-sample indices of shape (B, k)."""

from __future__ import annotations

import torch


def _expand_index(idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # idx (B, k) -> (B, k, *x.shape[2:]) without copying
    return idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select tokens per sample: ``out[b, j] = x[b, idx[b, j]]``.

    Args:
        x: (B, M, ...) token tensor.
        idx: (B, k) int64 token indices in ``[0, M)``.

    Returns:
        (B, k, ...) tensor.

    Example:
        >>> x = torch.arange(6.).view(1, 3, 2)
        >>> gather_tokens(x, torch.tensor([[2, 0]])).tolist()
        [[[4.0, 5.0], [0.0, 1.0]]]
    """
    return x.gather(1, _expand_index(idx, x))  # (B, k, ...)


def scatter_tokens_(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """In place: ``dst[b, idx[b, j]] = src[b, j]``; returns ``dst``. Indices within a row must be unique.

    Example:
        >>> dst = torch.zeros(1, 3, 1)
        >>> scatter_tokens_(dst, torch.tensor([[1]]), torch.ones(1, 1, 1)).flatten().tolist()
        [0.0, 1.0, 0.0]
    """
    return dst.scatter_(1, _expand_index(idx, dst), src.to(dst.dtype))  # (B, M, ...)


def token_mask(idx: torch.Tensor, num_tokens: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """(B, M) indicator of the selected tokens.

    Example:
        >>> token_mask(torch.tensor([[0, 2]]), 4).tolist()
        [[True, False, True, False]]
    """
    mask = torch.zeros(idx.shape[0], num_tokens, dtype=dtype, device=idx.device)
    return mask.scatter_(1, idx, torch.ones_like(idx, dtype=dtype))
