"""The embedded default text-to-image model: a small pixel-space SD3 MMDiT trained on a procedural shapes world.

Example:
    >>> from catprune.models.shapes import load_shapes_pipeline
    >>> pipe = load_shapes_pipeline()  # shipped weights, CPU, float32
    >>> image = pipe("a large red circle at the center and a small blue square at the top left").images[0]  # doctest: +SKIP
"""

from .loading import (
    build_random_shapes_pipeline,
    build_shapes_pipeline,
    default_config,
    load_shapes_pipeline,
    random_config,
    save_flat_weights,
)
from .pipeline import DEFAULT_GUIDANCE_SCALE, ShapesPipeline, ShapesPipelineOutput
from .text_encoder import ShapesTextEncoder
from .tokenizer import ShapesTokenizer
from .world import (
    CELLS,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    VOCABULARY,
    SceneBatch,
    ShapeObject,
    caption_for,
    parse_caption,
    random_captions,
    render_captions,
    render_scenes,
    sample_scenes,
    scenes_from_captions,
)

__all__ = [
    "CELLS",
    "COLOURS",
    "DEFAULT_GUIDANCE_SCALE",
    "IMAGE_SIZE",
    "SHAPES",
    "SIZES",
    "VOCABULARY",
    "SceneBatch",
    "ShapeObject",
    "ShapesPipeline",
    "ShapesPipelineOutput",
    "ShapesTextEncoder",
    "ShapesTokenizer",
    "build_random_shapes_pipeline",
    "build_shapes_pipeline",
    "caption_for",
    "default_config",
    "load_shapes_pipeline",
    "parse_caption",
    "random_captions",
    "random_config",
    "render_captions",
    "render_scenes",
    "sample_scenes",
    "save_flat_weights",
    "scenes_from_captions",
]
