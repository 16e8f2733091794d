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


TINY_PIXART_CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,  # learned sigma, as PixArt-Sigma
    num_layers=2,
    cross_attention_dim=16,
    caption_channels=12,
    sample_size=8,
    patch_size=2,
    norm_num_groups=4,
    use_additional_conditions=False,
)


def tiny_pixart_transformer(seed: int = 0, **overrides):
    """A tiny random ``PixArtTransformer2DModel`` (PixArt-Sigma layout, learned sigma; fp32, eval mode).

    Example:
        >>> tiny_pixart_transformer(num_layers=1).config.num_layers
        1
    """
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**{**TINY_PIXART_CONFIG, **overrides}).eval()


def tiny_pixart_inputs(
    model,
    batch: int = 2,
    height: int = 8,
    width: int = 8,
    text_tokens: int = 5,
    seed: int = 0,
    masked_text_tokens: int = 0,
):
    """Random inputs for a PixArt ``model`` (latents of ``height x width``), with an ``encoder_attention_mask``
    (int64, 1 keep) that discards the last ``masked_text_tokens`` text tokens of every row, as a padded T5 prompt."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    text_dim = cfg.caption_channels if cfg.caption_channels is not None else cfg.cross_attention_dim
    mask = torch.ones(batch, text_tokens, dtype=torch.long)
    if masked_text_tokens:
        mask[:, text_tokens - masked_text_tokens :] = 0
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text_tokens, text_dim, generator=g),
        encoder_attention_mask=mask,
    )


def pixart_pipeline_from_components(transformer, vae, scheduler=None):
    """A stock diffusers ``PixArtSigmaPipeline`` without text encoder: call it with ``prompt_embeds`` /
    ``prompt_attention_mask`` (and ``negative_prompt_embeds`` / ``negative_prompt_attention_mask`` when guidance
    is on), and ``use_resolution_binning=False`` for sizes other than the PixArt presets. The default scheduler is
    PixArt-Sigma's (DPM-Solver++ multistep). Needs ``transformers`` installed (diffusers imports it)."""
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler or DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels packed 2x2, as FluxPipeline packs them
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=16,
    pooled_projection_dim=8,
    guidance_embeds=True,  # FLUX.1-dev layout; guidance_embeds=False for schnell
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
)


def tiny_flux_transformer(seed: int = 0, **overrides):
    """A tiny random ``FluxTransformer2DModel`` (FLUX.1-dev layout with guidance embedding; fp32, eval mode).

    Example:
        >>> tiny_flux_transformer(num_single_layers=1).config.num_single_layers
        1
    """
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, **overrides}).eval()


def flux_image_ids(grid_height: int, grid_width: int) -> torch.Tensor:
    """(h * w, 3) position ids of a packed h x w token grid in raster order, as FluxPipeline builds them:
    ``ids[j] = (0, j // w, j % w)``.

    Example:
        >>> flux_image_ids(2, 3)[4].tolist()
        [0.0, 1.0, 1.0]
    """
    ids = torch.zeros(grid_height, grid_width, 3)
    ids[..., 1] = torch.arange(grid_height)[:, None]  # row
    ids[..., 2] = torch.arange(grid_width)[None, :]  # column
    return ids.reshape(grid_height * grid_width, 3)  # (M, 3)


