"""The embedded detail-rich text-to-image model: a pixel-space SD3 MMDiT trained on emoji scenes.

Up to three Noto Color Emoji glyphs (``OBJECT_NAMES``, 150 of them) in the cells of a 3x3 grid over a random
gradient; captions such as ``an owl at the top left and a delivery truck at the center``. Same construction and
call interface as the shapes model (``catprune.models.shapes``); see docs/scenes_model.md.

Example:
    >>> from catprune.models.scenes import OBJECT_NAMES, load_scenes_pipeline
    >>> len(OBJECT_NAMES), OBJECT_NAMES[0]
    (150, 'cow')
    >>> pipe = load_scenes_pipeline()  # shipped weights, CPU, float32 (or catprune.load_pipeline("scenes"))
    >>> image = pipe("an owl at the top left and a taxi at the center").images[0]  # doctest: +SKIP
"""

from .loading import (
    build_random_scenes_pipeline,
    build_scenes_pipeline,
    default_config,
    load_scenes_pipeline,
    random_config,
    save_scenes_weights,
)
from .pipeline import DEFAULT_GUIDANCE_SCALE, ScenesPipeline, ScenesPipelineOutput
from .tokenizer import ScenesTokenizer
from .world import (
    CELLS,
    IMAGE_SIZE,
    MAX_OBJECTS,
    OBJECT_NAMES,
    VOCABULARY,
    Atlas,
    SceneBatch,
    caption_for,
    load_atlas,
    parse_caption,
    random_captions,
    render_captions,
    render_scenes,
    sample_scenes,
    scenes_from_captions,
)

__all__ = [
    "CELLS",
    "DEFAULT_GUIDANCE_SCALE",
    "IMAGE_SIZE",
    "MAX_OBJECTS",
    "OBJECT_NAMES",
    "VOCABULARY",
    "Atlas",
    "SceneBatch",
    "ScenesPipeline",
    "ScenesPipelineOutput",
    "ScenesTokenizer",
    "build_random_scenes_pipeline",
    "build_scenes_pipeline",
    "caption_for",
    "default_config",
    "load_atlas",
    "load_scenes_pipeline",
    "parse_caption",
    "random_captions",
    "random_config",
    "render_captions",
    "render_scenes",
    "sample_scenes",
    "save_scenes_weights",
    "scenes_from_captions",
]
