"""Per-token linear forecast in time of cached keys / values (the ``Context.EXTRAPOLATE`` context).

A token last computed at timestep ``t1`` (value ``K1``) and before that at ``t0`` (value ``K0``) is forecast at the
current timestep ``t`` as ``K1 + (K1 - K0) * r`` with ``r = (t - t1) / (t1 - t0)`` (docs/method.md, "Context
forecast"). Pure tensor functions; the runtime keeps the buffers.
"""

from __future__ import annotations

import torch

from .tokens import gather_tokens, scatter_tokens_


def forecast_ratio_(
    out: torch.Tensor,
    t: torch.Tensor,
    t1: torch.Tensor,
    t0: torch.Tensor,
    idx: torch.Tensor | None = None,
    max_ratio: float | None = None,
) -> torch.Tensor:
    """In place into ``out`` (B, M): ``r = (t - t1) / (t1 - t0)`` per token, 0 where ``t1 == t0`` (no slope yet)
    and at the (B, k) tokens ``idx`` (computed this step: their forecast is their fresh value). ``t``: (B,).
    ``max_ratio``: r is capped there (a token left out for many steps is extrapolated at most that far).

    Example:
        >>> t1, t0 = torch.tensor([[800.0, 800.0]]), torch.tensor([[900.0, 800.0]])
        >>> forecast_ratio_(torch.empty(1, 2), torch.tensor([750.0]), t1, t0).tolist()
        [[0.5, 0.0]]
    """
    step = t1 - t0  # (B, M)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    ratio = torch.where(step == 0, torch.zeros_like(step), (t[:, None].to(step.dtype) - t1) / safe)  # (B, M)
    out.copy_(ratio if max_ratio is None else ratio.clamp(max=max_ratio))
    if idx is not None:
        out.scatter_(1, idx, 0.0)
    return out


def extrapolate_(out: torch.Tensor, k1: torch.Tensor, k0: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """In place: ``out = k1 + (k1 - k0) * ratio`` over (2, B, M, H, hd) tensors with a (B, M) ratio; exact ``k1``
    where the ratio is 0. One pass: ``lerp(k0, k1, 1 + ratio)`` (reads K0 and K1 once, writes ``out`` once; lerp
    computes ``k1 - (k1 - k0) * (1 - w)`` for ``w >= 0.5``, so ``w = 1`` gives ``k1`` bit for bit). The former three
    elementwise passes moved 8 cache-sized tensors per block instead of 3.

    Example:
        >>> k1, k0 = torch.full((2, 1, 2, 1, 1), 2.0), torch.ones(2, 1, 2, 1, 1)
        >>> extrapolate_(torch.empty_like(k1), k1, k0, torch.tensor([[0.5, 0.0]]))[0].flatten().tolist()
        [2.5, 2.0]
    """
    weight = (ratio + 1.0)[None, :, :, None, None].to(out.dtype)  # (1, B, M, 1, 1)
    return torch.lerp(k0, k1, weight, out=out)  # (2, B, M, H, hd)


def advance_kv_(k1: torch.Tensor, k0: torch.Tensor, idx: torch.Tensor, fresh: tuple[torch.Tensor, torch.Tensor]):
    """In place, at the (B, k) computed tokens: ``K0 <- K1``, then ``K1 <- fresh`` (keys, values) each (B, k, H, hd).

    Example:
        >>> k1, k0 = torch.ones(2, 1, 2, 1, 1), torch.zeros(2, 1, 2, 1, 1)
        >>> fresh = (torch.full((1, 1, 1, 1), 5.0),) * 2
        >>> _ = advance_kv_(k1, k0, torch.tensor([[1]]), fresh)
        >>> k0[0].flatten().tolist(), k1[0].flatten().tolist()
        ([0.0, 1.0], [1.0, 5.0])
    """
    for j in range(2):
        scatter_tokens_(k0[j], idx, gather_tokens(k1[j], idx))  # (B, M, H, hd)
        scatter_tokens_(k1[j], idx, fresh[j])
    return k1


def advance_times_(t1: torch.Tensor, t0: torch.Tensor, idx: torch.Tensor | None, t: torch.Tensor) -> None:
    """In place, at the (B, k) computed tokens (all when ``idx`` is None): ``t0 <- t1``, ``t1 <- t`` ((B,) now).

    Example:
        >>> t1, t0 = torch.tensor([[800.0, 800.0]]), torch.tensor([[900.0, 900.0]])
        >>> advance_times_(t1, t0, torch.tensor([[1]]), torch.tensor([700.0]))
        >>> t1.tolist(), t0.tolist()
        ([[800.0, 700.0]], [[900.0, 800.0]])
    """
    now = t[:, None].to(t1.dtype)  # (B, 1)
    if idx is None:
        t0.copy_(t1)
        t1.copy_(now.expand_as(t1))
        return
    t0.scatter_(1, idx, t1.gather(1, idx))  # (B, M)
    t1.scatter_(1, idx, now.expand(idx.shape))
