"""Per-block K/V caches and the context forecast (``Context.EXTRAPOLATE``) that cached attention reads through.

A pruned step's computed tokens attend to every image token. With ``Context.REUSE`` the unselected tokens enter
with the keys/values of the step that last computed them (``K1``); with ``Context.EXTRAPOLATE`` with a per-token
first-order forecast ``K1 + (K1 - K0) * (t - t1) / (t1 - t0)`` from their last two computations (``K0`` at ``t0``).
Everything lives in persistent buffers written in place (CUDA-graph safe, no host syncs; timesteps are tensors).
"""

from __future__ import annotations

import torch

from ..algorithm import advance_times_, bits, forecast_ratio_
from .contract import PREV, BufferStore
from .lowprec import SCALE


class ContextForecast:
    """The forecast state one shape signature shares over its blocks: per-token times ``t1`` / ``t0`` and this
    step's ratios (B, M) float32, and ONE working buffer that every block's attention reads (blocks run one after
    the other), so the extra memory is K0 per block plus one block's K/V.

    Example:
        >>> f = ContextForecast(batch=1, num_tokens=2, device="cpu")
        >>> f.stamp(torch.tensor([900.0])); f.stamp(torch.tensor([800.0]))
        >>> f.begin(torch.tensor([700.0]), torch.tensor([[0]])).tolist()
        [[0.0, 1.0]]
    """

    def __init__(self, batch: int, num_tokens: int, device, max_ratio: float | None = None):
        self.store = BufferStore()
        shape = (batch, num_tokens)
        self.t1 = self.store.buffer("t1", shape, torch.float32, device).zero_()  # (B, M) timestep of K1
        self.t0 = self.store.buffer("t0", shape, torch.float32, device).zero_()  # (B, M) timestep of K0
        self.ratio = self.store.buffer("ratio", shape, torch.float32, device).zero_()  # (B, M) this step's r
        self.computed = self.store.buffer("computed", shape, torch.uint8, device).zero_()  # (B, M) 1 at this idx
        self.num_tokens = num_tokens
        self.max_ratio = max_ratio  # cap of the extrapolation ratio (CATConfig.forecast_max_ratio)

    def stamp(self, t: torch.Tensor) -> None:
        """After a full step at ``t`` (B,) that refilled every K1: ``t0 <- t1``, ``t1 <- t`` for all tokens."""
        advance_times_(self.t1, self.t0, None, t)

    def roll(self, caches: list[BufferStore]) -> None:
        """Before a full step refills every K1: ``K0 <- K1`` for every block (allocating K0 on first use); a
        low-precision cache's bytes and scales are copied as they are."""
        for cache in caches:
            for part, image in self._image_parts(cache):
                bits(cache.buffer(part + PREV, image.shape, image.dtype, image.device)).copy_(bits(image))

    def prepare(self, caches: list[BufferStore]) -> None:
        """Before a full-selection step fills the caches (`Runtime._full_selection`): every block's K0 and the
        shared working buffer allocated, outside any traced or captured region. A K0 allocated here is zeroed with
        its K1's image rows: the step's K0 <- K1 then copies finite values, and its forecast at ratio 0 is exactly
        the fresh K1 (garbage in a fresh buffer could hold NaN, and ``NaN * 0`` is NaN). A low-precision cache gets
        K0 of its bytes and of its scales and no working buffer (it is rebuilt in a temporary of each step)."""
        for cache in caches:
            for part, image in self._image_parts(cache):
                if cache.get(part + PREV) is None:
                    bits(cache.buffer(part + PREV, image.shape, image.dtype, image.device)).zero_()
                    bits(image).zero_()
            for name in cache.kv_names():
                if name not in cache.compute:
                    self.working(cache[name])

    def _image_parts(self, cache: BufferStore):
        """``(name, image rows)`` of every K/V cache of a block store and of its scales where it has them: (2, B, M,
        H, hd) or (2, B, M, 1, 1) views."""
        for name in cache.kv_names():
            for part in (name, name + SCALE):
                kv = cache.get(part)
                if kv is not None:  # only 8-bit storage has scales
                    yield part, kv[:, :, : self.num_tokens]

    def begin(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Before a pruned step at ``t`` (B,) computing the (B, k) tokens ``idx``: this step's ratios (B, M), and
        ``computed`` (B, M) 1 at ``idx``, 0 elsewhere (the extrapolation kernel skips those rows)."""
        self.computed.zero_().scatter_(1, idx, 1)
        return forecast_ratio_(self.ratio, t, self.t1, self.t0, idx, self.max_ratio)

    def commit(self, t: torch.Tensor, idx: torch.Tensor) -> None:
        """After that step: the computed tokens' times advance (their K0 / K1 advanced in `contract.KVSlot.attend_kv`)."""
        advance_times_(self.t1, self.t0, idx, t)

    def working(self, kv: torch.Tensor) -> torch.Tensor:
        """The shared working buffer viewed as ``kv``'s shape (grown to the largest block on first use)."""
        flat = self.store.get("work")
        if flat is None or flat.numel() < kv.numel() or flat.dtype != kv.dtype or flat.device != kv.device:
            flat = self.store.buffer("work", (kv.numel(),), kv.dtype, kv.device)
        return flat[: kv.numel()].view(kv.shape)  # (2, B, M [+ T], H, hd)

    def nbytes(self) -> int:
        return self.store.nbytes()


def forecasting(core, forecast: ContextForecast | None, rows: torch.Tensor, step_time=None, **tensors):
    """``core(idx=rows, **tensors)``, the block math of a step computing the (B, k) tokens ``rows``, between the
    forecast's `ContextForecast.begin` (this step's ratios) and `ContextForecast.commit` (the computed tokens'
    times advance); just ``core`` without a forecast."""
    if forecast is not None:
        forecast.begin(step_time, rows)
    selected = core(idx=rows, **tensors)  # (B, k, P)
    if forecast is not None:
        forecast.commit(step_time, rows)
    return selected
