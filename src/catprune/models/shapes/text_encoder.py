"""A small transformer text encoder for the shapes vocabulary: token states for joint attention + a pooled vector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class _EncoderBlock(nn.Module):
    """Pre-norm self-attention + MLP block; padded keys are masked out."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, 4 * hidden_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * hidden_size, hidden_size),
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, d // self.num_heads)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])  # (B, H, L, Dh)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))  # (B, L, D)
        return x + self.mlp(self.norm2(x))  # (B, L, D)


class ShapesTextEncoder(ModelMixin, ConfigMixin):
    """Embeds shapes captions for ``SD3Transformer2DModel``.

    Token embedding + learned positions, ``num_layers`` bidirectional transformer blocks, then two heads:
    token states (B, L, joint_attention_dim) for the transformer's ``encoder_hidden_states`` and a pooled vector
    (B, pooled_projection_dim) read at the ``<bos>`` position for ``pooled_projections``.

    Example:
        >>> enc = ShapesTextEncoder(vocab_size=25, max_length=24, hidden_size=32, num_layers=1, num_heads=2,
        ...                         joint_attention_dim=16, pooled_projection_dim=8)
        >>> ids = torch.zeros(2, 24, dtype=torch.long); ids[:, 0] = 1; ids[:, 1] = 2
        >>> states, pooled = enc(ids, (ids > 0).long())
        >>> tuple(states.shape), tuple(pooled.shape)
        ((2, 24, 16), (2, 8))
    """

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 25,
        max_length: int = 24,
        hidden_size: int = 192,
        num_layers: int = 2,
        num_heads: int = 3,
        joint_attention_dim: int = 192,
        pooled_projection_dim: int = 192,
    ):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}); pick num_heads that "
                "divides hidden_size."
            )
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Parameter(torch.randn(max_length, hidden_size) * 0.02)
        self.blocks = nn.ModuleList([_EncoderBlock(hidden_size, num_heads) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(hidden_size)
        self.token_proj = nn.Linear(hidden_size, joint_attention_dim)
        self.pooled_proj = nn.Linear(hidden_size, pooled_projection_dim)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(token_states (B, L, joint_attention_dim), pooled (B, pooled_projection_dim))``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.position_embedding[:length]  # (B, L, D)
        key_mask = attention_mask.bool()  # (B, L); <bos> is always kept, so no row is fully masked
        for block in self.blocks:
            x = block(x, key_mask)  # (B, L, D)
        x = self.norm(x)  # (B, L, D)
        return self.token_proj(x), self.pooled_proj(x[:, 0])
