"""Low-precision storage of token rows (`CATConfig.cache_dtype`): quantise a (..., N, H, hd) tensor row by row,
dequantise in place. Pure torch."""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP16_MAX = 65504.0  # largest finite float16


def is_scaled(dtype: torch.dtype) -> bool:
    """True for the 8-bit float storages, which keep a scale per row (16-bit ones are plain casts)."""
    return dtype.itemsize == 1


def quantize_rows(x: torch.Tensor, dtype: torch.dtype, channel_dims: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (..., C1, C2) as ``dtype``: returns ``(q, scale)`` with ``x ~= q * scale``.

    8-bit floats: ``scale`` (..., 1, 1) float32 is each row's absmax over the last ``channel_dims`` dims / 448 (a
    row is one token of one sample, so its rounding never depends on other rows); 16-bit floats: a cast (float16
    saturated at its range), ``scale`` None. Rows of zeros stay zeros.

    Example:
        >>> q, s = quantize_rows(torch.tensor([[[1.0, -2.0]], [[0.0, 0.0]]]), torch.float8_e4m3fn)
        >>> (q.float() * s).tolist(), s.flatten().tolist()[1] > 0
        ([[[1.0, -2.0]], [[0.0, 0.0]]], True)
    """
    if not is_scaled(dtype):
        if dtype == torch.float16 and x.dtype != torch.float16:
            return x.clamp(-FP16_MAX, FP16_MAX).to(dtype), None
        return x.to(dtype), None
    dims = tuple(range(-channel_dims, 0))
    scale = x.abs().amax(dim=dims, keepdim=True).float().div_(FP8_MAX)  # (..., 1, 1)
    scale.clamp_(min=torch.finfo(torch.float32).tiny)
    q = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(dtype)
    return q, scale


def dequantize_rows_(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """In place: ``out = q * scale`` (``out = q`` without a scale), in ``out``'s dtype; returns ``out``.

    Example:
        >>> q, s = quantize_rows(torch.tensor([[[4.0, 0.5, 0.3]]]), torch.float8_e4m3fn)
        >>> [round(v, 4) for v in dequantize_rows_(torch.empty(1, 1, 3), q, s).flatten().tolist()]
        [4.0, 0.5, 0.2857]
    """
    out.copy_(q)
    if scale is not None:
        out.mul_(scale)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """An 8-bit float tensor as its uint8 bytes (gather / scatter / copy move them exactly); others unchanged."""
    return t.view(torch.uint8) if t.dtype.itemsize == 1 and t.dtype.is_floating_point else t
