"""``ScenesPipeline``: the shapes pipeline (SD3's denoising loop, no VAE) for the scenes world."""

from __future__ import annotations

from ..shapes.pipeline import ShapesPipeline, ShapesPipelineOutput

#: Classifier-free guidance scale used when ``guidance_scale`` is not given (chosen on validation captions, see
#: docs/scenes_model.md).
DEFAULT_GUIDANCE_SCALE = 5.5


class ScenesPipeline(ShapesPipeline):
    """Text-to-image pipeline of the embedded scenes model: ``ShapesPipeline`` with a ``ScenesTokenizer``.

    Same call interface as the shapes pipeline (``guidance_scale``, ``num_inference_steps``, ``generator``, lists
    of prompts, ``num_images_per_prompt``, PIL / numpy / tensor output, progress bar).

    Example:
        >>> from catprune.models.scenes import load_scenes_pipeline
        >>> pipe = load_scenes_pipeline()
        >>> image = pipe("an owl at the top left and a taxi at the center").images[0]  # doctest: +SKIP
    """

    default_guidance_scale = DEFAULT_GUIDANCE_SCALE
    model_name = "scenes"


ScenesPipelineOutput = ShapesPipelineOutput

__all__ = ["DEFAULT_GUIDANCE_SCALE", "ScenesPipeline", "ScenesPipelineOutput"]
