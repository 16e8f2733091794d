"""Model-family adapters, looked up lazily by the transformer's class name.

`REGISTRY` maps a transformer class name to the module and class of its adapter; the module (and with it the
diffusers transformer module it needs) is imported only when a model of that class is passed to `adapter_for`, so
``import catprune`` imports no diffusers transformer. The table is read from the family records
(`catprune.families`): adding a family is one adapter module plus one record there.
"""

from __future__ import annotations

import importlib

import torch

from ..families import FAMILIES
from ..runtime.contract import Adapter, BufferStore, CallInfo

#: transformer class name -> (adapter module, adapter class, family shown in errors)
REGISTRY: dict[str, tuple[str, str, str]] = {r.transformer_class: (*r.adapter.split(":"), r.label) for r in FAMILIES}


def supported_models() -> list[str]:
    """Names of the transformer classes catprune can prune, with their family.

    Example:
        >>> supported_models()[0]
        'SD3Transformer2DModel (SD3 / SD3.5)'
    """
    return [f"{name} ({family})" for name, (_, _, family) in REGISTRY.items()]


def adapter_class(model: torch.nn.Module) -> type[Adapter] | None:
    """The adapter class for ``model`` (matched by class name along its MRO, then checked with isinstance), or None.

    Example:
        >>> adapter_class(torch.nn.Linear(2, 2)) is None
        True
    """
    for cls in type(model).__mro__:
        entry = REGISTRY.get(cls.__name__)
        if entry is None:
            continue
        adapter_cls = getattr(importlib.import_module(entry[0]), entry[1])
        if isinstance(model, adapter_cls.model_classes):
            return adapter_cls
    return None


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter for ``model``; TypeError naming the class and the supported ones otherwise.

    Example:
        >>> adapter_for(torch.nn.Linear(2, 2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: catprune: unsupported model class Linear. Supported transformers: ...
    """
    adapter_cls = adapter_class(model)
    if adapter_cls is None:
        raise TypeError(
            f"catprune: unsupported model class {type(model).__name__}. Supported transformers: "
            f"{', '.join(supported_models())}. Pass a pipeline whose .transformer is one of these, or the transformer."
        )
    return adapter_cls(model)


__all__ = ["REGISTRY", "Adapter", "BufferStore", "CallInfo", "adapter_class", "adapter_for", "supported_models"]
