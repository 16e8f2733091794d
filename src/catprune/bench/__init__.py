"""``catprune bench``: wall-clock speed of CAT Pruning against the dense model, in the same process and mode.

Random weights by default (compute does not depend on weight values): full-size transformer and VAE built from the
configs in ``catprune/models/model_configs.json``, inside the family's stock diffusers pipeline
(``StableDiffusion3Pipeline``, ``PixArtSigmaPipeline``, ``FluxPipeline``) fed random prompt embeddings (text encoding
is outside the timed region and identical for both), or the embedded ``shapes`` / ``scenes`` pipelines. The transformer loop is
timed from the first transformer call to the end of the last one (CUDA events, no host syncs).
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch

import catprune
from catprune.evaluation.machine import cuda_sync
from catprune.evaluation.machine import environment as machine_environment
from catprune.models import model_configs
from catprune.models.testing import TINY_FLUX_CONFIG, TINY_PIXART_CONFIG
from catprune.runtime.backends import GraphedCall

from .baselines import FULL_SELECTION_KEEP, SAME, check_dense_baseline, compile_vae, measure_dense
from .baselines import split as split_speedup
from .families import FAMILIES, build_text_encoders, family_of
from .report import format_details as format_details
from .report import summarize

MODES = tuple(b.value for b in catprune.Backend)  # a case's "mode" is its CATConfig.backend
DENSE_START = 10**6
# tiny random presets for tests and CPU smoke runs (not full-size models)
TEST_PRESETS = {
    "sd3-tiny": {
        "class": "SD3Transformer2DModel",
        "config": dict(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=16,
            out_channels=4,
            pos_embed_max_size=64,
        ),
        "text_tokens": 8,
        "vae": "tiny-vae",
    },
    "tiny-vae": {
        "class": "AutoencoderKL",
        "config": dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 8),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            norm_num_groups=4,
            scaling_factor=1.0,
            shift_factor=0.0,
        ),
    },
    "pixart-tiny": {
        "class": "PixArtTransformer2DModel",
        "config": TINY_PIXART_CONFIG,
        "text_tokens": 8,
        "vae": "tiny-vae",
        "latent_channels": 4,
    },
    "flux-tiny": {
        "class": "FluxTransformer2DModel",
        "config": TINY_FLUX_CONFIG,
        "text_tokens": 8,
        "vae": "tiny-vae",
        "latent_channels": 4,
    },
    "shapes": {"class": "ShapesPipeline", "note": "the embedded pixel-space model (catprune.load_pipeline('shapes'))"},
    "scenes": {"class": "ScenesPipeline", "note": "the embedded pixel-space model (catprune.load_pipeline('scenes'))"},
}  # a start step no generation reaches: every step dense, through the same dispatch and backend


@dataclass
class BenchCase:
    preset: str = "sd3-medium"
    height: int = 1024
    width: int = 1024
    steps: int = 28
    batch_size: int = 1
    cfg: bool | None = None  # None: the family's usual setting (CFG for SD3 / PixArt / shapes, none for Flux)
    dtype: str = "bfloat16"
    mode: str = "eager"
    keep_ratio: float = 0.3
    start_step: int = 8
    # CATConfig.context of the pruned steps ("reuse", the paper's and the default, or "extrapolate") and the forecast cap
    context: str = "reuse"
    forecast_max_ratio: float | None = 0.5
    repeats: int = 3
    vae: bool = True
    # the dense side: "same" (catprune's dense path in `mode`) or a stock configuration / "best" (bench.baselines)
    dense_baseline: str = "same"
    dense_candidates: tuple[str, ...] | None = None  # the configurations "best" times (None: every available one)
    split: bool = False  # also time catprune's full-selection step: the "implementation vs pruning" split
    compile_vae: str | None = None  # torch.compile mode of the VAE decode (the same decode on both sides)
    cache_dtype: str | None = None  # CATConfig.cache_dtype of the CAT side (None: the model's dtype)
    keep_ratio_end: float | None = None  # CATConfig.keep_ratio_end of the CAT side (a keep-ratio schedule)
    final_dense_steps: int = 0  # CATConfig.final_dense_steps of the CAT side
    selection: str = "cat"  # CATConfig.selection of the CAT side (and of its full-selection step)


@dataclass
class MethodResult:
    loop_s: float  # transformer loop (median over repeats), all steps
    step_s: list[float]  # per-step times of the median repeat
    full_step_s: float  # median time of a dense step
    pruned_step_s: float | None  # median time of a pruned step
    peak_mem_gb: float
    macs: int
    macs_dense: int
    pruned_step_macs: int | None = None  # analytic MACs of one pruned step


@dataclass
class BenchResult:
    case: BenchCase
    device: str
    dense: MethodResult
    cat: MethodResult
    vae_decode_s: float
    cache_mem_gb: float
    select_s: float  # one selection (scores + ranking) on the device
    kmeans_s: float  # one clustering (once per generation)
    kv_cache_mem_gb: float = 0.0  # the per-block K/V caches alone, as stored (part of cache_mem_gb)
    extra: dict = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)  # the dense side: requested, name (the winner), candidates_ms
    split: dict | None = None  # implementation vs pruning (bench.baselines.split), when case.split
    latents: torch.Tensor | None = field(default=None, repr=False)  # final CAT latents (not serialised)

    @property
    def loop_speedup(self) -> float:
        return self.dense.loop_s / self.cat.loop_s

    @property
    def macs_speedup(self) -> float:
        return self.cat.macs_dense / self.cat.macs

    @property
    def end_to_end_speedup(self) -> float:
        return (self.dense.loop_s + self.vae_decode_s) / (self.cat.loop_s + self.vae_decode_s)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("latents", None)
        out.update(
            loop_speedup=self.loop_speedup,
            macs_speedup=self.macs_speedup,
            efficiency=self.loop_speedup / self.macs_speedup,
            end_to_end_speedup=self.end_to_end_speedup,
            select_share_of_pruned_step=(self.select_s / self.cat.pruned_step_s) if self.cat.pruned_step_s else None,
        )
        return out


def environment() -> dict:
    """The bench JSON's environment block: `catprune.evaluation.machine.environment` for the default device (with
    the NVIDIA driver on CUDA machines), and the version of the catprune that ran."""
    device = "cuda" if torch.cuda.is_available() else None
    return {**machine_environment(device, driver=device is not None), "catprune": catprune.__version__}


def build_pipeline(
    preset: str,
    device,
    dtype: torch.dtype,
    seed: int = 0,
    weights: str | None = None,
    text_encoders: bool = False,
):
    """The stock pipeline of ``preset``'s family with random full-size weights, or with ``weights`` (a hub id or a
    local diffusers pipeline folder) the real transformer and VAE read from its ``transformer/`` and ``vae/``
    subfolders. Prompts are random embeddings either way (see the module docstring).

    ``text_encoders``: also build the family's text encoders with random weights and keep them resident on
    ``device`` (not run), so that peak memory is that of a whole ``from_pretrained(...).to(device)`` pipeline.

    Returns ``(pipe, entry)``, ``entry`` the preset's config record.
    """
    configs = {**model_configs(), **TEST_PRESETS}
    if preset not in configs or configs[preset].get("class") not in FAMILIES:
        choices = sorted(k for k, v in configs.items() if v.get("class") in FAMILIES)
        raise ValueError(f"bench: preset: expected one of {choices}, got {preset!r}.")
    entry = configs[preset]
    family = family_of(entry)
    torch.manual_seed(seed)
    pipe = family.build(entry, device, dtype, weights, configs)
    if weights is not None and hasattr(pipe.transformer, "config"):
        entry = {**entry, "config": dict(pipe.transformer.config)}
    if text_encoders:
        pipe._catprune_bench_resident = build_text_encoders(family.text_encoders, device, dtype)
    return pipe, entry


def _embeddings(pipe, entry, batch: int, device, dtype, seed: int = 0, cfg: bool | None = None) -> dict:
    """Keyword arguments of one pipeline call for ``batch`` prompts (random embeddings, the family's guidance)."""
    family = family_of(entry)
    return family.inputs(pipe, entry, batch, family.cfg_default if cfg is None else cfg, device, dtype, seed)


class _StepTimer:
    """Per-step wall times of the transformer loop, from forward hooks on the transformer: a step is from one
    transformer call's start to the next one's (the scheduler step included), the last one to its end. CUDA events
    on GPU: no host syncs. Works with any pipeline; leaves no hooks behind after ``close``."""

    def __init__(self, module, device):
        self.cuda = torch.device(device).type == "cuda"
        self.starts, self.end = [], None
        self._handles = [
            module.register_forward_pre_hook(lambda *_: self.starts.append(self._mark())),
            module.register_forward_hook(lambda *_: setattr(self, "end", self._mark())),
        ]

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self):
        self.starts, self.end = [], None

    def steps(self) -> list[float]:
        marks = self.starts + [self.end]
        if self.cuda:
            cuda_sync()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:], strict=False)]
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    def close(self):
        for handle in self._handles:
            handle.remove()


