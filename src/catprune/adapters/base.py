"""What a model-family adapter provides to the generic runtime."""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class CallInfo:
    """What the runtime needs to know about one transformer call, read before anything is modified."""

    arguments: dict[str, Any]  # the call's arguments by name (self excluded)
    batch: int  # B, rows in the batch (CFG rows included)
    grid: tuple[int, int]  # (h, w) image-token grid
    text_tokens: int  # T
    timestep: torch.Tensor  # (B,) or scalar
    device: torch.device
    dtype: torch.dtype

    @property
    def num_tokens(self) -> int:
        """M, image tokens per row."""
        return self.grid[0] * self.grid[1]

    @property
    def signature(self) -> tuple:
        """Shape signature: a change means the caches must be rebuilt."""
        return (self.batch, self.grid, self.text_tokens, self.device, self.dtype)


class LayerCache:
    """Per-block K/V cache of image tokens.

    ``kv[name]`` is a ``(2, B, M + T_extra, H, head_dim)`` buffer: K and V of every image token at its last
    computation, followed by ``T_extra`` slots that the pruned step fills with this step's text keys/values so that
    attention reads one buffer without concatenating.
    """

    def __init__(self):
        self.kv: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
        """The buffer ``name``, allocated (uninitialised) when missing or of another shape, device or dtype."""
        buf = self.kv.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.device != torch.device(device) or buf.dtype != dtype:
            buf = self.kv[name] = torch.empty(tuple(shape), device=device, dtype=dtype)
        return buf

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv.values())


class Adapter(abc.ABC):
    """One model family: how to read a call, how to run a pruned step, how to count MACs.

    Subclasses are registered in `catprune.adapters.ADAPTERS` and looked up by the transformer's class.
    """

    #: transformer classes this adapter handles (checked with isinstance)
    model_classes: tuple[type, ...] = ()
    #: human-readable family name
    family: str = ""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._signature = inspect.signature(type(model).forward)

    def bind(self, args, kwargs) -> dict[str, Any]:
        """The call's arguments by name, defaults filled in."""
        bound = self._signature.bind(self.model, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self", None)
        return arguments

    def num_caches(self) -> int:
        """How many `LayerCache` objects a generation needs (one per block that attends over image tokens)."""
        return len(self.model.transformer_blocks)

    def validate_model(self) -> None:
        """Raise ValueError/TypeError if this model instance cannot be pruned (checked at apply time)."""
        return None

    def is_auxiliary(self, info: CallInfo) -> bool:
        """True for an extra call within a step (e.g. skip-layer guidance): run dense, leave the state alone."""
        return False

    @abc.abstractmethod
    def inspect_call(self, args, kwargs) -> CallInfo:
        """Read and validate one call's inputs; raise ValueError naming the argument if it cannot be pruned."""

    @abc.abstractmethod
    def output_tokens(self, output, info: CallInfo) -> torch.Tensor:
        """The per-token output n (B, M, P) from the transformer's own return value."""

    @abc.abstractmethod
    def unpatchify(self, tokens: torch.Tensor, info: CallInfo) -> torch.Tensor:
        """The output sample (e.g. (B, C, H, W)) from per-token outputs (B, M, P)."""

    def build_output(self, tokens: torch.Tensor, info: CallInfo):
        """The transformer's return value from per-token outputs (B, M, P)."""
        return self.wrap_sample(self.unpatchify(tokens, info), info)

    @abc.abstractmethod
    def capture(self, caches: list[LayerCache], info: CallInfo):
        """Context manager: during a dense forward, fill the per-block K/V caches. Leaves no hooks behind."""

    @abc.abstractmethod
    def pruned_forward(self, caches: list[LayerCache], idx: torch.Tensor, info: CallInfo) -> torch.Tensor:
        """Run one pruned step over the (B, k) selected image tokens; return their outputs (B, k, P)."""

    def fast_inputs(self, info: CallInfo) -> dict[str, torch.Tensor] | None:
        """The call's tensor inputs for the compiled / graphed path, or None if the call needs the eager path."""
        return None

    def dense_fn(self, original):
        """A function of the `fast_inputs` tensors returning the dense output sample (for compile / graphs)."""
        raise NotImplementedError

    def pruned_fn(self, caches: list[LayerCache], info: CallInfo):
        """A function ``(idx, **fast_inputs) -> (B, k, P)`` of one pruned step (for compile / graphs)."""
        raise NotImplementedError

    def wrap_sample(self, sample: torch.Tensor, info: CallInfo):
        """The transformer's return value around an output sample."""
        raise NotImplementedError

    @abc.abstractmethod
    def macs(self, info: CallInfo, computed_tokens: int) -> int:
        """Analytic multiply-accumulates of one call when ``computed_tokens`` image tokens per row are computed."""
