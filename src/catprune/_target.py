"""What catprune's functions act on: the transformer of a pipeline, or a transformer itself."""

from __future__ import annotations

import torch


def resolve_model(obj, fn: str) -> tuple[torch.nn.Module, object]:
    """(transformer, pipeline or None) from a pipeline or a transformer; TypeError naming ``catprune.<fn>``
    otherwise."""
    if isinstance(obj, torch.nn.Module):
        model, pipe = obj, None
    elif isinstance(getattr(obj, "transformer", None), torch.nn.Module):
        model, pipe = obj.transformer, obj
    else:
        raise TypeError(
            f"catprune.{fn}: pipe_or_transformer: expected a diffusers pipeline with a .transformer or a "
            f"transformer nn.Module, got {type(obj).__name__}. Pass e.g. a StableDiffusion3Pipeline."
        )
    return getattr(model, "_orig_mod", model), pipe  # see through torch.compile's OptimizedModule