def _timed_generations(pipe, kwargs: dict, case: BenchCase, device, generator_seed=0):
    """One warm-up generation, then ``case.repeats`` timed ones: ``(per-step times of the median repeat, final
    latents, peak GiB since the warm-up)``."""
    timer = _StepTimer(pipe.transformer, device)
    try:
        latents = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(generator_seed)).images  # warm-up
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runs = []
        for _ in range(case.repeats):
            cuda_sync(device)
            timer.start()
            latents = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(generator_seed)).images
            runs.append(timer.steps())
    finally:
        timer.close()
    runs.sort(key=sum)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else 0.0
    return runs[len(runs) // 2], latents, peak


def _run_method(pipe, embeds, case: BenchCase, config, device, generator_seed=0):
    gc.collect()  # the previous case's garbage (reference cycles holding GPU tensors) must not count in this peak
    catprune.apply(pipe, config)
    kwargs = dict(**embeds, height=case.height, width=case.width, num_inference_steps=case.steps)
    kwargs["output_type"] = "latent"
    steps, latents, peak = _timed_generations(pipe, kwargs, case, device, generator_seed)
    stats = catprune.stats(pipe)
    phases = [r.phase for r in stats.steps]
    dense_steps = [s for s, p in zip(steps, phases, strict=False) if p == "dense"][1:] or steps
    pruned = [s for s, p in zip(steps, phases, strict=False) if p == "pruned"]
    pruned_macs = [r.macs for r in stats.steps if r.phase == "pruned"]
    result = MethodResult(
        loop_s=sum(steps),
        step_s=steps,
        full_step_s=statistics.median(dense_steps),
        pruned_step_s=statistics.median(pruned) if pruned else None,
        peak_mem_gb=peak,
        macs=stats.macs,
        macs_dense=stats.macs_dense,
        pruned_step_macs=int(statistics.median(pruned_macs)) if pruned_macs else None,
    )
    return result, latents


def _time(fn, device, repeats=10) -> float:
    fn()
    cuda_sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        cuda_sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def graph_replay_ms(fn, inputs: dict, repeats: int = 20, warmup: int = 3) -> tuple[float, GraphedCall]:
    """Capture ``fn(**inputs)`` as a CUDA graph and time its replays with CUDA events.

    Returns the median replay time in ms and the `GraphedCall` (its ``output`` holds the last replay's result).
    """
    graphed = GraphedCall(fn, inputs)
    for _ in range(warmup):
        graphed.graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphed.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), graphed


