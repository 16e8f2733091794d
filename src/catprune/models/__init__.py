"""Model presets and loading: the embedded ``shapes`` and ``scenes`` models, and hub pipelines by id or path."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

EMBEDDED = ("shapes", "scenes")
#: the model of `load_pipeline`, ``catprune generate``, ``catprune eval``, `EvalSettings` and `BatchOptions` when none
#: is named: ``scenes`` (it meets its quality bar); ``shapes`` is the fast alternative (flat shapes, for quick tests)
DEFAULT_MODEL = "scenes"
#: a valid caption of each embedded model (examples in help texts and error messages)
EXAMPLE_CAPTIONS = {
    "scenes": "an owl at the top left and a delivery truck at the center",
    "shapes": "a large red circle at the center",
}
_CONFIGS = Path(__file__).with_name("model_configs.json")


@lru_cache(maxsize=1)
def model_configs() -> dict:
    """Full-size transformer configs of the public models (for random-weight benchmarks), by preset name.

    Example:
        >>> model_configs()["sd3-medium"]["class"]
        'SD3Transformer2DModel'
    """
    with open(_CONFIGS) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def load_pipeline(
    name_or_path: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """Load a text-to-image pipeline.

    ``"scenes"`` (the default) and ``"shapes"`` (the fast one) are the small models embedded in catprune (they work
    offline; see docs/scenes_model.md and docs/shapes_model.md). Anything else is passed to diffusers'
    ``DiffusionPipeline.from_pretrained`` (a hub id such as ``"stabilityai/stable-diffusion-3-medium-diffusers"``
    or a local folder), then moved to ``device``.

    Example:
        >>> pipe = load_pipeline("shapes")  # doctest: +SKIP
        >>> pipe("a large red circle at the center").images[0]  # doctest: +SKIP
        >>> pipe = load_pipeline("scenes")  # doctest: +SKIP
        >>> pipe("an owl at the top left and a taxi at the center").images[0]  # doctest: +SKIP
    """
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(
            f"load_pipeline: name_or_path: expected 'shapes', 'scenes', a hub id or a local path, got "
            f"{type(name_or_path).__name__}."
        )
    if str(name_or_path) == "shapes":
        from .shapes import load_shapes_pipeline

        return load_shapes_pipeline(device=device, dtype=dtype)
    if str(name_or_path) == "scenes":
        from .scenes import load_scenes_pipeline

        return load_scenes_pipeline(device=device, dtype=dtype)
    if Path(name_or_path).is_dir() and (Path(name_or_path) / "model_index.json").is_file():
        index = json.loads((Path(name_or_path) / "model_index.json").read_text())
        if index.get("_class_name") == "ShapesPipeline":
            from .shapes import load_shapes_pipeline

            return load_shapes_pipeline(path=name_or_path, device=device, dtype=dtype)
        if index.get("_class_name") == "ScenesPipeline":
            from .scenes import load_scenes_pipeline

            return load_scenes_pipeline(path=name_or_path, device=device, dtype=dtype)
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(str(name_or_path), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise OSError(
            f"load_pipeline: could not load {str(name_or_path)!r} with diffusers ({exc}). Expected 'shapes' or "
            "'scenes' (the embedded models), a local pipeline folder, or a hub id reachable from this machine (hub "
            "models need network access or a populated Hugging Face cache, and `pip install catprune[hub]`)."
        ) from exc
    return pipe.to(device)


__all__ = ["EMBEDDED", "load_pipeline", "model_configs"]
