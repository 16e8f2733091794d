"""Small block-level pieces shared by the adapters' pruned forwards (pure torch + diffusers' LoRA scaling)."""

from __future__ import annotations

import contextlib

import torch


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