def context_fields(case: BenchCase) -> dict:
    """The `CATConfig` fields of ``case``'s context (the forecast cap only matters with ``extrapolate``) and its
    selection rule."""
    return dict(context=case.context, forecast_max_ratio=case.forecast_max_ratio, selection=case.selection)


def run_case(case: BenchCase, pipe=None, entry=None, device=None, dense=None, time_candidate=None) -> BenchResult:
    """Dense and CAT for one case in this process; returns both timings and the ratios.

    ``dense``: a ``(MethodResult, baseline record)`` measured before for the same size, batch and steps (a stock
    baseline does not depend on the CAT mode), reused instead of measuring again. ``time_candidate``: ``name ->
    seconds per step`` used by ``--dense-baseline best`` to rank the candidates (default: a short timed run each).
    """
    if case.mode not in MODES:
        raise ValueError(f"bench: mode: expected one of {MODES}, got {case.mode!r}.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_dense_baseline(case.dense_baseline, device)
    dtype = getattr(torch, case.dtype)
    if pipe is None:
        pipe, entry = build_pipeline(case.preset, device, dtype)
    family = family_of(entry)
    embeds = _embeddings(pipe, entry, case.batch_size, device, dtype, cfg=case.cfg)
    base = dict(keep_ratio=case.keep_ratio, backend=case.mode, **context_fields(case), **_cache_options(case))
    with torch.no_grad():
        if dense is None and case.dense_baseline != SAME:
            dense = measure_dense(pipe, embeds, case, device, time_candidate)
        if dense is None:
            same, _ = _run_method(pipe, embeds, case, catprune.CATConfig(start_step=DENSE_START, **base), device)
            dense = same, {"requested": SAME, "name": f"{SAME} ({case.mode})", "candidates_ms": {}, "skipped": {}}
        config = catprune.CATConfig(start_step=case.start_step, **base, **_schedule_options(case))
        cat, latents = _run_method(pipe, embeds, case, config, device)
        dense_result = dense[0] if dense[0].macs else replace(dense[0], macs=cat.macs_dense, macs_dense=cat.macs_dense)
        timings = _kernel_and_vae_times(pipe, family, case, latents, device)
        catprune.remove(pipe)
        split_record = _split(pipe, embeds, case, device, dense_result, cat) if case.split else None
    resident = getattr(pipe, "_catprune_bench_resident", None)
    extra = dict(
        family=family.name,
        cfg=family.cfg_default if case.cfg is None else case.cfg,
        text_encoders_resident=[e.config.model_type for e in resident] if resident else [],
    )
    return BenchResult(
        case=case,
        device=torch.cuda.get_device_name() if torch.device(device).type == "cuda" else platform.processor() or "cpu",
        dense=dense_result,
        cat=cat,
        **timings,
        extra=extra,
        baseline=dict(dense[1]),
        split=split_record,
        latents=latents.detach().cpu(),
    )


def _kernel_and_vae_times(pipe, family, case: BenchCase, latents, device) -> dict:
    """The CAT cache size, one selection, one clustering and the VAE decode (after a CAT generation)."""
    view = catprune.inspect(pipe)
    kernels = catprune.step_kernels(pipe)
    select, clusterer = kernels.select, kernels.cluster
    if kernels.fused:  # time them as they run in the fused step: inside a CUDA graph
        select = GraphedCall(lambda: kernels.select(), {}, state=list(kernels.state))
        clusterer = GraphedCall(lambda: kernels.cluster(), {})
    select_s = _time(select, device, repeats=20)
    kmeans_s = _time(clusterer, device, 5)
    vae_s = 0.0
    if case.vae and family.decode is not None:
        if case.compile_vae:
            compile_vae(pipe.vae, case.compile_vae)
            family.decode(pipe, latents, case.height, case.width)  # compiles (and records graphs) before timing
        vae_s = _time(lambda: family.decode(pipe, latents, case.height, case.width), device, repeats=3)
    return dict(
        vae_decode_s=vae_s,
        cache_mem_gb=view.cache_bytes / 2**30,
        kv_cache_mem_gb=view.kv_cache_bytes / 2**30,
        select_s=select_s,
        kmeans_s=kmeans_s,
    )


def _cache_options(case: BenchCase) -> dict:
    """The case's CATConfig.cache_dtype, when it sets one."""
    return {} if case.cache_dtype is None else dict(cache_dtype=case.cache_dtype)


def _schedule_options(case: BenchCase) -> dict:
    """The case's keep-ratio schedule and final dense steps, when it sets them (the CAT side only)."""
    out = {} if case.keep_ratio_end is None else dict(keep_ratio_end=case.keep_ratio_end)
    return out | ({} if not case.final_dense_steps else dict(final_dense_steps=case.final_dense_steps))


def _split(pipe, embeds, case: BenchCase, device, dense: MethodResult, cat: MethodResult) -> dict:
    """Time catprune's full-selection step (every token selected, same mode) and split the speed-up into
    implementation (stock step vs full-selection step) and pruning (full-selection step vs pruned step)."""
    full_selection = dict(keep_ratio=FULL_SELECTION_KEEP, start_step=case.start_step, backend=case.mode)
    config = catprune.CATConfig(**full_selection, **context_fields(case), **_cache_options(case))
    full, _ = _run_method(pipe, embeds, replace(case, repeats=1), config, device)
    catprune.remove(pipe)
    return split_speedup(dense.full_step_s, full, cat)


def format_table(results: list[BenchResult]) -> str:
    """A plain-text table, one row per case."""
    head = (
        f"{'preset':<18}{'size':>10}{'B':>3}{'N':>4}{'mode':>19}{'dense ms/step':>14}{'pruned ms/step':>15}"
        f"{'loop dense s':>13}{'loop CAT s':>11}{'MACs x':>8}{'loop x':>8}{'eff':>6}{'e2e x':>7}{'sel %':>7}"
        f"{'kmeans ms':>10}{'cache GiB':>10}{'peak GiB dense/CAT':>19}{'context':>12}  dense as"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        c = r.case
        pruned = r.cat.pruned_step_s
        lines.append(
            f"{c.preset:<18}{f'{c.width}x{c.height}':>10}{c.batch_size:>3}{c.steps:>4}{c.mode:>19}"
            f"{r.dense.full_step_s * 1e3:>14.2f}{(pruned or 0) * 1e3:>15.2f}{r.dense.loop_s:>13.3f}"
            f"{r.cat.loop_s:>11.3f}{r.macs_speedup:>8.2f}{r.loop_speedup:>8.2f}"
            f"{r.loop_speedup / r.macs_speedup:>6.2f}{r.end_to_end_speedup:>7.2f}"
            f"{(100 * r.select_s / pruned if pruned else 0):>7.2f}{r.kmeans_s * 1e3:>10.2f}{r.cache_mem_gb:>10.2f}"
            f"{f'{r.dense.peak_mem_gb:.2f}/{r.cat.peak_mem_gb:.2f}':>19}{c.context:>12}  {r.baseline.get('name', SAME)}"
        )
    return "\n".join(lines)


def save_json(results: list[BenchResult], path: str) -> None:
    with open(path, "w") as f:
        results_json = [r.to_dict() for r in results]
        json.dump({"environment": environment(), "results": results_json, "summary": summarize(results)}, f, indent=2)
