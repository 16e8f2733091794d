"""The dense baseline of ``catprune bench --dense-baseline``, and the "implementation vs pruning" split.

The dense side is either catprune's own dense path in the CAT case's mode (``same``, the default, comparable with
stored runs) or the stock diffusers transformer (catprune not applied) in one configuration:

- ``eager``: the model's own forward;
- ``compile``, ``compile:max-autotune-no-cudagraphs``, ``compile:reduce-overhead``: ``torch.compile`` of the
  transformer's forward in that mode (``compile`` is the default mode; reduce-overhead adds CUDA graphs);
- ``cudagraph``: the eager forward captured once per input signature as a CUDA graph and replayed;
- ``best``: each available candidate timed briefly after its warm-up; the fastest is the baseline.

The split measures catprune's pruned-step code with every token selected (``keep_ratio`` just below 1, so that
``k = M``: the same runtime, backend and selection as a real pruned step, with no pruning), through the public API.
"""

from __future__ import annotations

import statistics
import weakref
from collections.abc import Callable

import torch

from catprune.runtime.backends import GraphedCall

SAME, BEST = "same", "best"
DENSE_BASELINES = ("eager", "compile", "compile:max-autotune-no-cudagraphs", "compile:reduce-overhead", "cudagraph")
CHOICES = (SAME, BEST, *DENSE_BASELINES)
CUDA_ONLY = frozenset({"compile:reduce-overhead", "cudagraph"})
#: a keep ratio below 1 (pruning on) whose k is every token at any resolution: catprune's full-selection step
FULL_SELECTION_KEEP = 1.0 - 1e-9
PROBE_WARMUP_STEPS, PROBE_STEPS = 3, 6  # the brief timing of one ``best`` candidate: warm-up, then timed steps

_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {mode: compiled forward}


def check_dense_baseline(name: str, device=None) -> str:
    """``name`` if it is a dense baseline ``catprune bench`` knows and can run on ``device`` (default: CUDA when
    available); ValueError naming the choices otherwise."""
    if name not in CHOICES:
        raise ValueError(
            f"bench: dense_baseline: expected one of {', '.join(CHOICES)}, got {name!r}. Use 'best' for the fastest "
            "stock configuration, or 'same' for catprune's dense path in the CAT mode."
        )
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if name in CUDA_ONLY and not cuda:
        raise ValueError(
            f"bench: dense_baseline: {name!r} captures CUDA graphs and needs a CUDA device, got {device or 'none'}. "
            "Use 'eager', 'compile' or 'best' (which skips the CUDA-only candidates)."
        )
    return name


def candidates(device, only: tuple[str, ...] | None = None) -> tuple[list[str], dict[str, str]]:
    """The stock configurations ``best`` times on ``device`` (those of ``only`` when given), and the skipped ones
    with the reason."""
    unknown = [name for name in only or () if name not in DENSE_BASELINES]
    if unknown:
        raise ValueError(
            f"bench: dense_candidates: expected names among {', '.join(DENSE_BASELINES)}, got {unknown[0]!r}. "
            "Pass e.g. --dense-candidates eager,compile,cudagraph."
        )
    cuda = torch.device(device).type == "cuda"
    skipped = {name: "needs a CUDA device" for name in DENSE_BASELINES if name in CUDA_ONLY and not cuda}
    skipped.update({name: "not among --dense-candidates" for name in DENSE_BASELINES if only and name not in only})
    return [name for name in DENSE_BASELINES if name not in skipped], skipped


class GraphedForward:
    """A module's forward replayed as CUDA graphs, one per signature of its keyword arguments (tensor shapes,
    dtypes and devices; the other arguments' values). Tensors are copied into the graph's static inputs before each
    replay; the output is the graph's static buffer (a diffusers pipeline consumes it before the next step)."""

    def __init__(self, forward: Callable):
        self.forward = forward
        self.graphs: dict[tuple, tuple[GraphedCall, dict]] = {}

    def __call__(self, *args, **kwargs):
        if args:  # the pipelines pass keyword arguments only; anything else runs eagerly
            return self.forward(*args, **kwargs)
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in kwargs.items() if k not in tensors}
        key = (
            tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(tensors.items())),
            repr(sorted(others.items())),
        )
        if key not in self.graphs:
            self.graphs[key] = (GraphedCall(lambda **t: self.forward(**t, **others), tensors), others)
        return self.graphs[key][0](**tensors)


def install(module: torch.nn.Module, name: str) -> Callable[[], None]:
    """Run ``module``'s forward in the stock configuration ``name``; returns the function that undoes it. Compiled
    forwards are kept per module and mode, so installing a mode again does not compile again."""
    saved = module.__dict__.get("forward")
    original = module.forward
    if name == "cudagraph":
        module.forward = GraphedForward(original)
    elif name.startswith("compile"):
        mode = name.partition(":")[2] or None
        per_mode = _compiled.setdefault(module, {})
        if mode not in per_mode:
            per_mode[mode] = _compiled_forward(original, mode)
        module.forward = per_mode[mode]
    elif name != "eager":
        raise ValueError(f"bench: dense_baseline: expected one of {', '.join(DENSE_BASELINES)}, got {name!r}.")

    def undo():
        if saved is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = saved

    return undo


