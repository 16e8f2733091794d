"""Low-precision K/V caches (`CATConfig.cache_dtype`): what a capture writes and what a pruned step attends to.

A block's cache is stored as ``(2, B, M, H, hd)`` rows of the storage dtype (image tokens only: the text tail is
this step's and never stored), with a ``(2, B, M, 1, 1)`` float32 scale per token row for 8-bit floats. The storage
is preallocated and written in place, so a graphed pruned step replays over the same memory. At use the block's
keys/values are rebuilt in the compute dtype in a temporary of the attention (as a dense step's attention
materialises its own keys/values), the computed tokens' fresh values and the text written over it: between steps
only the low-precision storage is held, and under a CUDA graph the temporary comes from the graphs' shared pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..algorithm import advance_kv_, bits, dequantize_rows_, quantize_rows, scatter_tokens_
from ..kernels import dequantize_kv_, quantize_scatter_, scatter_rows_

if TYPE_CHECKING:
    from .contract import BufferStore, KVSlot

SCALE = ".scale"  # suffix of a low-precision cache's per-token scales in its block's store


class KVWriter:
    """What a capture hook writes a dense step's image keys / values into when the cache is low-precision (see
    `contract.write_image_kv`): quantises whole (B, M, H, hd) rows into the store's ``name`` (image tokens only)
    and its scales, both allocated by `BufferStore.kv_buffer`."""

    def __init__(self, store: BufferStore, name: str):
        self.store, self.name = store, name

    def write_(self, j: int, values: torch.Tensor) -> None:
        """Row ``j`` (0 keys, 1 values) of the cache <- ``values`` (B, M, H, hd), quantised per token."""
        q, scale = quantize_rows(values, self.store.storage)
        bits(self.store[self.name][j]).copy_(bits(q))  # (B, M, H, hd) of (2, B, M, H, hd)
        if scale is not None:
            self.store[self.name + SCALE][j].copy_(scale)  # (B, M, 1, 1)


def attend_low_precision(slot: KVSlot, idx: torch.Tensor, image, text=None) -> torch.Tensor:
    """`KVSlot.attend_kv` over a low-precision cache: store this step's (B, k, H, hd) image K/V at ``idx`` (B, k)
    (quantised; when forecasting K0 <- K1 there first, bytes copied exactly), then rebuild the (2, B, M [+ T], H, hd)
    keys/values the step attends to in a temporary: the dequantised cache (reuse) or its forecast
    ``K1 + (K1 - K0) r`` (extrapolate), the fresh unrounded values at ``idx`` and the text tail."""
    data, scale = slot.kv, slot.scale  # (2, B, M, H, hd) storage dtype, (2, B, M, 1, 1) float32 or None
    _, b, m, heads, hd = data.shape
    t = text[0].shape[1] if text is not None else 0
    out = torch.empty((2, b, m + t, heads, hd), dtype=slot.compute, device=data.device)
    if slot.forecast is None:
        if scale is None or not quantize_scatter_(data, scale, idx, image):  # one launch per K / V on CUDA
            for j in range(2):
                q, q_scale = quantize_rows(image[j], data.dtype)  # (B, k, H, hd), (B, k, 1, 1) or None
                scatter_tokens_(bits(data[j]), idx, bits(q))
                if scale is not None:
                    scatter_tokens_(scale[j], idx, q_scale)
        dequantize_kv_(out[:, :, :m], data, scale)
    else:
        fresh = [quantize_rows(image[j], data.dtype) for j in range(2)]  # ((B, k, H, hd), (B, k, 1, 1) or None)
        advance_kv_(bits(data), bits(slot.prev), idx, (bits(fresh[0][0]), bits(fresh[1][0])))
        if scale is not None:
            advance_kv_(scale, slot.prev_scale, idx, (fresh[0][1], fresh[1][1]))
        _forecast_(slot, out[:, :, :m])
    for j in range(2):
        scatter_rows_(out[j, :, :m], idx, image[j])  # the computed tokens attend with their fresh values
        if text is not None:
            out[j, :, m:].copy_(text[j])  # (B, T, H, hd)
    return out


def _forecast_(slot: KVSlot, out: torch.Tensor) -> None:
    """``out`` (2, B, M, H, hd) <- ``K1 + (K1 - K0) r`` from the dequantised K1 and K0, one of keys / values at a
    time through one (B, M, H, hd) temporary."""
    k0 = torch.empty(out.shape[1:], dtype=out.dtype, device=out.device)  # (B, M, H, hd)
    weight = (slot.forecast.ratio + 1.0)[:, :, None, None].to(out.dtype)  # (B, M, 1, 1), 1 at the computed tokens
    for j in range(2):
        k1 = dequantize_rows_(out[j], slot.kv[j], slot.scale[j] if slot.scale is not None else None)
        dequantize_rows_(k0, slot.prev[j], slot.prev_scale[j] if slot.prev_scale is not None else None)
        torch.lerp(k0, k1, weight, out=k1)  # k1 + (k1 - k0) r in one pass, as algorithm.extrapolate_
