"""Build, save and load the embedded shapes model."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from .pipeline import ShapesPipeline
from .text_encoder import ShapesTextEncoder
from .tokenizer import ShapesTokenizer

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_PATH = PACKAGE_DIR / "shapes_config.json"
WEIGHTS_DIR = PACKAGE_DIR / "weights"
CONFIG_NAME = "shapes_config.json"
COMPONENTS = ("transformer", "text_encoder")
MAX_SHARD_BYTES = 15 * 2**20  # shards stay under 16 MiB (the device tool's per-file limit)


def default_config() -> dict[str, Any]:
    """The architecture of the shipped model (``shapes_config.json``): a dict with the keys ``transformer``,
    ``text_encoder``, ``tokenizer`` and ``scheduler``, each the keyword arguments of that component's class.

    Example:
        >>> default_config()["transformer"]["patch_size"]
        4
    """
    with open(CONFIG_PATH) as f:
        return json.load(f)


def _heads_for(hidden_size: int) -> int:
    for heads in (hidden_size // 64, 4, 3, 2, 1):
        if heads >= 1 and hidden_size % heads == 0:
            return heads
    return 1


def build_shapes_pipeline(
    config: dict[str, Any], pipeline_class: type = ShapesPipeline, tokenizer_class: type = ShapesTokenizer
) -> ShapesPipeline:
    """Instantiate the pipeline (random weights, diffusers' default initialisation) from a full config dict.

    ``pipeline_class`` / ``tokenizer_class`` let another embedded world (scenes) reuse this construction.
    """
    t_cfg = dict(config["transformer"])
    e_cfg = dict(config["text_encoder"])
    inner = t_cfg["num_attention_heads"] * t_cfg["attention_head_dim"]
    if t_cfg["caption_projection_dim"] != inner:
        raise ValueError(
            f"caption_projection_dim ({t_cfg['caption_projection_dim']}) must equal num_attention_heads x "
            f"attention_head_dim ({inner}): SD3's joint blocks add text and image streams of the same width. "
            "Leave caption_projection_dim out to have it follow."
        )
    if (e_cfg["joint_attention_dim"], e_cfg["pooled_projection_dim"]) != (
        t_cfg["joint_attention_dim"],
        t_cfg["pooled_projection_dim"],
    ):
        raise ValueError(
            "text_encoder joint_attention_dim / pooled_projection_dim "
            f"({e_cfg['joint_attention_dim']}, {e_cfg['pooled_projection_dim']}) must match the transformer's "
            f"({t_cfg['joint_attention_dim']}, {t_cfg['pooled_projection_dim']})."
        )
    tokenizer = tokenizer_class(**config.get("tokenizer", {}))
    if e_cfg["vocab_size"] != tokenizer.vocab_size or e_cfg["max_length"] != tokenizer.config.max_length:
        raise ValueError(
            f"text_encoder vocab_size/max_length ({e_cfg['vocab_size']}, {e_cfg['max_length']}) must match the "
            f"tokenizer ({tokenizer.vocab_size}, {tokenizer.config.max_length})."
        )
    t_cfg["dual_attention_layers"] = tuple(t_cfg.get("dual_attention_layers", ()))
    return pipeline_class(
        transformer=SD3Transformer2DModel(**t_cfg),
        scheduler=FlowMatchEulerDiscreteScheduler(**config.get("scheduler", {})),
        text_encoder=ShapesTextEncoder(**e_cfg),
        tokenizer=tokenizer,
    )


def _with_transformer_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``config`` with the transformer ``overrides`` applied (TypeError naming unknown ones);
    ``caption_projection_dim`` follows heads x head dim unless overridden. Shared with the scenes model."""
    config = copy.deepcopy(config)
    t_cfg = config["transformer"]
    unknown = sorted(set(overrides) - set(t_cfg))
    if unknown:
        raise TypeError(
            f"unknown transformer override(s) {unknown}; SD3Transformer2DModel arguments are {sorted(t_cfg)}."
        )
    t_cfg.update(overrides)
    if "caption_projection_dim" not in overrides:
        t_cfg["caption_projection_dim"] = t_cfg["num_attention_heads"] * t_cfg["attention_head_dim"]
    return config


def _build_seeded(build, config: dict[str, Any], seed: int):
    """``build(config)`` with the initialisation seeded by ``seed`` (the global RNG state left untouched), in eval
    mode. Shared with the scenes model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = build(config)
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    return pipe


def random_config(text_encoder_overrides: dict[str, Any] | None = None, **transformer_overrides) -> dict[str, Any]:
    """The shipped config with transformer overrides applied; dependent sizes follow unless overridden.

    ``caption_projection_dim`` follows ``num_attention_heads * attention_head_dim``, ``pos_embed_max_size`` follows
    ``sample_size // patch_size``, and the text encoder's output dims follow ``joint_attention_dim`` /
    ``pooled_projection_dim`` (its width follows ``joint_attention_dim`` when that is overridden).
    """
    config = _with_transformer_overrides(default_config(), transformer_overrides)
    t_cfg = config["transformer"]
    if "pos_embed_max_size" not in transformer_overrides:
        t_cfg["pos_embed_max_size"] = max(1, t_cfg["sample_size"] // t_cfg["patch_size"])
    e_cfg = config["text_encoder"]
    e_cfg["joint_attention_dim"] = t_cfg["joint_attention_dim"]
    e_cfg["pooled_projection_dim"] = t_cfg["pooled_projection_dim"]
    if "joint_attention_dim" in transformer_overrides:
        e_cfg["hidden_size"] = t_cfg["joint_attention_dim"]
        e_cfg["num_heads"] = _heads_for(e_cfg["hidden_size"])
    e_cfg.update(text_encoder_overrides or {})
    return config


def build_random_shapes_pipeline(
    seed: int = 0, text_encoder_overrides: dict[str, Any] | None = None, **transformer_overrides
) -> ShapesPipeline:
    """The shipped architecture (or a resized one) with random weights, for tests. Fast; never reads weights.

    Args:
        seed: seeds the initialisation (the global RNG state is left untouched).
        text_encoder_overrides: keyword arguments for ``ShapesTextEncoder`` (e.g. ``{"num_layers": 1}``).
        **transformer_overrides: ``SD3Transformer2DModel`` arguments, e.g. ``num_layers=2, attention_head_dim=8,
            num_attention_heads=2``; ``caption_projection_dim``, ``pos_embed_max_size`` and the text encoder's
            output dims follow unless given.

    Example:
        >>> pipe = build_random_shapes_pipeline(num_layers=2, attention_head_dim=8, num_attention_heads=2)
        >>> pipe.transformer.config.caption_projection_dim, len(pipe.transformer.transformer_blocks)
        (16, 2)
    """
    return _build_seeded(build_shapes_pipeline, random_config(text_encoder_overrides, **transformer_overrides), seed)


def _component_files(directory: Path, component: str) -> list[Path]:
    single = directory / f"{component}.safetensors"
    if single.is_file():
        return [single]
    return sorted(directory.glob(f"{component}-*-of-*.safetensors"))


def _load_state(
    directory: Path, component: str, script: str = "scripts/train_shapes.py", pipeline_name: str = "ShapesPipeline"
) -> dict[str, torch.Tensor]:
    files = _component_files(directory, component)
    if not files:
        raise FileNotFoundError(
            f"missing weights file {directory / (component + '.safetensors')} (or its shards "
            f"{component}-*-of-*.safetensors). Reinstall catprune, or pass path= a folder written by "
            f"{pipeline_name}.save_pretrained or {script}."
        )
    if len(files) > 1 or files[0].name != f"{component}.safetensors":
        total = int(files[0].stem.rsplit("-of-", 1)[1])
        for k in range(1, total + 1):
            shard = directory / f"{component}-{k:05d}-of-{total:05d}.safetensors"
            if not shard.is_file():
                raise FileNotFoundError(
                    f"missing weights file {shard} (shard {k} of {total}). Reinstall catprune, or re-create the "
                    f"folder with {script}."
                )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as err:  # safetensors raises its own error types for truncated or garbled files
            raise ValueError(
                f"corrupt weights file {file}: {err}. Reinstall catprune or re-create the file with {script}."
            ) from err
    return state


def save_flat_weights(
    pipe: ShapesPipeline,
    directory: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
    config_name: str = CONFIG_NAME,
) -> list[Path]:
    """Write the shipped layout: ``shapes_config.json`` (``config_name``) plus ``transformer[-k-of-n].safetensors``
    and ``text_encoder.safetensors`` in ``dtype`` (shards of at most 15 MiB). Returns the files written.

    Example:
        >>> import tempfile
        >>> pipe = build_random_shapes_pipeline(num_layers=1, attention_head_dim=8, num_attention_heads=2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     files = save_flat_weights(pipe, d)
        ...     again = load_shapes_pipeline(d)
        >>> sorted(f.name for f in files)
        ['shapes_config.json', 'text_encoder.safetensors', 'transformer.safetensors']
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    config = {
        "transformer": {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")},
        "text_encoder": {k: v for k, v in pipe.text_encoder.config.items() if not k.startswith("_")},
        "tokenizer": {"max_length": pipe.tokenizer.config.max_length},
        "scheduler": {k: pipe.scheduler.config[k] for k in ("num_train_timesteps", "shift")},
    }
    config["transformer"]["dual_attention_layers"] = list(config["transformer"]["dual_attention_layers"])
    with open(directory / config_name, "w") as f:
        json.dump(config, f, indent=2)
    written.append(directory / config_name)
    for component in COMPONENTS:
        for old in _component_files(directory, component):
            old.unlink()
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in getattr(pipe, component).state_dict().items()}
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, value in state.items():
            nbytes = value.numel() * value.element_size()
            if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][key] = value
            size += nbytes
        for k, shard in enumerate(shards):
            name = (
                f"{component}.safetensors"
                if len(shards) == 1
                else f"{component}-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            save_file(shard, str(directory / name))
            written.append(directory / name)
    return written


def _load_flat(
    directory: Path,
    device,
    dtype,
    config_name: str = CONFIG_NAME,
    packaged_config: Path = CONFIG_PATH,
    build=build_shapes_pipeline,
    script: str = "scripts/train_shapes.py",
    pipeline_name: str = "ShapesPipeline",
) -> ShapesPipeline:
    # A training output folder carries its own config json; the shipped weights folder uses the packaged one.
    config_path = directory / config_name if (directory / config_name).is_file() else packaged_config
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"corrupt config file {config_path}: {err}.") from err
    with torch.device("meta"):
        pipe = build(config)
    for component in COMPONENTS:
        module = getattr(pipe, component)
        state = {
            k: v.to(device=device, dtype=dtype)
            for k, v in _load_state(directory, component, script, pipeline_name).items()
        }
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise ValueError(
                f"weights in {directory} do not fit the {component} architecture of {config_path}: {err}"
            ) from err
    # Buffers that are not saved (none today) would still be on the meta device; fail loudly if so.
    for component in COMPONENTS:
        for name, tensor in list(getattr(pipe, component).named_parameters()) + list(
            getattr(pipe, component).named_buffers()
        ):
            if tensor.is_meta:
                raise ValueError(f"{component}.{name} was not found in the weights under {directory}.")
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    return pipe


def load_shapes_pipeline(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ShapesPipeline:
    """Load the embedded shapes model: the shipped weights (``path=None``) or a saved folder.

    ``path`` may be a folder written by ``ShapesPipeline.save_pretrained`` (has ``model_index.json``) or one in the
    shipped layout written by ``save_flat_weights`` / ``scripts/train_shapes.py``.

    Raises:
        FileNotFoundError: the folder or a weights file is missing (the message names the path).
        ValueError: a weights or config file is corrupt or does not fit the architecture (names the path).

    Example:
        >>> pipe = load_shapes_pipeline()
        >>> pipe.transformer.config.patch_size, pipe.device.type
        (4, 'cpu')
    """
    return _load_pipeline(path, device, dtype)


def _load_pipeline(
    path: str | os.PathLike | None,
    device,
    dtype,
    world: str = "shapes",
    weights_dir: Path = WEIGHTS_DIR,
    pipeline_class: type = ShapesPipeline,
    written_by: str = "ShapesPipeline.save_pretrained",
    **flat,
):
    """The shipped weights (``path=None``), a ``save_pretrained`` folder or one in the shipped layout
    (``_load_flat(directory, device, dtype, **flat)``). Shared with the scenes model."""
    directory = weights_dir if path is None else Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{world} model folder {directory} does not exist; pass path=None for the shipped weights or a folder "
            f"written by {written_by}."
        )
    if (directory / "model_index.json").is_file():
        pipe = pipeline_class.from_pretrained(str(directory), dtype=dtype)
        return pipe.to(device)
    return _load_flat(directory, device, dtype, **flat)
