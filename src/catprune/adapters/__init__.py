"""Model-family adapters, looked up by the transformer's class."""

from __future__ import annotations

import torch

from .base import Adapter, CallInfo, LayerCache
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sd3 import SD3Adapter

#: registered adapters, most specific first
ADAPTERS: list[type[Adapter]] = [SD3Adapter, PixArtAdapter, FluxAdapter]


def supported_models() -> list[str]:
    """Names of the transformer classes catprune can prune, with their family."""
    return [f"{cls.__name__} ({a.family})" for a in ADAPTERS for cls in a.model_classes]


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter for ``model``; TypeError naming the class and the supported ones otherwise."""
    for adapter_cls in ADAPTERS:
        if isinstance(model, adapter_cls.model_classes):
            return adapter_cls(model)
    raise TypeError(
        f"catprune: unsupported model class {type(model).__name__}. Supported transformers: "
        f"{', '.join(supported_models())}. Pass a pipeline whose .transformer is one of these, or the transformer."
    )


__all__ = ["ADAPTERS", "Adapter", "CallInfo", "LayerCache", "adapter_for", "supported_models"]
