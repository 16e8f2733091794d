"""How the benchmark builds and drives one model family's stock diffusers pipeline.

Each family knows how to build its pipeline (random full-size weights from ``model_configs.json``, or real weights),
what to pass for one batch of prompts (random prompt embeddings: text encoding is outside the timed loop and the same
for dense and CAT), and how to decode the final latents for the end-to-end time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..families import FAMILIES as FAMILY_RECORDS
from ..families import load

#: random-weight text encoders of the public pipelines, for an honest "dense peak memory" (resident, as
#: ``from_pretrained(...).to("cuda")`` holds them); standard configs of CLIP ViT-L/14, OpenCLIP bigG/14 and
#: T5-v1.1-XXL text towers
TEXT_ENCODER_CONFIGS = {
    "clip-l": dict(
        kind="clip",
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        projection_dim=768,
        hidden_act="quick_gelu",
    ),
    "clip-g": dict(
        kind="clip",
        hidden_size=1280,
        intermediate_size=5120,
        num_attention_heads=20,
        num_hidden_layers=32,
        projection_dim=1280,
        hidden_act="gelu",
    ),
    "t5-xxl": dict(
        kind="t5",
        d_model=4096,
        d_ff=10240,
        d_kv=64,
        num_heads=64,
        num_layers=24,
        vocab_size=32128,
        feed_forward_proj="gated-gelu",
    ),
}


@dataclass(frozen=True)
class Family:
    """One pipeline family in the benchmark."""

    name: str
    build: Callable  # (entry, device, dtype, weights) -> pipeline
    inputs: Callable  # (pipe, entry, batch, cfg, device, dtype) -> keyword arguments of one pipeline call
    decode: Callable | None  # (pipe, latents, height, width) -> images; None: latents are pixels already
    text_encoders: tuple[str, ...] = ()
    cfg_default: bool = True  # whether a generation of this family normally runs classifier-free guidance


def _rand(g, device, dtype, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(device, dtype)


def _vae_config(configs: dict, entry: dict, **overrides) -> dict:
    """The SD3 VAE config (an SDXL-architecture AutoencoderKL) with the family's latent channels and scaling."""
    return {**configs[entry.get("vae", "sd3-vae")]["config"], **overrides}


def _load_real(cls, weights: str, subfolder: str, dtype):
    try:
        return cls.from_pretrained(weights, subfolder=subfolder, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise OSError(
            f"bench: weights: could not load {subfolder}/ from {weights!r} ({exc}). Pass a hub id or a local "
            "diffusers pipeline folder of this preset's family, or leave --weights out for random weights."
        ) from exc


def _decode_vae(pipe, latents, height, width):
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype), return_dict=False)[0]


# ---------------------------------------------------------------- SD3 / SD3.5
def _sd3_build(entry, device, dtype, weights, configs):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from catprune.models.testing import sd3_pipeline_from_components

    if weights is not None:
        transformer = _load_real(SD3Transformer2DModel, weights, "transformer", dtype)
        vae = _load_real(AutoencoderKL, weights, "vae", dtype)
        return sd3_pipeline_from_components(transformer.to(device).eval(), vae.to(device).eval())
    with torch.device(device):
        transformer = SD3Transformer2DModel(**entry["config"]).to(dtype).eval()
        vae = AutoencoderKL(**_vae_config(configs, entry)).to(dtype).eval()
    return sd3_pipeline_from_components(transformer, vae, FlowMatchEulerDiscreteScheduler(shift=3.0))