def _compiled_forward(forward: Callable, mode: str | None) -> Callable:
    """``torch.compile(forward)`` in ``mode`` with static shapes (each size its own graph, as catprune's compile
    backend does: no slower dynamic-shape kernels after a second size), and room for one graph per mode and size
    (the compiled modes share the forward's code object)."""
    config = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, limit):
            setattr(config, limit, max(getattr(config, limit), 64))
    compiled = torch.compile(forward, mode=mode, dynamic=False)
    if mode != "reduce-overhead":
        return compiled

    def graphed(*args, **kwargs):  # each call is a new step of CUDA graph trees: the pipeline consumed the last one
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return graphed


def _generation_kwargs(embeds, case, steps: int) -> dict:
    return dict(**embeds, height=case.height, width=case.width, num_inference_steps=steps, output_type="latent")


def probe_candidate(pipe, embeds, case, device, name: str) -> float:
    """Median seconds per step of the stock transformer in configuration ``name``: a short warm-up generation, then
    a short timed one (`PROBE_STEPS` steps)."""
    from . import _StepTimer

    undo = install(pipe.transformer, name)
    timer = _StepTimer(pipe.transformer, device)
    try:
        pipe(**_generation_kwargs(embeds, case, PROBE_WARMUP_STEPS), generator=torch.Generator("cpu").manual_seed(0))
        timer.start()
        pipe(**_generation_kwargs(embeds, case, PROBE_STEPS), generator=torch.Generator("cpu").manual_seed(0))
        steps = timer.steps()
    finally:
        timer.close()
        undo()
    return statistics.median(steps[1:] or steps)


def pick_best(names: list[str], time_candidate: Callable[[str], float]) -> tuple[str, dict[str, float]]:
    """Time each of ``names`` with ``time_candidate(name) -> seconds per step``; returns the fastest and all times
    (ties go to the earlier name)."""
    if not names:
        raise ValueError("bench: dense_baseline: expected at least one candidate configuration, got none.")
    times = {name: float(time_candidate(name)) for name in names}
    return min(names, key=lambda name: times[name]), times


def run_stock(pipe, embeds, case, device, name: str):
    """The stock transformer in configuration ``name`` over ``case`` (warm-up, then ``case.repeats`` generations):
    a `MethodResult` without MACs (the caller fills them in from the CAT run's dense count)."""
    from . import MethodResult, _timed_generations

    undo = install(pipe.transformer, name)
    try:
        steps, _, peak = _timed_generations(pipe, _generation_kwargs(embeds, case, case.steps), case, device)
    finally:
        undo()
    return MethodResult(
        loop_s=sum(steps),
        step_s=steps,
        full_step_s=statistics.median(steps[1:] or steps),
        pruned_step_s=None,
        peak_mem_gb=peak,
        macs=0,
        macs_dense=0,
    )


def measure_dense(pipe, embeds, case, device, time_candidate: Callable[[str], float] | None = None):
    """The dense side of ``case``: ``(MethodResult, baseline record)``; None for ``same`` (run by the caller).

    ``time_candidate``: ``name -> seconds per step`` for ``best`` (default: `probe_candidate` on this pipeline);
    the seam through which tests give fixed timings.
    """
    requested = check_dense_baseline(case.dense_baseline, device)
    if requested == SAME:
        return None
    record = {"requested": requested, "name": requested, "candidates_ms": {}, "skipped": {}}
    if requested == BEST:
        names, record["skipped"] = candidates(device, case.dense_candidates)
        timer = time_candidate or (lambda name: probe_candidate(pipe, embeds, case, device, name))
        record["name"], times = pick_best(names, timer)
        record["candidates_ms"] = {name: 1e3 * s for name, s in times.items()}
    return run_stock(pipe, embeds, case, device, record["name"]), record


def split(stock_step_s: float, full_selection, pruned) -> dict:
    """The "implementation vs pruning" split from a stock dense step time and two CAT `MethodResult` runs: one with
    every token selected (``full_selection``) and the real one (``pruned``)."""
    full_s, pruned_s = full_selection.pruned_step_s, pruned.pruned_step_s
    out = {
        "stock_step_ms": 1e3 * stock_step_s,
        "full_selection_step_ms": 1e3 * full_s if full_s else None,
        "pruned_step_ms": 1e3 * pruned_s if pruned_s else None,
    }
    if not (full_s and pruned_s and full_selection.pruned_step_macs and pruned.pruned_step_macs):
        return out
    macs_x = full_selection.pruned_step_macs / pruned.pruned_step_macs
    out.update(
        implementation_x=stock_step_s / full_s,  # catprune's step code with no pruning vs the stock step
        pruning_x=full_s / pruned_s,  # what pruning alone buys per step
        pruning_macs_x=macs_x,
        pruning_efficiency=(full_s / pruned_s) / macs_x,
    )
    return out


def compile_vae(vae: torch.nn.Module, mode: str) -> None:
    """Compile ``vae.decode`` once in ``mode`` ("default" for torch.compile's default); the same decode serves the
    dense and the CAT end-to-end time."""
    if mode not in ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"):
        raise ValueError(
            f"bench: compile_vae: expected default, max-autotune-no-cudagraphs, reduce-overhead or max-autotune, "
            f"got {mode!r}. Pass e.g. --compile-vae default."
        )
    if getattr(vae, "_catprune_bench_vae_mode", None) == mode:
        return
    decode = type(vae).decode.__get__(vae)
    vae.decode = _compiled_forward(decode, None if mode == "default" else mode)
    vae._catprune_bench_vae_mode = mode
