"""Low-precision K/V caches (`CATConfig.cache_dtype`): what a capture writes and what a pruned step attends to.

A block's cache is stored as ``(2, B, M, H, hd)`` rows of the storage dtype (image tokens only: the text tail is
this step's and never stored), with a ``(2, B, M, 1, 1)`` float32 scale per token row for 8-bit floats. At use the
block's keys/values are rebuilt in the compute dtype in one `Workspace` buffer shared by all blocks (blocks run one
after the other), the computed tokens' fresh values and the text written over it. Everything is preallocated and
written in place, so a graphed pruned step replays over the same memory.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..algorithm import advance_kv_, bits, dequantize_rows_, quantize_rows, scatter_tokens_
from ..kernels import dequantize_kv_, quantize_scatter_, scatter_rows_

if TYPE_CHECKING:
    from .contract import BufferStore, KVSlot

SCALE = ".scale"  # suffix of a low-precision cache's per-token scales in its block's store


class Workspace:
    """Flat buffers one shape signature's blocks share: ``view(name, shape, ...)`` is a view of the first
    ``prod(shape)`` elements, grown to the largest block on first use (a graph's warm-up runs every block before its
    capture, so captured replays never see it grow).

    Example:
        >>> ws = Workspace()
        >>> ws.view("kv", (2, 3), torch.float32, "cpu").shape, ws.view("kv", (1, 2), torch.float32, "cpu").shape
        (torch.Size([2, 3]), torch.Size([1, 2]))
        >>> ws.nbytes()
        24
    """

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def view(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        numel = math.prod(shape)
        flat = self.tensors.get(name)
        if flat is None or flat.numel() < numel or flat.dtype != dtype or flat.device != torch.device(device):
            flat = self.tensors[name] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(tuple(shape))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


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
    keys/values the step attends to in the workspace: the dequantised cache (reuse) or its forecast
    ``K1 + (K1 - K0) r`` (extrapolate), the fresh unrounded values at ``idx`` and the text tail."""
    data, scale = slot.kv, slot.scale  # (2, B, M, H, hd) storage dtype, (2, B, M, 1, 1) float32 or None
    _, b, m, heads, hd = data.shape
    t = text[0].shape[1] if text is not None else 0
    out = slot.workspace.view("kv", (2, b, m + t, heads, hd), slot.compute, data.device)
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
    time through one (B, M, H, hd) workspace buffer."""
    k0 = slot.workspace.view("k0", out.shape[1:], out.dtype, out.device)  # (B, M, H, hd)
    weight = (slot.forecast.ratio + 1.0)[:, :, None, None].to(out.dtype)  # (B, M, 1, 1), 1 at the computed tokens
    for j in range(2):
        k1 = dequantize_rows_(out[j], slot.kv[j], slot.scale[j] if slot.scale is not None else None)
        dequantize_rows_(k0, slot.prev[j], slot.prev_scale[j] if slot.prev_scale is not None else None)
        torch.lerp(k0, k1, weight, out=k1)  # k1 + (k1 - k0) r in one pass, as algorithm.extrapolate_
