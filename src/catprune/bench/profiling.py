"""Where a step's time goes: torch.profiler over a few consecutive transformer calls of one kind inside a real
generation, kernel time grouped into categories by kernel-name patterns (``scripts/profile_step.py``).

Kinds: ``stock`` (the diffusers transformer, catprune not applied, in a `baselines` configuration), ``dense``
(catprune's dense path in the mode), ``full`` (catprune's pruned step with every token selected) and ``pruned``
(the real pruned step). On a GPU the profiled time is device kernel time (CUDA graph replays included, where the
profiler sees their kernels); on a CPU it is the self time of the profiled operators. The window of one call runs
from its start to the next call's start, so the scheduler step between them (a few small elementwise kernels) is
counted with it, alike for every kind.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

import catprune

from .baselines import FULL_SELECTION_KEEP, install

KINDS = ("stock", "dense", "full", "pruned")
DENSE_START = 10**6

#: (category, lower-case name fragments), first match wins: attention before GEMM (flash kernels are CUTLASS
#: templates), gathers and selection before copies and elementwise (their kernels are often "vectorized ...")
CATEGORIES = (
    ("attention/SDPA", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "_attn")),
    (
        "selection/topk/sort",
        (
            "topk",
            "sort",
            "radix",
            "kthvalue",
            "scan",
            "cumsum",
            "bitonic",
            "unique",
            "histc",
            "bincount",
            "argmax",
            "argmin",
            "multinomial",
        ),
    ),  # fmt: skip
    ("gather/scatter/index", ("gather", "scatter", "index", "take", "masked", "nonzero", "embedding")),
    (
        "GEMM",
        (
            "gemm",
            "cutlass",
            "cublas",
            "nvjet",
            "xmma",
            "triton_tem",
            "addmm",
            "bmm",
            "aten::mm",
            "matmul",
            "gemv",
            "aten::linear",
            "conv",
        ),
    ),  # fmt: skip
    ("copies", ("memcpy", "memset", "copy", "clone", "contiguous", "aten::cat", "catarray", "fill", "zero_")),
    (
        "elementwise/norm",
        (
            "elementwise",
            "vectorized",
            "norm",
            "silu",
            "gelu",
            "mul",
            "add",
            "sub",
            "div",
            "triton",
            "reduce",
            "softmax",
            "pow",
            "rsqrt",
            "mean",
            "sum",
            "exp",
            "tanh",
            "sigmoid",
            "where",
            "clamp",
            "neg",
            "sin",
            "cos",
            "rotary",
            "rope",
            "chunk",
            "split",
        ),
    ),  # fmt: skip
)
OTHER = "other"
CATEGORY_NAMES = (*(name for name, _ in CATEGORIES), OTHER)


def categorize(name: str) -> str:
    """The category of a kernel or operator name (`CATEGORY_NAMES`)."""
    low = name.lower()
    for category, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return category
    return OTHER


def timed_events(events, cuda: bool) -> list[tuple[str, float]]:
    """``(name, microseconds)`` of the profiled work, with no double counting: device kernels (and memcpy /
    memset) on a GPU; operators' self CPU time on a CPU. Left out: the profiler's step markers and, on a GPU, the
    ranges that code annotates on the device timeline around its kernels (torch.compile's ``## Call
    CompiledFxGraph ... ##``), which would count those kernels twice.

    Example:
        >>> from types import SimpleNamespace as E
        >>> gpu = torch.autograd.DeviceType.CUDA
        >>> span = lambda us: E(elapsed_us=lambda: us)
        >>> events = [E(name="gemm", device_type=gpu, time_range=span(5.0), is_user_annotation=False),
        ...           E(name="## Call CompiledFxGraph abc ##", device_type=gpu, time_range=span(9.0))]
        >>> timed_events(events, cuda=True)
        [('gemm', 5.0)]
    """
    out = []
    for e in events:
        if e.name.startswith("ProfilerStep"):  # the schedule's step ranges (also shown on the device timeline)
            continue
        on_device = e.device_type != torch.autograd.DeviceType.CPU
        annotation = e.name.startswith("## ") or getattr(e, "is_user_annotation", False)
        if cuda and on_device and not annotation:
            out.append((e.name, e.time_range.elapsed_us()))
        elif not cuda and not on_device:
            out.append((e.name, e.self_cpu_time_total))
    return out


def summarize_kernels(pairs: list[tuple[str, float]], calls: int, top: int = 12) -> dict:
    """ms per call: the total, per category (they sum to the total) and the ``top`` kernels as ``[name, ms per
    call, category, launches per call]``.

    Example:
        >>> summarize_kernels([("gemm_a", 2000.0), ("gemm_a", 2000.0), ("copy_b", 1000.0)], calls=2)["top"][0]
        ['gemm_a', 2.0, 'GEMM', 1.0]
    """
    categories = dict.fromkeys(CATEGORY_NAMES, 0.0)
    per_name: dict[str, float] = {}
    launches: dict[str, int] = {}
    for name, us in pairs:
        categories[categorize(name)] += us / 1e3 / calls
        per_name[name] = per_name.get(name, 0.0) + us / 1e3 / calls
        launches[name] = launches.get(name, 0) + 1
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    return {
        "kernel_ms": sum(categories.values()),
        "categories": categories,
        "top": [[name, ms, categorize(name), launches[name] / calls] for name, ms in ranked],
        "launches": sum(launches.values()) / calls,
    }


def top_operators(averages, cuda: bool, calls: int, top: int = 15) -> list[list]:
    """The operators with the most self time, grouped by input shapes, from ``prof.key_averages(
    group_by_input_shape=True)``: ``[name, input shapes, ms per call, occurrences per call]``. Device time on a GPU
    (a kernel counts for the operator that launched it: eager operators and the extern calls of compiled code;
    Triton kernels of compiled code and kernels replayed from a CUDA graph belong to no operator), CPU time on a CPU.

    Example:
        >>> from types import SimpleNamespace as E
        >>> rows = [E(key="aten::cat", input_shapes=[[2, 3]], self_device_time_total=3000.0, count=4)]
        >>> top_operators(rows, cuda=True, calls=2)
        [['aten::cat', '[[2, 3]]', 1.5, 2.0]]
    """
    rows = []
    for e in averages:
        if e.key.startswith("ProfilerStep"):
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            rows.append([e.key, str(e.input_shapes), us / 1e3 / calls, e.count / calls])
    return sorted(rows, key=lambda r: -r[2])[:top]


def _setup(pipe, kind: str, mode: str, stock: str, keep_ratio: float, start_step: int, fields: dict | None = None
           ) -> tuple[int, Callable]:  # fmt: skip
    """Prepare ``pipe`` for ``kind``: the first call index of that kind in a generation, and the undo function.
    ``fields``: further `CATConfig` fields (e.g. ``context``) of the catprune kinds."""
    if kind == "stock":
        return 2, install(pipe.transformer, stock)
    keep, start = {"dense": (keep_ratio, DENSE_START), "full": (FULL_SELECTION_KEEP, start_step)}.get(
        kind, (keep_ratio, start_step)
    )
    catprune.apply(pipe, catprune.CATConfig(keep_ratio=keep, start_step=start, backend=mode, **(fields or {})))
    return (2 if kind == "dense" else start_step), lambda: catprune.remove(pipe)


def profile_kind(pipe, kwargs: dict, kind: str, device, replays: int, mode="eager", stock="eager", keep_ratio=0.3,
                 start_step=8, fields: dict | None = None, operators: bool = False) -> dict:  # fmt: skip
    """Profile ``replays`` consecutive calls of ``kind`` in one generation (after a warm-up generation), and time
    the same calls' wall clock in another; returns the kernel summary with ``wall_ms``, ``phases`` and ``macs``.
    ``fields``: further `CATConfig` fields of the catprune kinds (e.g. ``{"context": "extrapolate"}``).
    ``operators``: also record input shapes and return the `top_operators` under ``"operators"``."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from . import _StepTimer

    if kind not in KINDS:
        raise ValueError(f"profile: kind: expected one of {', '.join(KINDS)}, got {kind!r}.")
    cuda = torch.device(device).type == "cuda"
    first, undo = _setup(pipe, kind, mode, stock, keep_ratio, start_step, fields)
    calls = dict(kwargs, num_inference_steps=first + replays + 1)
    seed = torch.Generator("cpu")
    collected = {}
    try:
        pipe(**calls, generator=seed.manual_seed(0))  # warm-up: compiles, captures graphs
        timer = _StepTimer(pipe.transformer, device)
        timer.start()
        pipe(**calls, generator=seed.manual_seed(0))
        timer.close()
        wall = timer.steps()[first : first + replays]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        when = schedule(skip_first=first, wait=0, warmup=1, active=replays, repeat=1)
        def ready(prof):
            collected.update(pairs=timed_events(prof.events(), cuda))
            if operators:
                collected.update(ops=top_operators(prof.key_averages(group_by_input_shape=True), cuda, replays))

        with profile(activities=activities, schedule=when, on_trace_ready=ready, record_shapes=operators) as prof:
            def step(*_):
                if cuda:  # the previous call's kernels finish inside its own window, not the next one's
                    torch.cuda.synchronize(device)
                prof.step()

            hook = pipe.transformer.register_forward_pre_hook(step)
            try:
                pipe(**calls, generator=seed.manual_seed(0))
            finally:
                hook.remove()
        records = catprune.stats(pipe).steps[first : first + replays] if kind != "stock" else []
    finally:
        undo()
    out = summarize_kernels(collected.get("pairs", []), replays)
    out.update(
        wall_ms=1e3 * statistics.median(wall),
        phases=[r.phase for r in records] or ["stock"] * replays,
        tokens_computed=records[0].computed if records else None,
        macs=records[0].macs if records else None,
    )
    if operators:
        out["operators"] = collected.get("ops", [])
    return out