def tiny_flux_inputs(model, batch: int = 2, height: int = 8, width: int = 8, text_tokens: int = 5, seed: int = 0):
    """Random inputs for a Flux ``model`` as FluxPipeline passes them, for unpacked latents of ``height x width``
    (even): ``hidden_states`` packed 2x2 into (batch, height/2 * width/2, in_channels) tokens, ``img_ids`` in raster
    order, zero ``txt_ids``, ``pooled_projections``, and ``guidance`` (only when the model embeds it). The timestep
    (t / 1000, as the pipeline passes it) is the caller's.

    Example:
        >>> model = tiny_flux_transformer()
        >>> tiny_flux_inputs(model, batch=1, height=4, width=6)["hidden_states"].shape
        torch.Size([1, 6, 16])
    """
    if height % 2 or width % 2:
        raise ValueError(f"tiny_flux_inputs: height and width must be even (2x2 packing), got {height}x{width}.")
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    channels = cfg.in_channels // 4
    latents = torch.randn(batch, channels, height, width, generator=g)  # (B, C, H, W)
    packed = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    inputs = dict(
        hidden_states=packed.reshape(batch, (height // 2) * (width // 2), channels * 4),  # (B, M, 4C)
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        img_ids=flux_image_ids(height // 2, width // 2),
        txt_ids=torch.zeros(text_tokens, 3),
    )
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def flux_pipeline_from_components(transformer, vae, scheduler=None):
    """A stock diffusers ``FluxPipeline`` without text encoders: call it with ``prompt_embeds`` /
    ``pooled_prompt_embeds`` (and ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds`` for true CFG). The
    default scheduler is FLUX.1's (flow matching with resolution-dependent shift). Needs ``transformers`` installed
    (diffusers imports it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- one tiny harness per family (contract tests)
class TinyFamily:
    """A family's tiny random model and how a pipeline drives it, for the shared contract tests.

    ``variants``: named config overrides (every variant runs the whole contract); ``inputs`` returns every call
    argument except ``timestep`` (``hidden_states`` holds the starting latents); ``denoise`` runs a minimal
    sampling loop over a bare transformer, as the family's pipeline calls it.
    """

    variants: dict[str, dict] = {"default": {}}
    batched: tuple[str, ...] = ("hidden_states", "encoder_hidden_states")  # inputs with one row per sample
    timestep_scale = 1.0  # what the pipeline multiplies the scheduler's timestep by

    def transformer(self, variant: str = "default", seed: int = 0):
        raise NotImplementedError

    def inputs(self, model, batch: int = 2, height: int = 8, width: int = 12, seed: int = 0) -> dict:
        raise NotImplementedError

    def grid(self, model, height: int, width: int) -> tuple[int, int]:
        """The (h, w) image-token grid of ``height x width`` latents."""
        p = 2
        return height // p, width // p

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler()

    def velocity(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The part of the model's output the scheduler steps with (PixArt drops its learned sigma)."""
        return out

    def call_kwargs(self, model, inputs: dict, t) -> dict:
        """Keyword arguments of one transformer call at scheduler timestep ``t``."""
        b = inputs["hidden_states"].shape[0]
        t = torch.as_tensor(t, dtype=torch.float32)
        return dict(inputs, timestep=(t * self.timestep_scale).expand(b), return_dict=False)

    def denoise(self, model, inputs: dict, steps: int = 6) -> torch.Tensor:
        scheduler = self.scheduler()
        scheduler.set_timesteps(steps)
        x = inputs["hidden_states"].clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                out = model(**self.call_kwargs(model, {**inputs, "hidden_states": x}, t))[0]
                x = scheduler.step(self.velocity(out, x), t, x).prev_sample
        return x

    def row(self, inputs: dict, i: int) -> dict:
        """Sample ``i`` of a batch of inputs."""
        return {k: (v[i : i + 1] if k in self.batched else v) for k, v in inputs.items()}


class TinySD3(TinyFamily):
    variants = {"sd3": {}, "sd3.5": dict(qk_norm="rms_norm", dual_attention_layers=(0,))}
    batched = ("hidden_states", "encoder_hidden_states", "pooled_projections")

    def transformer(self, variant: str = "sd3", seed: int = 0):
        return tiny_sd3_transformer(seed, **self.variants[variant])

    def inputs(self, model, batch=2, height=8, width=12, seed=0):
        return tiny_sd3_inputs(model, batch, height, width, seed=seed)


class TinyPixArt(TinyFamily):
    # PixArt-Alpha style: resolution / aspect-ratio micro-conditions (need a width divisible by 3)
    variants = {
        "sigma": {},
        "alpha-conds": dict(use_additional_conditions=True, num_attention_heads=3, cross_attention_dim=24),
    }
    batched = ("hidden_states", "encoder_hidden_states", "encoder_attention_mask")

    def transformer(self, variant: str = "sigma", seed: int = 0):
        return tiny_pixart_transformer(seed, **self.variants[variant])

    def inputs(self, model, batch=2, height=8, width=12, seed=0):
        inputs = tiny_pixart_inputs(model, batch, height, width, seed=seed, masked_text_tokens=2)
        if model.use_additional_conditions:
            inputs["added_cond_kwargs"] = dict(
                resolution=torch.tensor([[height * 8.0, width * 8.0]]).repeat(batch, 1),
                aspect_ratio=torch.tensor([[height / width]]).repeat(batch, 1),
            )
        return inputs

    def scheduler(self):
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler()

    def velocity(self, out, x):
        return out[:, : x.shape[1]]  # the noise half; the learned sigma is dropped as PixArtSigmaPipeline does

    def row(self, inputs, i):
        single = super().row(inputs, i)
        added = inputs.get("added_cond_kwargs")
        if added is not None:
            single["added_cond_kwargs"] = {k: v[i : i + 1] for k, v in added.items()}
        return single


class TinyFlux(TinyFamily):
    # FLUX.1-dev embeds the guidance scale; schnell does not
    variants = {"dev": {}, "schnell": dict(guidance_embeds=False)}
    batched = ("hidden_states", "encoder_hidden_states", "pooled_projections", "guidance")
    timestep_scale = 1 / 1000  # FluxPipeline passes t / 1000

    def transformer(self, variant: str = "dev", seed: int = 0):
        return tiny_flux_transformer(seed, **self.variants[variant])

    def inputs(self, model, batch=2, height=8, width=12, seed=0):
        return tiny_flux_inputs(model, batch, height, width, seed=seed)
