"""Public API: apply / remove / applied / stats / reset / get_config, and the read-only inspect / observe.

catprune patches exactly one thing: the transformer's ``forward`` becomes an instance attribute that wraps the
original (signature preserved through ``__wrapped__``). Its state lives on that wrapper, never on the model, so
`remove` deletes the one attribute it added (or restores the one it replaced) and leaves no trace.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import pickle
import threading
import warnings
import weakref
from collections.abc import Callable

import torch

from ._target import resolve_model
from .adapters import adapter_for
from .config import Backend, CATConfig
from .runtime import InspectView, PruneStats, Runtime, StepKernels, StepRecord, StepRunner

_MARK = "__catprune_runtime__"  # private: reach the runtime through the functions of this module


def _patched_wrapper(model: torch.nn.Module):
    """Our forward wrapper on ``model`` and the attribute holding it, or (None, None)."""
    for attr in ("forward", "_old_forward"):  # accelerate keeps the forward it wraps in _old_forward
        fn = model.__dict__.get(attr)
        # identity check: accelerate's functools.update_wrapper copies our attributes onto its own wrapper
        if fn is not None and getattr(fn, "__catprune_self__", None) is fn:
            return fn, attr
    return None, None


_GRAPH_BACKENDS = ("cudagraph", "compile+cudagraph")


def _check_backend_device(model: torch.nn.Module, config: CATConfig) -> None:
    """The CUDA-graph backends need CUDA: fail at apply time when the model is known to run elsewhere."""
    if config.backend.value not in _GRAPH_BACKENDS:
        return
    if torch.cuda.is_available():
        if hasattr(model, "_hf_hook"):
            return  # offloaded (accelerate): the parameters move to the GPU at call time
        devices = {p.device.type for p in model.parameters()}
        if not devices or "cuda" in devices or "meta" in devices:
            return
        where = f"the model's parameters are on {', '.join(sorted(devices))}"
    else:
        where = "this torch build sees no CUDA device"
    raise ValueError(
        f"CATConfig.backend: {config.backend.value!r} captures CUDA graphs and needs a model on CUDA, but {where}. "
        "Use backend='eager' (or 'compile') here, or move the pipeline to CUDA (pipe.to('cuda')) before apply."
    )


@torch.compiler.disable  # a user's torch.compile(transformer) graph-breaks here; CATConfig.backend compiles
def _call_runtime(wrapper: _Forward, args, kwargs):
    # one generation at a time: a second thread entering mid-generation would corrupt the step state, so it is
    # refused before anything is touched (re-entry from the same thread is allowed)
    if not wrapper._lock.acquire(blocking=False):
        raise RuntimeError(
            f"catprune: this {type(getattr(wrapper, _MARK).adapter.model).__name__} with CAT Pruning applied is "
            "already running in another thread; one applied pipeline serves one generation at a time. Use one "
            "pipeline per thread (copy.deepcopy(pipe) gives an independent one) or serialise the calls with a lock."
        )
    try:
        return getattr(wrapper, _MARK)(wrapper.__wrapped__, args, kwargs)
    finally:
        wrapper._lock.release()


class _Forward:
    """The forward catprune installs on the transformer: the original forward (``__wrapped__``, so the signature is
    the model's) driven by the runtime.

    A class rather than a closure so that copies behave: ``copy.deepcopy`` of the model (or of its pipeline) gives
    the copy its own wrapper, bound to the copy's forward, with a fresh runtime of the same config; pickling refuses
    with a message instead of failing on a local function.
    """

    def __init__(self, model: torch.nn.Module, original, runtime: Runtime, previous):
        functools.update_wrapper(self, original)
        setattr(self, _MARK, runtime)
        self.__catprune_self__ = self
        self.__catprune_previous__ = previous  # an instance attribute we replace, if any
        self._model = weakref.ref(model)
        self._lock = threading.RLock()

    def __call__(self, *args, **kwargs):
        return _call_runtime(self, args, kwargs)

    def __deepcopy__(self, memo):
        model = self._model()
        new_model = memo.get(id(model)) if model is not None else None
        if new_model is None:  # the wrapper alone, not as part of its model: like a function, it is not copied
            return self
        runtime = getattr(self, _MARK)
        pipe = runtime.probe.pipe
        new_pipe = memo.get(id(pipe)) if pipe is not None else None  # None when only the transformer is copied
        original = copy.deepcopy(self.__wrapped__, memo)  # a bound method: bound to the copy
        previous = copy.deepcopy(self.__catprune_previous__, memo)
        runner = StepRunner(runtime.runner.backend, runtime.runner.fuse)  # fresh graphs and buffers for the copy
        return _Forward(
            new_model, original, Runtime(adapter_for(new_model), runtime.config, new_pipe, runner), previous
        )

    def __reduce_ex__(self, protocol):
        model = self._model()
        name = type(model).__name__ if model is not None else "transformer"
        raise pickle.PicklingError(
            f"catprune: cannot pickle a {name} with CAT Pruning applied (its forward holds per-generation state). "
            "Call catprune.remove(pipe) first, then pickle / torch.save it, and catprune.apply(pipe, config) again "
            "afterwards; to save weights only, use model.state_dict() or save_pretrained, which work while applied."
        )


def _runtime(obj, fn: str) -> Runtime:
    model, _ = resolve_model(obj, fn)
    wrapper, _ = _patched_wrapper(model)
    if wrapper is None:
        raise ValueError(
            f"catprune.{fn}: CAT Pruning is not applied to this {type(model).__name__}. Call catprune.apply(pipe) "
            "first."
        )
    return getattr(wrapper, _MARK)


def apply(pipe_or_transformer, config: CATConfig | None = None, *, runner: StepRunner | None = None):
    """Apply CAT Pruning to a diffusers pipeline (its ``.transformer``) or to a transformer, in place.

    Idempotent: applying again replaces the previous configuration (observers registered with `observe` stay).
    ``config`` may be a `catprune.Plan` (from `catprune.plan`): its config is applied, and a plan of plain fewer
    steps (``plan.config is None``) removes CAT Pruning and warns; pass ``plan.pipeline_kwargs()`` to the pipeline.
    Everything is validated before the model is modified. Returns its argument.

    ``runner`` (advanced): how steps execute, a `catprune.runtime.StepRunner` whose backend is ``config.backend``;
    default ``StepRunner(config.backend)``. ``StepRunner(Backend.EAGER, fuse=True)`` runs eagerly the fused step
    functions that the CUDA-graph backends replay, so their logic can be checked on a CPU.

    Example:
        >>> import catprune
        >>> from catprune.models.testing import tiny_sd3_transformer
        >>> model = catprune.apply(tiny_sd3_transformer(), catprune.CATConfig(keep_ratio=0.5, start_step=2))
        >>> catprune.is_applied(model)
        True
    """
    if config is None:
        config = CATConfig()
    from .planner import Plan  # the planner is built on this module: imported on use

    if isinstance(config, Plan):
        return config.apply_to(pipe_or_transformer, runner=runner)
    if not isinstance(config, CATConfig):
        raise TypeError(
            f"catprune.apply: config: expected a catprune.CATConfig or a catprune.Plan, got {type(config).__name__}. "
            "Pass e.g. catprune.CATConfig(keep_ratio=0.3, start_step=8)."
        )
    model, pipe = resolve_model(pipe_or_transformer, "apply")
    target = pipe.transformer if pipe is not None else pipe_or_transformer
    if model is not target and config.backend is Backend.EAGER:
        warnings.warn(
            "catprune.apply: the transformer is wrapped by torch.compile; catprune's forward runs outside Dynamo "
            "(no per-step recompiles), so that compile has no effect. For compiled steps use "
            "CATConfig(backend='compile') or backend='compile+cudagraph' on CUDA.",
            stacklevel=2,
        )
    if runner is not None and not isinstance(runner, StepRunner):
        raise TypeError(
            f"catprune.apply: runner: expected a catprune.runtime.StepRunner or None, got {type(runner).__name__}. "
            "Leave it out for the default."
        )
    if runner is not None and runner.backend is not config.backend:
        raise ValueError(
            f"catprune.apply: runner: expected a StepRunner for config.backend {config.backend.value!r}, got one "
            f"for {runner.backend.value!r}. Pass StepRunner(config.backend, ...) or leave runner out."
        )
    adapter = adapter_for(model)
    adapter.validate_model()
    _check_backend_device(model, config)
    runtime = Runtime(adapter, config, pipe, runner)
    previous, _ = _patched_wrapper(model)
    if previous is not None:
        runtime.observers.extend(getattr(previous, _MARK).observers)
    remove(model)

    # Under an accelerate hook (enable_model_cpu_offload, device maps) patch the forward the hook calls: diffusers
    # removes and re-adds those hooks after every generation, which restores `_old_forward` and would drop a patch
    # on `forward`.
    attr = "_old_forward" if ("_old_forward" in model.__dict__ and hasattr(model, "_hf_hook")) else "forward"
    forward = _Forward(model, getattr(model, attr), runtime, model.__dict__.get(attr))
    setattr(model, attr, forward)
    return pipe_or_transformer


def remove(pipe_or_transformer):
    """Undo `apply`: the transformer is exactly as before (no hooks, no attributes). A no-op if not applied.

    Example:
        >>> import catprune
        >>> from catprune.models.testing import tiny_sd3_transformer
        >>> model = catprune.apply(tiny_sd3_transformer())
        >>> catprune.is_applied(catprune.remove(model))
        False
    """
    model, _ = resolve_model(pipe_or_transformer, "remove")
    wrapper, attr = _patched_wrapper(model)
    if wrapper is None:
        return pipe_or_transformer
    getattr(wrapper, _MARK).reset(release=True)
    previous = wrapper.__catprune_previous__
    if previous is None and attr == "forward":
        del model.forward
    else:
        # an instance forward we wrapped, or accelerate wrapped us afterwards: put back what we replaced
        setattr(model, attr, previous if previous is not None else type(model).forward.__get__(model))
    return pipe_or_transformer


def is_applied(pipe_or_transformer) -> bool:
    """Whether CAT Pruning is applied to this pipeline or transformer."""
    model, _ = resolve_model(pipe_or_transformer, "is_applied")
    return _patched_wrapper(model)[0] is not None


@contextlib.contextmanager
def applied(pipe_or_transformer, config: CATConfig | None = None):
    """Context manager: CAT Pruning inside the block; on exit the previous state (applied or not) comes back.

    Example:
        >>> import catprune
        >>> from catprune.models.testing import tiny_sd3_transformer
        >>> model = tiny_sd3_transformer()
        >>> with catprune.applied(model, catprune.CATConfig(keep_ratio=0.5)):
        ...     inside = catprune.is_applied(model)
        >>> inside, catprune.is_applied(model)
        (True, False)
    """
    model, _ = resolve_model(pipe_or_transformer, "applied")
    wrapper, _ = _patched_wrapper(model)
    previous = getattr(wrapper, _MARK).config if wrapper is not None else None
    apply(pipe_or_transformer, config)
    try:
        yield pipe_or_transformer
    finally:
        remove(pipe_or_transformer)
        if previous is not None:
            apply(pipe_or_transformer, previous)


def stats(pipe_or_transformer) -> PruneStats:
    """Per-step record of the last (or current) generation: tokens computed, analytic MACs dense vs pruned.

    Steps are recorded with pruning off too (``keep_ratio=1``, or ``start_step`` beyond the last step), as dense
    steps; the forward is then still the model's own.

    Example:
        >>> import catprune
        >>> from catprune.models.testing import tiny_sd3_transformer
        >>> print(catprune.stats(catprune.apply(tiny_sd3_transformer())))
        catprune stats: no transformer call recorded yet
    """
    runtime = _runtime(pipe_or_transformer, "stats")
    return PruneStats(list(runtime.stats.steps))


def reset(pipe_or_transformer) -> None:
    """Start a new generation at the next transformer call (catprune also detects new generations itself)."""
    _runtime(pipe_or_transformer, "reset").reset()


def get_config(pipe_or_transformer) -> CATConfig:
    """The CATConfig in force."""
    return _runtime(pipe_or_transformer, "get_config").config


def inspect(pipe_or_transformer) -> InspectView:
    """A read-only snapshot: config, stats with per-step records (selected token indices of pruned steps), the
    current generation's grid, CFG sharing, next selection and cache sizes. See `catprune.runtime.InspectView`.

    Example:
        >>> import catprune
        >>> from catprune.models.testing import tiny_sd3_inputs, tiny_sd3_transformer
        >>> model = catprune.apply(tiny_sd3_transformer(), catprune.CATConfig(keep_ratio=0.5, start_step=2))
        >>> inputs = tiny_sd3_inputs(model, batch=1, height=8, width=8)
        >>> for t in (900.0, 800.0, 700.0):
        ...     _ = model(**inputs, timestep=torch.tensor([t]))
        >>> view = catprune.inspect(model)
        >>> [r.kind for r in view.steps], tuple(view.selected(2).shape), view.grid
        (['dense', 'capture', 'pruned'], (1, 8), (4, 4))
    """
    runtime = _runtime(pipe_or_transformer, "inspect")
    gen = runtime.generation
    records = list(gen.records) if gen is not None else []
    pruning = gen is not None and gen.buffers is not None
    ready = pruning and gen.labels is not None
    return InspectView(
        family=runtime.adapter.family,
        config=runtime.config,
        stats=PruneStats(records),
        grid=gen.grid if gen is not None else None,
        batch=gen.batch if gen is not None else None,
        cfg_shared=gen.shared if pruning else None,
        next_selection=gen.idx_rows.clone() if ready else None,
        kv_cache_shapes=tuple(tuple(c[n].shape) for c in gen.caches for n in c.kv_names()) if pruning else (),
        cache_bytes=gen.cache_bytes() if pruning else 0,
        kv_cache_bytes=gen.kv_cache_bytes() if pruning else 0,
        kv_cache_dtype=next((c[n].dtype for c in gen.caches for n in c.kv_names()), None) if pruning else None,
    )


class Observer:
    """Handle of a step observer (`observe`): ``remove()`` detaches it; also a context manager that removes it on
    exit."""

    def __init__(self, runtime: Runtime, callback: Callable[[StepRecord], None]):
        self._runtime, self.callback = runtime, callback
        runtime.observers.append(callback)

    def remove(self) -> None:
        """Stop calling the callback (a no-op when already removed)."""
        with contextlib.suppress(ValueError):
            self._runtime.observers.remove(self.callback)

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def observe(pipe_or_transformer, callback: Callable[[StepRecord], None]) -> Observer:
    """Call ``callback(record)`` after every counted transformer call with its read-only `StepRecord` (step index,
    kind dense / capture / pruned, tokens computed per row, ``selected`` (B, k) indices of a pruned step or None,
    MACs dense vs as run). Returns a handle with ``remove()``; usable as a context manager. Survives re-applying;
    `remove` (undoing catprune) drops it.

    Example:
        >>> import catprune
        >>> from catprune.models.testing import tiny_sd3_inputs, tiny_sd3_transformer
        >>> model = catprune.apply(tiny_sd3_transformer(), catprune.CATConfig(keep_ratio=1.0))
        >>> kinds = []
        >>> with catprune.observe(model, lambda r: kinds.append(r.kind)):
        ...     _ = model(**tiny_sd3_inputs(model, batch=1, height=8, width=8), timestep=torch.tensor([900.0]))
        >>> kinds
        ['dense']
    """
    if not callable(callback):
        raise TypeError(
            f"catprune.observe: callback: expected a callable taking a StepRecord, got {type(callback).__name__}. "
            "Pass e.g. lambda record: print(record.kind)."
        )
    return Observer(_runtime(pipe_or_transformer, "observe"), callback)


def step_kernels(pipe_or_transformer) -> StepKernels:
    """The current generation's token selection and k-means as callables, for benchmarks that time them alone
    (see `catprune.runtime.StepKernels`). ValueError before a pruning generation reached its capture step.

    Example:
        >>> import catprune
        >>> from catprune.models.testing import tiny_sd3_inputs, tiny_sd3_transformer
        >>> model = catprune.apply(tiny_sd3_transformer(), catprune.CATConfig(keep_ratio=0.5, start_step=2))
        >>> inputs = tiny_sd3_inputs(model, batch=1, height=8, width=8)
        >>> for t in (900.0, 800.0):
        ...     _ = model(**inputs, timestep=torch.tensor([t]))
        >>> kernels = catprune.step_kernels(model)
        >>> tuple(kernels.select().shape), tuple(kernels.cluster().shape), kernels.fused
        ((1, 8), (1, 16), False)
    """
    return _runtime(pipe_or_transformer, "step_kernels").kernels()
