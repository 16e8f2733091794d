"""``ShapesPipeline``: text-to-image for the shapes world, with the denoising loop of StableDiffusion3Pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from .text_encoder import ShapesTextEncoder
from .tokenizer import ShapesTokenizer

logger = logging.get_logger(__name__)

#: Classifier-free guidance scale used when ``guidance_scale`` is not given (chosen on a validation caption set,
#: see docs/shapes_model.md).
DEFAULT_GUIDANCE_SCALE = 2.0
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class ShapesPipelineOutput(BaseOutput):
    """Output of ``ShapesPipeline``: ``images`` is a list of PIL images, a numpy array (B, H, W, 3) or a tensor
    (B, 3, H, W), with values in [0, 1] for "np" and "pt" (in [-1, 1] for "latent")."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class ShapesPipeline(DiffusionPipeline):
    """Text-to-image pipeline of the embedded shapes model (pixel-space SD3 MMDiT + a small word-level encoder).

    The denoising loop matches ``StableDiffusion3Pipeline``: ``scheduler.set_timesteps`` at the start of every call,
    one transformer call per step on the whole classifier-free-guidance batch ordered ``[unconditional,
    conditional]``, then one ``scheduler.step``. There is no VAE: the transformer denoises RGB pixels in [-1, 1].

    Args:
        transformer: an ``SD3Transformer2DModel`` with ``in_channels = out_channels = 3``.
        scheduler: a ``FlowMatchEulerDiscreteScheduler``.
        text_encoder: a ``ShapesTextEncoder`` whose output dims match the transformer's ``joint_attention_dim`` and
            ``pooled_projection_dim``.
        tokenizer: a ``ShapesTokenizer``.

    Example:
        >>> from catprune.models.shapes import build_random_shapes_pipeline
        >>> pipe = build_random_shapes_pipeline(num_layers=1, attention_head_dim=8, num_attention_heads=2)
        >>> pipe.set_progress_bar_config(disable=True)
        >>> out = pipe("a small red circle at the top left", num_inference_steps=2, output_type="pt")
        >>> tuple(out.images.shape)
        (1, 3, 128, 128)
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    default_guidance_scale = DEFAULT_GUIDANCE_SCALE
    #: Names the model in messages; a pipeline for another embedded world (``ScenesPipeline``) overrides it.
    model_name = "shapes"

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: ShapesTextEncoder,
        tokenizer: ShapesTokenizer,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False, do_normalize=True)
        self._guidance_scale = self.default_guidance_scale
        self._num_timesteps = 0

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def supported_sizes(self) -> tuple[int, int]:
        """``(step, largest)``: height and width must be multiples of ``step`` and at most ``largest`` pixels."""
        patch = self.transformer.config.patch_size
        return patch, patch * self.transformer.config.pos_embed_max_size

    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Encode prompts (and negative prompts, "" by default) into transformer inputs.

        Returns ``(prompt_embeds (B*n, L, joint_attention_dim), pooled (B*n, pooled_projection_dim),
        negative_prompt_embeds, negative_pooled)``; the negatives are None without guidance.
        """
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        dtype = self.transformer.dtype

        def encode(texts: list[str], argument: str) -> tuple[torch.Tensor, torch.Tensor]:
            tokens = self.tokenizer(texts, argument=argument)
            states, pooled = self.text_encoder(
                tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            )  # (B, L, J), (B, P)
            states = states.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)  # (B*n, L, J)
            pooled = pooled.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)  # (B*n, P)
            return states, pooled

        prompt_embeds, pooled = encode(prompts, "prompt")
        if not do_classifier_free_guidance:
            return prompt_embeds, pooled, None, None
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
        negative_embeds, negative_pooled = encode(negatives, "negative_prompt")
        return prompt_embeds, pooled, negative_embeds, negative_pooled

    def check_inputs(
        self, prompt, negative_prompt, height, width, num_inference_steps, num_images_per_prompt, output_type
    ):
        """Validate call arguments; raise ``ValueError`` / ``TypeError`` that say what to change."""
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise TypeError(
                f"prompt must be a str or a non-empty list of str, got {type(prompt).__name__} ({prompt!r}). "
                "Pass e.g. 'a small red circle at the top left'."
            )
        self.tokenizer.check(prompts, "prompt")
        if negative_prompt is not None:
            if isinstance(negative_prompt, str):
                negatives = [negative_prompt]
            elif isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt):
                negatives = list(negative_prompt)
                if len(negatives) != len(prompts):
                    raise ValueError(
                        f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; pass one "
                        "negative prompt per prompt, a single str, or None (the empty caption)."
                    )
            else:
                raise TypeError(
                    f"negative_prompt must be None, a str or a list of str, got {type(negative_prompt).__name__}."
                )
            self.tokenizer.check(negatives, "negative_prompt")
        step, largest = self.supported_sizes
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int number of pixels, got {type(value).__name__} ({value!r}).")
            if value % step != 0 or not step <= value <= largest:
                sample = self.transformer.config.sample_size
                raise ValueError(
                    f"unsupported resolution: {name}={value} (height={height}, width={width}). The "
                    f"{self.model_name} model takes heights and widths that are multiples of {step} (its patch size) "
                    f"from {step} to {largest} pixels (pos_embed_max_size="
                    f"{self.transformer.config.pos_embed_max_size} patches); its weights were trained at "
                    f"{sample}x{sample}. Use height={sample}, width={sample}."
                )
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}.")
        if not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        return prompts

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None) -> torch.Tensor:
        """Initial noise (B, 3, height, width); a list of generators gives one per image, like diffusers."""
        shape = (batch_size, self.transformer.config.in_channels, height, width)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
            return latents.to(device=device, dtype=dtype)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator is a list of {len(generator)} generators but the batch holds {batch_size} images "
                "(prompts x num_images_per_prompt); pass one generator per image or a single generator."
            )
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate images of shapes-world captions.

        Args:
            prompt: a caption or a list of captions over the shapes vocabulary (``a small red circle at the top
                left and a large blue square at the center``).
            negative_prompt: caption(s) to steer away from; None uses the empty caption (plain CFG).
            height, width: pixels; default ``transformer.config.sample_size`` (128, the trained resolution).
            num_inference_steps: Euler steps of the flow-matching scheduler.
            guidance_scale: classifier-free guidance weight; guidance is on iff it is > 1. None: the model's
                ``default_guidance_scale`` (2.0 for shapes).
            num_images_per_prompt: images per caption.
            generator: a ``torch.Generator`` or a list with one per image.
            latents: optional initial noise (B, 3, height, width).
            output_type: "pil", "np", "pt" or "latent".
            return_dict: return a ``ShapesPipelineOutput`` (else a tuple ``(images,)``).

        Example:
            >>> from catprune.models.shapes import load_shapes_pipeline
            >>> pipe = load_shapes_pipeline()
            >>> image = pipe("a large red circle at the center", num_inference_steps=4).images[0]  # doctest: +SKIP
        """
        sample = self.transformer.config.sample_size
        height = sample if height is None else height
        width = sample if width is None else width
        prompts = self.check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, num_images_per_prompt, output_type
        )
        if (height, width) != (sample, sample):
            logger.warning(
                f"The {self.model_name} model was trained at {sample}x{sample}; {height}x{width} images are untested."
            )
        self._guidance_scale = float(self.default_guidance_scale if guidance_scale is None else guidance_scale)
        device = self._execution_device
        batch_size = len(prompts) * num_images_per_prompt

        prompt_embeds, pooled, negative_embeds, negative_pooled = self.encode_prompt(
            prompts, negative_prompt, device, num_images_per_prompt, self.do_classifier_free_guidance
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds], dim=0)  # (2B, L, J), unconditional first
            pooled = torch.cat([negative_pooled, pooled], dim=0)  # (2B, P)

        latents = self.prepare_latents(batch_size, height, width, self.transformer.dtype, device, generator, latents)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for t in timesteps:
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                timestep = t.expand(latent_model_input.shape[0])  # (2B,) or (B,)
                noise_pred = self.transformer(
                    hidden_states=latent_model_input,
                    timestep=timestep,
                    encoder_hidden_states=prompt_embeds,
                    pooled_projections=pooled,
                    return_dict=False,
                )[0]  # (2B, 3, H, W) velocity
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if latents.dtype != latents_dtype:
                    latents = latents.to(latents_dtype)
                progress_bar.update()

        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(latents.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ShapesPipelineOutput(images=images)
