"""The contract between the generic runtime and a model-family adapter.

`runtime/` defines it and drives it; `adapters/` implements it. Nothing here imports diffusers or an adapter.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..algorithm import copy_tokens_, is_scaled
from ..kernels import advance_kv_rows_, forecast_kv_, scatter_rows_, write_step_kv_
from .lowprec import SCALE, KVWriter, attend_low_precision

if TYPE_CHECKING:
    from .forecast import ContextForecast

PREV = ".prev"  # suffix of a K/V cache's K0 copy (Context.EXTRAPOLATE) in its block's store


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
        """Shape signature: a change means the buffers must be rebuilt (and a new generation starts)."""
        return (self.batch, self.grid, self.text_tokens, self.device, self.dtype)


class BufferStore:
    """Named persistent tensors, allocated once per (shape, dtype, device) and then written in place.

    The runtime keeps one store per block for the K/V caches and one for its own per-generation tensors; CUDA graphs
    captured over them keep pointing at the same memory across generations. One argument order everywhere:
    ``(name, shape, dtype, device)``, the order of ``torch.empty(shape, dtype=..., device=...)``.

    Example:
        >>> store = BufferStore()
        >>> store.buffer("kv", (2, 3), torch.float32, "cpu").shape
        torch.Size([2, 3])
        >>> store.put("idx", torch.arange(4)).tolist(), store.nbytes()
        ([0, 1, 2, 3], 56)
    """

    def __init__(self, forecast=None, storage: torch.dtype | None = None):
        self.tensors: dict[str, torch.Tensor] = {}
        self.forecast = forecast  # the signature's shared `ContextForecast` when a block cache forecasts, else None
        self.storage = storage  # K/V cache storage dtype (CATConfig.cache_dtype), None: the compute dtype
        self.compute: dict[str, torch.dtype] = {}  # compute dtype of each low-precision K/V cache

    def buffer(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """The buffer ``name``, allocated (uninitialised) when missing or of another shape, dtype or device."""
        buf = self.tensors.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != torch.device(device):
            buf = self.tensors[name] = torch.empty(tuple(shape), dtype=dtype, device=device)
        return buf

    def put(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Copy ``value`` into the buffer ``name`` (allocated on first use) and return the buffer."""
        return self.buffer(name, value.shape, value.dtype, value.device).copy_(value)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor | None:
        """The buffer ``name`` or None when it was never allocated."""
        return self.tensors.get(name)

    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def kv_buffer(
        self, name: str, shape, dtype: torch.dtype, device, image_tokens: int | None = None
    ) -> torch.Tensor | KVWriter:
        """The K/V cache ``name`` (2, B, M [+ T], H, hd) a capture fills (through `write_image_kv`): the buffer
        itself, or a `KVWriter` into low-precision storage when the store's ``storage`` dtype is narrower than the
        compute ``dtype`` (a storage as wide as ``dtype`` would save nothing: the buffer is used). The storage
        (2, B, M, H, hd) of the ``image_tokens`` M (default: every row of ``shape``) and its per-token scales are
        allocated here, so a full-selection capture step (`Runtime._full_selection`) can write them in place."""
        if self.storage is None or self.storage.itemsize >= dtype.itemsize:
            return self.buffer(name, shape, dtype, device)
        self.compute[name] = dtype
        image = (*shape[:2], shape[2] if image_tokens is None else image_tokens, *shape[3:])  # (2, B, M, H, hd)
        self.buffer(name, image, self.storage, device)
        if is_scaled(self.storage):
            self.buffer(name + SCALE, (*image[:3], 1, 1), torch.float32, device)  # (2, B, M, 1, 1)
        return KVWriter(self, name)

    def kv_names(self) -> list[str]:
        """Names of the K/V caches of a block store (not their K0 copies or scales)."""
        return [name for name in self.tensors if not name.endswith((PREV, SCALE))]

    def slot(self, name: str) -> KVSlot | None:
        """What `cached_attention` reads and writes for a block's attention ``name``; None when it has none."""
        kv = self.tensors.get(name)
        if kv is None:
            return None
        prev = self.tensors.get(name + PREV) if self.forecast is not None else None
        forecast = self.forecast if prev is not None else None
        if name not in self.compute:
            return KVSlot(kv, prev, forecast)
        scale, prev_scale = self.tensors.get(name + SCALE), self.tensors.get(name + SCALE + PREV)
        return KVSlot(kv, prev, forecast, scale, prev_scale, self.compute[name])


