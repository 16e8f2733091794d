"""Per-model evaluation plug-ins: how to load the pipeline, which held-out prompts to use, how to score adherence.

An `EvalModel` bundles what ``catprune eval --model NAME`` needs to know about a model:

- ``load(model, device, dtype)``: the pipeline (``model`` is the ``--model`` value; the default loader is
  ``catprune.models.load_pipeline``);
- ``prompts(n, seed)``: the model's held-out prompts (None: the user passes a prompt file);
- ``adherence(images, prompts)``: a per-image prompt-adherence scorer (None: no adherence scores), returning
  ``{"summary": {...}, "per_image": {...}}``; the summary keys named in ``adherence_keys`` are the rates that the
  "keeps adherence" comparison of the report checks (each in [0, 1]);
- ``learned_metrics``: whether CLIP score and FID apply (models of natural images; off for procedural ones).

``shapes`` (the embedded model, scored by `catprune.evaluation.adherence`) is registered here; any other name is a
hub id or a local pipeline folder, loaded by ``catprune.models.load_pipeline`` and scored without adherence.

Example:
    >>> resolve("shapes").adherence_keys
    ('colour_at_cell', 'shape')
    >>> m = resolve("stabilityai/stable-diffusion-3-medium-diffusers")
    >>> m.prompts is None, m.adherence is None, m.learned_metrics
    (True, True, True)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

#: A scorer's result: ``{"summary": {name: value}, "per_image": {name: [value per image]}}``.
AdherenceScores = dict

Loader = Callable[[str, str, torch.dtype], object]
PromptGenerator = Callable[[int, int], list[str]]
AdherenceScorer = Callable[[torch.Tensor, Sequence[str]], AdherenceScores]


@dataclass(frozen=True)
class EvalModel:
    """What the evaluation needs to know about one model (see the module docstring).

    Attributes:
        name: the ``--model`` value.
        load: ``load(model, device, dtype) -> pipeline`` (default: ``catprune.models.load_pipeline``).
        prompts: ``prompts(n, seed) -> list[str]`` of held-out prompts, or None (a prompt file is required).
        adherence: ``adherence(images (N, 3, H, W) in [0, 1], prompts) -> AdherenceScores``, or None.
        adherence_keys: the summary rates of ``adherence`` that the report's adherence comparison checks.
        learned_metrics: use CLIP score and FID (when their weights are cached locally).
        matches: optional ``matches(model) -> bool`` for other ``--model`` values this entry handles (a saved
            pipeline folder of the same class, say).
        held_out_seed: the seed of the model's held-out prompt set: ``prompts(n, held_out_seed)`` is what an
            evaluation uses unless ``--prompt-seed`` says otherwise.
    """

    name: str
    load: Loader | None = None
    prompts: PromptGenerator | None = None
    adherence: AdherenceScorer | None = None
    adherence_keys: tuple[str, ...] = ()
    learned_metrics: bool = False
    matches: Callable[[str], bool] | None = None
    held_out_seed: int | None = None


_REGISTRY: dict[str, EvalModel] = {}


def register(model: EvalModel, replace: bool = False) -> EvalModel:
    """Make ``model`` available as ``--model model.name``; returns it.

    Raises:
        ValueError: when the name is taken and ``replace`` is False.

    Example:
        >>> m = register(EvalModel("tiny-test"), replace=True)
        >>> resolve("tiny-test") is m
        True
    """
    if not isinstance(model, EvalModel):
        raise TypeError(f"register: model: expected an EvalModel, got {type(model).__name__}.")
    if model.name in _REGISTRY and not replace:
        raise ValueError(
            f"register: model: expected a new name, got {model.name!r} which is registered already. Pass "
            "replace=True to override it."
        )
    _REGISTRY[model.name] = model
    return model


def registered() -> list[str]:
    """Names of the registered models.

    Example:
        >>> "shapes" in registered()
        True
    """
    return sorted(_REGISTRY)


def resolve(model: str) -> EvalModel:
    """The `EvalModel` for a ``--model`` value: a registered name, a value an entry ``matches``, or else a generic
    hub id / local folder (loaded by ``catprune.models.load_pipeline``, prompts from a file, no adherence)."""
    if model in _REGISTRY:
        return _REGISTRY[model]
    for entry in _REGISTRY.values():
        if entry.matches is not None and entry.matches(model):
            return entry
    return EvalModel(name=model, learned_metrics=True)


def load_pipeline(model: str, device: str, dtype: torch.dtype):
    """Load the pipeline of a ``--model`` value with its entry's loader (default: catprune.models.load_pipeline)."""
    entry = resolve(model)
    if entry.load is not None:
        return entry.load(model, device, dtype)
    from .. import models  # looked up at call time, so tests can substitute load_pipeline

    return models.load_pipeline(model, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------- shapes
def _is_shapes_folder(model: str) -> bool:
    index = Path(model) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name") == "ShapesPipeline"
    except (OSError, ValueError):
        return False


def _shapes_prompts(n: int, seed: int) -> list[str]:
    from ..models.shapes.world import random_captions

    return random_captions(n, seed=seed)


def shapes_adherence(images: torch.Tensor, prompts: Sequence[str]) -> AdherenceScores:
    """Adherence of shapes images: per image the fraction of named objects found in colour at their cell and of
    the right shape; in the summary the rates over all objects, their mean (``adherence``) and the object count.

    Example:
        >>> from catprune.models.shapes.world import render_captions
        >>> captions = ["a large red circle at the center"]
        >>> shapes_adherence(render_captions(captions, seed=0), captions)["summary"]["adherence"]
        1.0
    """
    from .adherence import check_adherence

    n = len(prompts)
    report = check_adherence(images, list(prompts))
    colour, shape, objects = [0] * n, [0] * n, [0] * n
    for obj in report.objects:
        colour[obj.image_index] += int(obj.colour_at_cell)
        shape[obj.image_index] += int(obj.shape)
        objects[obj.image_index] += 1
    return {
        "summary": {
            "colour_at_cell": report.colour_at_cell,
            "shape": report.shape,
            "adherence": 0.5 * (report.colour_at_cell + report.shape),
            "num_objects": report.num_objects,
        },
        "per_image": {
            "colour_at_cell": [c / max(1, o) for c, o in zip(colour, objects, strict=True)],
            "shape": [s / max(1, o) for s, o in zip(shape, objects, strict=True)],
        },
    }


register(
    EvalModel(
        name="shapes",
        prompts=_shapes_prompts,
        adherence=shapes_adherence,
        adherence_keys=("colour_at_cell", "shape"),
        matches=_is_shapes_folder,
        held_out_seed=20_000,  # catprune.evaluation.adherence.HELD_OUT_CAPTION_SEED (checked by a test)
    )
)

# ---------------------------------------------------------------------------------------------------- scenes
def _scenes_prompts(n: int, seed: int) -> list[str]:
    from ..models.scenes.world import random_captions

    return random_captions(n, seed=seed)


def scenes_identity(images: torch.Tensor, prompts: Sequence[str]) -> AdherenceScores:
    """Identity of scenes images: per image the fraction of named objects found in their cell (top-1 among all
    object names, `catprune.evaluation.identity`); in the summary the rate over all objects and the object count.

    Example:
        >>> from catprune.models.scenes import render_captions
        >>> captions = ["a cat at the top"]
        >>> scenes_identity(render_captions(captions, seed=0), captions)["summary"]["identity_top1"]
        1.0
    """
    from .identity import check_identity

    n = len(prompts)
    report = check_identity(images, list(prompts))
    correct, objects = [0] * n, [0] * n
    for obj in report.objects:
        correct[obj.image] += int(obj.correct)
        objects[obj.image] += 1
    return {
        "summary": {"identity_top1": report.top1 if report.objects else 1.0, "objects": len(report.objects)},
        "per_image": {"identity_top1": [c / o if o else 1.0 for c, o in zip(correct, objects, strict=True)]},
    }


register(
    EvalModel(
        name="scenes",
        prompts=_scenes_prompts,
        adherence=scenes_identity,
        adherence_keys=("identity_top1",),
        held_out_seed=30_000,  # catprune.evaluation.identity.HELD_OUT_CAPTION_SEED (checked by a test)
    )
)


__all__ = [
    "AdherenceScores",
    "EvalModel",
    "load_pipeline",
    "register",
    "registered",
    "resolve",
    "scenes_identity",
    "shapes_adherence",
]
