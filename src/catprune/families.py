"""One record per supported model family: where its adapter, tiny test model, benchmark driver and presets live.

Adding a family is one adapter module (``catprune/adapters/<family>.py``), one record here, one entry per preset in
``catprune/models/model_configs.json``, and the family's own tests (the shared contract suite in
``tests/test_contract.py`` runs over every record). Records name their parts by import path, so reading this table
imports nothing: the adapter registry imports an adapter module only when a model of its class is pruned.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyRecord:
    """Where one model family's parts live (``"module:attribute"`` paths, imported on use)."""

    name: str  # short name, e.g. "sd3"
    transformer_class: str  # diffusers class name the adapter registry matches (along the model's MRO)
    label: str  # human-readable family name
    adapter: str  # the `catprune.runtime.Adapter` implementation
    tiny: str  # a `catprune.models.testing.TinyFamily`: tiny random model + sampling loop (tests, examples)
    bench: str  # a `catprune.bench.families.Family`: build / inputs / decode of the stock pipeline
    presets: tuple[str, ...] = ()  # preset names in models/model_configs.json (and the bench's tiny presets)


FAMILIES: tuple[FamilyRecord, ...] = (
    FamilyRecord(
        "sd3",
        "SD3Transformer2DModel",
        "SD3 / SD3.5",
        "catprune.adapters.sd3:SD3Adapter",
        "catprune.models.testing:TinySD3",
        "catprune.bench.families:SD3",
        ("sd3-medium", "sd3.5-medium", "sd3.5-large", "sd3-tiny"),
    ),
    FamilyRecord(
        "pixart",
        "PixArtTransformer2DModel",
        "PixArt-Sigma / PixArt-Alpha",
        "catprune.adapters.pixart:PixArtAdapter",
        "catprune.models.testing:TinyPixArt",
        "catprune.bench.families:PIXART",
        ("pixart-sigma-1024", "pixart-tiny"),
    ),
    FamilyRecord(
        "flux",
        "FluxTransformer2DModel",
        "Flux",
        "catprune.adapters.flux:FluxAdapter",
        "catprune.models.testing:TinyFlux",
        "catprune.bench.families:FLUX",
        ("flux-dev", "flux-tiny"),
    ),
)


def load(path: str):
    """The object at ``"module:attribute"`` (imports the module).

    Example:
        >>> load("catprune.families:FAMILIES")[0].name
        'sd3'
    """
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def family_named(name: str) -> FamilyRecord:
    """The record of family ``name``; ValueError listing the known names otherwise.

    Example:
        >>> family_named("flux").transformer_class
        'FluxTransformer2DModel'
    """
    for record in FAMILIES:
        if record.name == name:
            return record
    known = ", ".join(r.name for r in FAMILIES)
    raise ValueError(f"catprune.families: name: expected one of {known}, got {name!r}. Add a FamilyRecord first.")
