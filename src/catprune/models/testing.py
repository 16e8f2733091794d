"""Tiny random-weight models built from configs, for tests, doctests and examples (no downloads)."""

from __future__ import annotations

import torch

TINY_SD3_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    caption_projection_dim=16,
    pooled_projection_dim=8,
    out_channels=4,
    pos_embed_max_size=16,
)


def tiny_sd3_transformer(seed: int = 0, **overrides):
    """A tiny random ``SD3Transformer2DModel`` (fp32, eval mode).

    Example:
        >>> tiny_sd3_transformer(num_layers=1).config.num_layers
        1
    """
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**TINY_SD3_CONFIG, **overrides}).eval()


def tiny_sd3_inputs(model, batch: int = 2, height: int = 8, width: int = 8, text_tokens: int = 5, seed: int = 0):
    """Random inputs for ``model`` (latents of ``height x width``)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
    )


def sd3_pipeline_from_components(transformer, vae, scheduler=None):
    """A stock diffusers ``StableDiffusion3Pipeline`` without text encoders: call it with ``prompt_embeds`` /
    ``pooled_prompt_embeds`` (and the negative ones). Needs ``transformers`` installed (diffusers imports it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