def _sd3_inputs(pipe, entry, batch, cfg, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = pipe.transformer.config
    t = entry.get("text_tokens", 333)
    return dict(
        prompt_embeds=_rand(g, device, dtype, batch, t, c.joint_attention_dim),
        pooled_prompt_embeds=_rand(g, device, dtype, batch, c.pooled_projection_dim),
        negative_prompt_embeds=_rand(g, device, dtype, batch, t, c.joint_attention_dim),
        negative_pooled_prompt_embeds=_rand(g, device, dtype, batch, c.pooled_projection_dim),
        guidance_scale=7.0 if cfg else 1.0,
    )


# ---------------------------------------------------------------- PixArt-Sigma
def _pixart_build(entry, device, dtype, weights, configs):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel

    from catprune.models.testing import pixart_pipeline_from_components

    if weights is not None:
        transformer = _load_real(PixArtTransformer2DModel, weights, "transformer", dtype)
        vae = _load_real(AutoencoderKL, weights, "vae", dtype)
        return pixart_pipeline_from_components(transformer.to(device).eval(), vae.to(device).eval())
    with torch.device(device):
        transformer = PixArtTransformer2DModel(**entry["config"]).to(dtype).eval()
        # PixArt-Sigma decodes with the SDXL VAE: the SD3 VAE architecture with 4 latent channels
        vae_config = _vae_config(configs, entry, latent_channels=entry["latent_channels"], scaling_factor=0.13025)
        vae_config.update(shift_factor=None, use_quant_conv=True, use_post_quant_conv=True)
        vae = AutoencoderKL(**vae_config).to(dtype).eval()
    return pixart_pipeline_from_components(transformer, vae, DPMSolverMultistepScheduler())


def _pixart_inputs(pipe, entry, batch, cfg, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = pipe.transformer.config
    t = entry.get("text_tokens", 300)
    mask = torch.ones(batch, t, device=device, dtype=torch.long)
    return dict(
        prompt_embeds=_rand(g, device, dtype, batch, t, c.caption_channels),
        prompt_attention_mask=mask,
        negative_prompt_embeds=_rand(g, device, dtype, batch, t, c.caption_channels),
        negative_prompt_attention_mask=mask,
        negative_prompt=None,  # the pipeline's default "" conflicts with negative_prompt_embeds
        guidance_scale=4.5 if cfg else 1.0,
        use_resolution_binning=False,
    )


# ---------------------------------------------------------------- Flux
def _flux_build(entry, device, dtype, weights, configs):
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from catprune.models.testing import flux_pipeline_from_components

    if weights is not None:
        transformer = _load_real(FluxTransformer2DModel, weights, "transformer", dtype)
        vae = _load_real(AutoencoderKL, weights, "vae", dtype)
        return flux_pipeline_from_components(transformer.to(device).eval(), vae.to(device).eval())
    with torch.device(device):
        transformer = FluxTransformer2DModel(**entry["config"]).to(dtype).eval()
        vae_config = _vae_config(configs, entry, scaling_factor=0.3611, shift_factor=0.1159)
        vae = AutoencoderKL(**vae_config).to(dtype).eval()
    return flux_pipeline_from_components(transformer, vae)  # FLUX.1's shifting flow-matching scheduler


def _flux_inputs(pipe, entry, batch, cfg, device, dtype, seed=0):
    if cfg:
        raise ValueError(
            "bench: cfg: FLUX.1-dev is guidance-distilled and runs without a classifier-free guidance batch; "
            "benchmark it with --no-cfg."
        )
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = pipe.transformer.config
    t = entry.get("text_tokens", 512)
    return dict(
        prompt_embeds=_rand(g, device, dtype, batch, t, c.joint_attention_dim),
        pooled_prompt_embeds=_rand(g, device, dtype, batch, c.pooled_projection_dim),
        guidance_scale=3.5,
    )


def _flux_decode(pipe, latents, height, width):
    return _decode_vae(pipe, pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor), height, width)


# ---------------------------------------------------------------- the embedded shapes and scenes models
def _shapes_build(entry, device, dtype, weights, configs):
    from catprune.models.shapes import load_shapes_pipeline

    return load_shapes_pipeline(path=weights, device=device, dtype=dtype)


def _shapes_inputs(pipe, entry, batch, cfg, device, dtype, seed=0):
    from catprune.models.shapes import DEFAULT_GUIDANCE_SCALE

    captions = ["a large red circle at the center and a small blue square at the top left"] * batch
    return dict(prompt=captions, guidance_scale=DEFAULT_GUIDANCE_SCALE if cfg else 1.0)


def _scenes_build(entry, device, dtype, weights, configs):
    from catprune.models.scenes import load_scenes_pipeline

    return load_scenes_pipeline(path=weights, device=device, dtype=dtype)


def _scenes_inputs(pipe, entry, batch, cfg, device, dtype, seed=0):
    from catprune.models.scenes import DEFAULT_GUIDANCE_SCALE

    captions = ["an owl at the top left and a delivery truck at the center"] * batch
    return dict(prompt=captions, guidance_scale=DEFAULT_GUIDANCE_SCALE if cfg else 1.0)


SD3 = Family("sd3", _sd3_build, _sd3_inputs, _decode_vae, text_encoders=("clip-l", "clip-g", "t5-xxl"))
PIXART = Family("pixart", _pixart_build, _pixart_inputs, _decode_vae, text_encoders=("t5-xxl",))
FLUX = Family("flux", _flux_build, _flux_inputs, _flux_decode, text_encoders=("clip-l", "t5-xxl"), cfg_default=False)
SHAPES = Family("shapes", _shapes_build, _shapes_inputs, None)
SCENES = Family("scenes", _scenes_build, _scenes_inputs, None)

#: pipeline class (the transformer's, for diffusers families) -> its benchmark record; the diffusers families come
#: from the family records (catprune.families), the embedded shapes pipeline has no transformer adapter of its own
FAMILIES = {record.transformer_class: load(record.bench) for record in FAMILY_RECORDS}
FAMILIES["ShapesPipeline"] = SHAPES
FAMILIES["ScenesPipeline"] = SCENES


def family_of(entry: dict) -> Family:
    return FAMILIES[entry["class"]]


def build_text_encoders(names, device, dtype) -> list[torch.nn.Module]:
    """Random-weight text encoders ``names`` (keys of TEXT_ENCODER_CONFIGS), resident on ``device``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    encoders = []
    with torch.device(device):
        for name in names:
            config = dict(TEXT_ENCODER_CONFIGS[name])
            if config.pop("kind") == "clip":
                model = CLIPTextModelWithProjection._from_config(CLIPTextConfig(**config), dtype=dtype)
            else:
                model = T5EncoderModel._from_config(T5Config(**config), dtype=dtype)
            encoders.append(model.eval())
    return encoders
