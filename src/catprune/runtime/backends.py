"""Execution backends for static-shape steps: eager, torch.compile, CUDA graphs, or both."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..config import Backend

_STREAMS: dict[tuple[str, int], torch.cuda.Stream] = {}


def device_stream(role: str, index: int | None = None) -> torch.cuda.Stream:
    """The one stream of ``role`` on CUDA device ``index`` (default: the current device), for the process's life.

    Why one per role: cuBLAS keeps a workspace (32 MiB on Hopper) for every stream that runs a GEMM, for the life of
    the process. A new stream per graph left one behind for every graph ever captured, so memory grew with each
    ``apply`` / ``remove`` cycle; with one stream per role the workspace is allocated once. Roles: ``"graphs"``
    (where every `GraphedCall` warms up and captures) and ``"text lane"`` (`adapters.lanes.Lanes`).
    """
    index = torch.cuda.current_device() if index is None else index
    stream = _STREAMS.get((role, index))
    if stream is None:
        stream = _STREAMS[role, index] = torch.cuda.Stream(index)
    return stream


@contextlib.contextmanager
def keeping_stream(device):
    """On a CUDA ``device``: when the body raises after switching the current stream (an adapter's second stream,
    `adapters.lanes.Lanes`), make the caller's stream current again before the error propagates."""
    stream = torch.cuda.current_stream(device) if torch.device(device).type == "cuda" else None
    try:
        yield
    except BaseException:
        if stream is not None and torch.cuda.current_stream(device) != stream:
            torch.cuda.set_stream(stream)
        raise


RECOMPILE_ROOM = 128  # compiled versions per function catprune's compiled steps may reach (torch's default: 8)


