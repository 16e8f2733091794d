"""Batched gather / scatter of image tokens with per-sample indices of shape (B, k)."""

from __future__ import annotations

import torch


def _expand_index(idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # idx (B, k) -> (B, k, *x.shape[2:]) without copying
    return idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])


def as_words(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The same memory viewed as 64-bit words along the last dim (a 16-bit row of 64 channels becomes 16 words), for
    every tensor or for none: None when one of them cannot be viewed so (a strided last dim, a size or an offset not
    a multiple of the word). Copies and scatters over words move the same bytes with a quarter of the elements (on a
    GPU: one 8-byte move per thread instead of four 2-byte ones).

    Example:
        >>> x = torch.zeros(2, 3, 8, dtype=torch.bfloat16)
        >>> as_words(x)[0].shape, as_words(x[..., 1:]) is None
        (torch.Size([2, 3, 2]), True)
    """
    out = []
    for t in tensors:
        size = t.element_size()
        ratio = 8 // size if size < 8 and not t.dtype.is_complex and t.dtype is not torch.bool else 0
        if t.dim() == 0 or not ratio or t.stride(-1) != 1 or t.shape[-1] % ratio or t.storage_offset() % ratio:
            return None
        if any(stride % ratio for stride in t.stride()[:-1]):
            return None
        out.append(t.view(torch.int64))
    return tuple(out)


def copy_tokens_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for tensors of the same shape and dtype, as 64-bit words where both allow it.

    Example:
        >>> dst = torch.zeros(1, 2, 4, dtype=torch.float16)
        >>> copy_tokens_(dst, torch.ones(1, 2, 4, dtype=torch.float16)).sum().item()
        8.0
    """
    words = as_words(dst, src) if dst.dtype == src.dtype else None
    if words is None:
        return dst.copy_(src)
    words[0].copy_(words[1])
    return dst


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
    src = src.to(dst.dtype)
    words = as_words(dst, src) if dst.dim() > 2 else None  # (B, M, ..., C) as 64-bit words: the same bytes moved
    if words is not None:
        words[0].scatter_(1, _expand_index(idx, words[0]), words[1])
        return dst
    return dst.scatter_(1, _expand_index(idx, dst), src)  # (B, M, ...)


def token_mask(idx: torch.Tensor, num_tokens: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """(B, M) indicator of the selected tokens.

    Example:
        >>> token_mask(torch.tensor([[0, 2]]), 4).tolist()
        [[True, False, True, False]]
    """
    mask = torch.zeros(idx.shape[0], num_tokens, dtype=dtype, device=idx.device)
    return mask.scatter_(1, idx, torch.ones_like(idx, dtype=dtype))
