"""Small block-level pieces shared by the adapters' pruned forwards (pure torch + diffusers' LoRA scaling)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``normed * (1 + scale) + shift`` as one kernel (diffusers writes it as two or three).

    normed: (B, N, D); shift, scale: (B, D) per batch row, or already broadcastable, e.g. (B, 1, D).

    Example:
        >>> modulate(torch.ones(1, 2, 3), torch.zeros(1, 3), torch.ones(1, 3)).tolist()
        [[[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]]
    """
    if shift.dim() == 2:
        shift, scale = shift[:, None], scale[:, None]  # (B, 1, D)
    return torch.addcmul(shift, normed, 1 + scale)  # (B, N, D)


def gated_add(x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """``x + gate * y`` as one kernel (the gated residual); ``gate`` None means no gate.

    x, y: (B, N, D); gate: (B, D) per batch row, or already broadcastable, e.g. (B, 1, D).

    Example:
        >>> gated_add(torch.ones(1, 1, 2), torch.full((1, 2), 0.5), torch.ones(1, 1, 2)).tolist()
        [[[1.5, 1.5]]]
    """
    if gate is None:
        return x + y
    if gate.dim() == 2:
        gate = gate[:, None]  # (B, 1, D)
    return torch.addcmul(x, gate, y)  # (B, N, D)


def fuses_gelu(linear: torch.nn.Module, approximate: str, x: torch.Tensor) -> bool:
    """True when `gelu_linear` runs ``linear`` and its GELU as one GEMM: a plain ``nn.Linear`` with a bias (not a
    LoRA wrapper), the tanh approximation, a 16-bit CUDA input. Not on a CPU: ``torch._addmm_activation`` computes
    the exact GELU there, not the tanh approximation. Not in float32: there the epilogue's GELU measured a mean
    error 3.6 times that of GEMM then GELU (1.2e-6 against 3.2e-7 on an H200), while in bfloat16 it is the more
    accurate of the two (one rounding fewer).

    Example:
        >>> fuses_gelu(torch.nn.Linear(4, 8), "tanh", torch.zeros(2, 4))  # a CPU input
        False
    """
    plain = type(linear) is torch.nn.Linear and linear.bias is not None
    return plain and approximate == "tanh" and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def gelu_linear(linear: torch.nn.Module, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """``F.gelu(linear(x), approximate=approximate)``; where `fuses_gelu`, one GEMM with a bias-and-GELU epilogue
    (cuBLASLt through ``torch._addmm_activation``) instead of a GEMM and an elementwise pass over its output (in a
    transformer block the largest activation: 4 times the width). Same math, one rounding to the output dtype
    fewer: the GELU reads the float32 accumulator, not the rounded pre-activation.

    x: (..., D_in); returns (..., D_out).

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> torch.equal(gelu_linear(lin, x, "tanh"), F.gelu(lin(x), approximate="tanh"))
        True
    """
    if not fuses_gelu(linear, approximate, x):
        return F.gelu(linear(x), approximate=approximate)
    return _fused_gelu_linear(linear, x)


def _fused_gelu_linear(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The one-GEMM path of `gelu_linear`, for a ``linear`` and ``x`` that `fuses_gelu` accepted."""
    rows = x.reshape(-1, x.shape[-1])  # (N, D_in)
    out = torch._addmm_activation(linear.bias, rows, linear.weight.t(), use_gelu=True)  # (N, D_out)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def feed_forward(ff: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``ff(x)`` for a diffusers ``FeedForward``; when its first layer is diffusers' ``GELU`` (projection, then
    GELU), that layer runs through `gelu_linear`. Any other activation (GEGLU, a LoRA-wrapped projection, ...) runs
    the module as it is.

    Example:
        >>> from diffusers.models.attention import FeedForward
        >>> ff = FeedForward(4, activation_fn="gelu-approximate")
        >>> x = torch.randn(1, 2, 4)
        >>> torch.equal(feed_forward(ff, x), ff(x))
        True
    """
    from diffusers.models.activations import GELU

    first = ff.net[0]
    if type(first) is not GELU or not fuses_gelu(first.proj, first.approximate, x):
        return ff(x)
    x = _fused_gelu_linear(first.proj, x)
    for module in ff.net[1:]:
        x = module(x)
    return x


@contextlib.contextmanager
def lora_scale(model: torch.nn.Module, joint_attention_kwargs: dict | None):
    """Apply ``joint_attention_kwargs['scale']`` to the model's PEFT LoRA layers for the duration, as the model's
    own forward does."""
    from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

    scale = (joint_attention_kwargs or {}).get("scale", 1.0)
    if USE_PEFT_BACKEND:
        scale_lora_layers(model, scale)
    try:
        yield
    finally:
        if USE_PEFT_BACKEND:
            unscale_lora_layers(model, scale)


def linear_macs(module: torch.nn.Module) -> int:
    """Multiply-accumulates per input row of every ``nn.Linear`` inside ``module``.

    Example:
        >>> linear_macs(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GELU(), torch.nn.Linear(3, 2)))
        18
    """
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def describe(value) -> str:
    """A short description of a received argument for error messages: its shape, or its type.

    Example:
        >>> describe(torch.zeros(2, 3)), describe(None)
        ('a tensor of shape (2, 3)', 'NoneType')
    """
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