@dataclass
class KVSlot:
    """One attention's cache in one block: ``kv`` (K1, image tokens first, text tail), ``prev`` (K0 of the image
    tokens, (2, B, M, H, hd)) and the shared forecast; ``prev`` / ``forecast`` None: plain reuse. A low-precision
    cache (``compute`` set) has no tail, per-token ``scale`` / ``prev_scale`` (2, B, M, 1, 1) for 8-bit storage,
    and is rebuilt in ``compute`` dtype at use (`lowprec.attend_low_precision`)."""

    kv: torch.Tensor
    prev: torch.Tensor | None = None
    forecast: ContextForecast | None = None
    scale: torch.Tensor | None = None
    prev_scale: torch.Tensor | None = None
    compute: torch.dtype | None = None

    def attend_kv(self, idx: torch.Tensor, image, text=None) -> torch.Tensor:
        """Write this step's fresh (B, k, H, hd) image K/V at ``idx`` (B, k) and (B, T, H, hd) text K/V; return the
        (2, B, M [+ T], H, hd) keys/values the step attends to: the cache itself (reuse, and a full-selection step
        of the forecast) or the working buffer holding the forecast of the unselected tokens and the fresh values of
        the others (extrapolate)."""
        if self.compute is not None:
            return attend_low_precision(self, idx, image, text)
        kv = self.kv
        m = kv.shape[2] - (text[0].shape[1] if text is not None else 0)
        if self.forecast is None:
            if write_step_kv_(kv, idx, image, text):  # one launch on CUDA
                return kv
            scatter_rows_(kv[0, :, :m], idx, image[0])  # (B, M, H, hd) fresh keys of the selected tokens
            scatter_rows_(kv[1, :, :m], idx, image[1])
            out = kv
        elif idx.shape[1] == m:  # every token computed (a full-selection step): K0 <- K1, K1 <- fresh, attend to K1
            advance_kv_rows_(kv[:, :, :m], self.prev, idx, image)
            out = kv
        else:  # K0 <- K1, K1 <- fresh at idx; the forecast of the others (ratio 0 at idx: fresh) into `out`
            f, out = self.forecast, self.forecast.working(kv)  # out: (2, B, M [+ T], H, hd)
            forecast_kv_(kv[:, :, :m], self.prev, out[:, :, :m], f.ratio, idx, image, f.computed)
        if text is not None:
            copy_tokens_(out[0, :, m:], text[0])  # (B, T, H, hd)
            copy_tokens_(out[1, :, m:], text[1])
        return out


def write_image_kv(buf: torch.Tensor | KVWriter, j: int, values: torch.Tensor) -> None:
    """A capture's write of a dense step's (B, M, H, hd) image keys (``j`` 0) or values (1) into the cache
    ``buf`` from `BufferStore.kv_buffer`: rows ``:M`` of the buffer, or quantised into low-precision storage."""
    if isinstance(buf, KVWriter):
        buf.write_(j, values)
    else:
        buf[j, :, : values.shape[1]].copy_(values)


class Adapter(abc.ABC):
    """One model family: how to read a call, how to run a pruned step, how to count MACs.

    Implementations live in `catprune.adapters` (one module per family) and are found through its lazy registry by
    the transformer's class name. ``memo`` arguments are a dict owned by the current `Generation`: an adapter keeps
    what it remembers between calls there, never on itself, so that `reset` forgets it.
    """

    #: transformer classes this adapter handles (checked with isinstance once the registry imported the module)
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
        """How many K/V `BufferStore` objects a generation needs (one per block that attends over image tokens)."""
        return len(self.model.transformer_blocks)

    def validate_model(self) -> None:
        """Raise ValueError/TypeError if this model instance cannot be pruned (checked at apply time)."""
        return None

    def is_auxiliary(self, info: CallInfo) -> bool:
        """True for an extra call within a step (e.g. skip-layer guidance): run dense, leave the state alone."""
        return False

    @abc.abstractmethod
    def inspect_call(self, args, kwargs, memo: dict | None = None) -> CallInfo:
        """Read and validate one call's inputs; raise ValueError naming the argument if it cannot be pruned."""

    @abc.abstractmethod
    def output_tokens(self, output, info: CallInfo) -> torch.Tensor:
        """The per-token output n (B, M, P) from the transformer's own return value."""

    @abc.abstractmethod
    def unpatchify(self, tokens: torch.Tensor, info: CallInfo) -> torch.Tensor:
        """The output sample (e.g. (B, C, H, W)) from per-token outputs (B, M, P); never the argument itself."""

    @abc.abstractmethod
    def wrap_sample(self, sample: torch.Tensor, info: CallInfo):
        """The transformer's return value around an output sample."""

    def build_output(self, tokens: torch.Tensor, info: CallInfo):
        """The transformer's return value from per-token outputs (B, M, P)."""
        return self.wrap_sample(self.unpatchify(tokens, info), info)

    @abc.abstractmethod
    def capture(self, caches: list[BufferStore], info: CallInfo):
        """Context manager: during a dense forward, fill the per-block K/V caches. Leaves no hooks behind."""

    @abc.abstractmethod
    def pruned_forward(self, caches: list[BufferStore], idx: torch.Tensor, info: CallInfo) -> torch.Tensor:
        """Run one pruned step over the (B, k) selected image tokens; return their outputs (B, k, P)."""

    def fast_inputs(self, info: CallInfo) -> dict[str, torch.Tensor] | None:
        """The call's tensor inputs for the compiled / graphed path, or None if the call needs the eager path."""
        return None

    #: the `fast_inputs` the modulation vectors depend on ("timestep" first); empty: the adapter's pruned step
    #: computes them itself and takes no ``modulation`` input (docs/design.md decision 40)
    modulation_inputs: tuple[str, ...] = ()

    def modulation_rows(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Every modulation vector for N rows of the ``modulation_inputs`` (N rows each), concatenated: (N, W). A
        pruned step's ``modulation`` input is one step's B rows of it."""
        raise NotImplementedError

    def scheduled_timesteps(self, timesteps: torch.Tensor, info: CallInfo) -> torch.Tensor:
        """The transformer's ``timestep`` input (n, B) at the scheduler's ``timesteps`` (n,), as this family's
        pipelines pass it."""
        raise NotImplementedError

    def dense_fn(self, original):
        """A function of the `fast_inputs` tensors returning the dense output sample (for compile / graphs)."""
        raise NotImplementedError

    def pruned_fn(self, caches: list[BufferStore], info: CallInfo):
        """A function ``(idx, **fast_inputs) -> (B, k, P)`` of one pruned step (for compile / graphs)."""
        raise NotImplementedError

    @abc.abstractmethod
    def macs(self, info: CallInfo, computed_tokens: int) -> int:
        """Analytic multiply-accumulates of one call when ``computed_tokens`` image tokens per row are computed."""