def with_recompile_room(compiled: Callable) -> Callable:
    """``compiled`` (a ``torch.compile`` result), called with torch.compile's per-function recompile limit raised
    to at least `RECOMPILE_ROOM` for the duration of the call only.

    Why: every key of `StepRunner.compiled` (a shape signature, a k) compiles the same Python functions again, and
    so do the functions torch.compile resumes after each graph break (the cached attention). Under a keep-ratio
    schedule there is one k per pruned step; past the default limit (8 versions of one function) torch.compile
    would silently run the remaining steps' blocks eagerly. The user's own compiled functions keep their limit."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"

    def call(*args, **kwargs):
        with config.patch(**{name: max(getattr(config, name), RECOMPILE_ROOM)}):
            return compiled(*args, **kwargs)

    return call


class GraphedCall:
    """A function of tensors captured once as a CUDA graph and replayed.

    Inputs are copied into static buffers before every replay; the output is a static buffer overwritten by the next
    replay, so callers clone what they keep. Tensors the function reads or writes through its closure (weights,
    caches) must keep their addresses: the runtime allocates its caches once per shape signature.
    """

    def __init__(self, fn, inputs: dict[str, torch.Tensor], pool=None, warmup: int = 2, state=()):
        self.static = {name: t.clone() for name, t in inputs.items()}
        saved = [t.clone() for t in state]  # the warm-up must not advance mutable state
        side = device_stream("graphs")
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # compiles / initialises handles outside the capture
                fn(**self.static)
        torch.cuda.current_stream().wait_stream(side)
        for t, value in zip(state, saved, strict=True):
            t.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=side):
            self.output = fn(**self.static)
        self.pool = self.graph.pool()

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        for name, t in inputs.items():
            self.static[name].copy_(t)
        self.graph.replay()
        return self.output


class StepRunner:
    """Runs static-shape step functions with one `Backend`, caching one compiled / graphed callable per key.

    Args:
        backend: the `Backend` (or its value) of `CATConfig.backend`.
        fuse: run a pruned step's forward, output scatter, staleness update and next selection as one function,
            and the capture step's k-means and first selection as another. ``None`` (default): exactly when the
            backend captures CUDA graphs, where each of them is then one graph replay. ``True`` on the eager
            backend runs the same fused functions without graphs: the way to check the fused logic on a CPU, e.g.
            ``catprune.apply(model, config, runner=StepRunner(Backend.EAGER, fuse=True))``.
        full_capture: run the capture step (the last dense step, which fills the K/V caches; with the forecast
            also its reference step) as the pruned step with every token selected, through this backend, instead
            of the model's own forward with cache hooks (eager). ``None`` (default): on the compile and graph
            backends, where the hooked eager forward costs about 1.4 dense steps (measured: 57 vs 40 ms on
            SD3-medium 1024 px, H200). Not bit-identical to the model's forward (the same math in catprune's block
            order). A low-precision cache (``CATConfig.cache_dtype``) is quantised in place by that step too. The
            other dense steps of a pruning generation without the forecast run as that step too (the same graph).
        modulation_chunk: how many steps' modulation vectors (the adaptive norms' ``Linear(SiLU(temb))``) a
            generation computes at once, for the adapters that take them as an input (`Adapter.modulation_inputs`,
            `catprune.runtime.modulation`); 0 computes them inside each step. ``None`` (default): 8 on the compile
            and graph backends (a step then reads none of those weights), 0 on the eager backend.

    Example:
        >>> runner = StepRunner("eager", fuse=True)
        >>> runner.backend, runner.fuse, runner.uses_graphs
        (<Backend.EAGER: 'eager'>, True, False)
    """

    def __init__(
        self,
        backend: Backend | str = Backend.EAGER,
        fuse: bool | None = None,
        full_capture: bool | None = None,
        modulation_chunk: int | None = None,
    ):
        self.backend = Backend.parse(backend, "StepRunner: backend", "Pass e.g. Backend.EAGER.")
        for name, value in (("fuse", fuse), ("full_capture", full_capture)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"StepRunner: {name}: expected True, False or None, got {type(value).__name__}.")
        self.fuse = self.uses_graphs if fuse is None else fuse
        self.full_capture = self.backend is not Backend.EAGER if full_capture is None else full_capture
        if modulation_chunk is not None and (
            isinstance(modulation_chunk, bool) or not isinstance(modulation_chunk, int) or modulation_chunk < 0
        ):
            raise ValueError(f"StepRunner: modulation_chunk: expected an int >= 0 or None, got {modulation_chunk!r}.")
        default = 8 if self.backend is not Backend.EAGER else 0
        self.modulation_chunk = default if modulation_chunk is None else modulation_chunk
        self._compiled: dict = {}
        self._graphs: dict = {}
        self._pool = None

    @property
    def uses_graphs(self) -> bool:
        return self.backend in (Backend.CUDAGRAPH, Backend.COMPILE_CUDAGRAPH)

    @property
    def uses_compile(self) -> bool:
        return self.backend in (Backend.COMPILE, Backend.COMPILE_CUDAGRAPH)

    def check_device(self, device: torch.device) -> None:
        """The one CUDA check: ValueError when this backend captures CUDA graphs and ``device`` is not CUDA."""
        if self.uses_graphs and torch.device(device).type != "cuda":
            raise ValueError(
                f"CATConfig.backend: {self.backend.value!r} captures CUDA graphs and needs CUDA inputs, got inputs "
                f"on {device}. Use backend='eager' or 'compile' on this device."
            )

    def compiled(self, key, make_fn: Callable[[], Callable[..., torch.Tensor]]):
        """``make_fn()`` built once per ``key``, through ``torch.compile`` for the compile backends."""
        fn = self._compiled.get(key)
        if fn is None:
            fn = make_fn()
            if self.uses_compile:
                fn = with_recompile_room(torch.compile(fn, dynamic=False))
            self._compiled[key] = fn
        return fn

    def run(self, key, fn, inputs: dict[str, torch.Tensor], state=()):
        """Run ``fn(**inputs)``; with the graph backends, capture it once per ``key`` and replay.

        ``state``: tensors ``fn`` mutates in place; restored after the warm-up so the first replay advances them
        exactly once. Writes the warm-up makes to other tensors must be idempotent (the K/V cache writes are: the
        same tokens get the same values again).
        """
        if not self.uses_graphs:
            return fn(**inputs)
        graphed = self._graphs.get(key)
        if graphed is None:
            graphed = GraphedCall(fn, inputs, pool=self._pool, warmup=1 if state else 2, state=state)
            self._pool = graphed.pool
            self._graphs[key] = graphed
        return graphed(**inputs).clone()  # capturing executes nothing: even the first call replays

    def clear(self) -> None:
        self._compiled.clear()
        self._graphs.clear()
        self._pool = None
