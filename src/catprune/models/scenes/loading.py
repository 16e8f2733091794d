"""Build, save and load the embedded scenes model (the shapes model's code, with the scenes world's parts)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..shapes import loading as _shapes
from .pipeline import ScenesPipeline
from .tokenizer import ScenesTokenizer

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_NAME = "scenes_config.json"
CONFIG_PATH = PACKAGE_DIR / CONFIG_NAME
WEIGHTS_DIR = PACKAGE_DIR / "weights"
TRAIN_SCRIPT = "scripts/train_scenes.py"


def default_config() -> dict[str, Any]:
    """The architecture of the shipped model (``scenes_config.json``): keys ``transformer``, ``text_encoder``,
    ``tokenizer`` and ``scheduler``, each the keyword arguments of that component's class.

    Example:
        >>> cfg = default_config()["transformer"]
        >>> cfg["patch_size"], cfg["num_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"]
        (4, 8, 256)
    """
    try:
        with open(CONFIG_PATH) as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"missing scenes config file {CONFIG_PATH}. Reinstall catprune.") from err
    except ValueError as err:
        raise ValueError(f"corrupt scenes config file {CONFIG_PATH}: {err}. Reinstall catprune.") from err


def build_scenes_pipeline(config: dict[str, Any]) -> ScenesPipeline:
    """Instantiate the pipeline (random weights, diffusers' default initialisation) from a full config dict."""
    return _shapes.build_shapes_pipeline(config, pipeline_class=ScenesPipeline, tokenizer_class=ScenesTokenizer)


def random_config(**transformer_overrides) -> dict[str, Any]:
    """The shipped config with transformer overrides; ``caption_projection_dim`` follows heads x head dim.

    Example:
        >>> config = random_config(num_layers=1, attention_head_dim=8, num_attention_heads=2)
        >>> config["transformer"]["caption_projection_dim"]
        16
    """
    return _shapes._with_transformer_overrides(default_config(), transformer_overrides)


def build_random_scenes_pipeline(seed: int = 0, **transformer_overrides) -> ScenesPipeline:
    """The shipped architecture (or a resized one) with random weights, for tests. Never reads weights.

    Example:
        >>> pipe = build_random_scenes_pipeline(num_layers=1, attention_head_dim=8, num_attention_heads=2)
        >>> pipe.transformer.config.caption_projection_dim, pipe.tokenizer.config.max_length
        (16, 32)
    """
    return _shapes._build_seeded(build_scenes_pipeline, random_config(**transformer_overrides), seed)


def save_scenes_weights(
    pipe: ScenesPipeline, directory: str | os.PathLike, dtype: torch.dtype = torch.float16
) -> list[Path]:
    """Write the shipped layout (``scenes_config.json`` + fp16 safetensors shards of at most 15 MiB).

    Example:
        >>> import tempfile
        >>> pipe = build_random_scenes_pipeline(num_layers=1, attention_head_dim=8, num_attention_heads=2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     names = sorted(f.name for f in save_scenes_weights(pipe, d))
        ...     again = load_scenes_pipeline(d)
        >>> names
        ['scenes_config.json', 'text_encoder.safetensors', 'transformer.safetensors']
    """
    return _shapes.save_flat_weights(pipe, directory, dtype=dtype, config_name=CONFIG_NAME)


def load_scenes_pipeline(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ScenesPipeline:
    """Load the embedded scenes model: the shipped weights (``path=None``) or a saved folder.

    ``path`` may be a folder written by ``ScenesPipeline.save_pretrained`` (has ``model_index.json``) or one in the
    shipped layout written by ``save_scenes_weights`` / ``scripts/train_scenes.py``.

    Raises:
        FileNotFoundError: the folder, a weights file or an atlas file is missing (the message names the path).
        ValueError: a weights, config or atlas file is corrupt or does not fit (the message names the path).

    Example:
        >>> pipe = load_scenes_pipeline()
        >>> pipe.transformer.config.patch_size, pipe.device.type
        (4, 'cpu')
    """
    return _shapes._load_pipeline(
        path,
        device,
        dtype,
        world="scenes",
        weights_dir=WEIGHTS_DIR,
        pipeline_class=ScenesPipeline,
        written_by=f"ScenesPipeline.save_pretrained or {TRAIN_SCRIPT}",
        config_name=CONFIG_NAME,
        packaged_config=CONFIG_PATH,
        build=build_scenes_pipeline,
        script=TRAIN_SCRIPT,
        pipeline_name="ScenesPipeline",
    )
