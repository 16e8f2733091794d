"""The per-transformer runtime: new-generation detection, the step schedule and selection, one call at a time.

It drives a model-family `Adapter` (the contract in `contract.py`) and imports nothing from `catprune.adapters`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..algorithm import (
    cluster_features,
    cluster_quotas,
    kmeans,
    kmeans_init_uniforms,
    scatter_tokens_,
    update_age,
    update_staleness,
)
from ..config import Backend, CATConfig, Context, Selection
from .backends import StepRunner, keeping_stream
from .choice import choose_tokens, note_all_computed, note_computed, selection_fn, start_rates
from .contract import Adapter, CallInfo
from .forecast import ContextForecast, forecasting
from .generation import Generation, SignatureBuffers
from .modulation import ModulationRows
from .probe import PipelineProbe
from .stats import PruneStats, StepRecord

_MAX_SIGNATURES = 2  # shape signatures whose buffers (and graphs) are kept alive at once


@dataclass(frozen=True)
class StepKernels:
    """The current generation's clustering and selection as callables, for benchmarks (`catprune.step_kernels`).

    ``select()`` chooses the next step's tokens again, in place: it writes only the tensors in ``state``.
    ``cluster()`` runs the k-means of the capture step again on the current outputs and returns the labels (S, M)
    without storing them. ``fused``: the runtime runs both inside its CUDA-graph steps.
    """

    select: Callable[[], torch.Tensor]
    cluster: Callable[[], torch.Tensor]
    state: tuple[torch.Tensor, ...]
    fused: bool


class Picks(NamedTuple):
    """The persistent buffers of one selection size k: quotas (C,) by cluster rank, idx (S, k), idx_rows (B, k)."""

    k: int
    quotas: torch.Tensor
    idx: torch.Tensor
    idx_rows: torch.Tensor


class Runtime:
    """State of CAT Pruning for one transformer; called in place of its forward.

    One call is one denoising step. A new generation is detected before the call touches any state: through the
    pipeline's scheduler (`PipelineProbe.step_index`) when catprune was applied to a pipeline, through the timestep
    otherwise (timesteps decrease within a generation), and always when the batch size, resolution, text length,
    device or dtype change. `reset` drops the current `Generation`.

    All per-generation tensors live in persistent per-signature buffers written in place, so that with the CUDA-graph
    backends a whole pruned step (the pruned forward, the output scatter, the staleness update and the selection of
    the next step's tokens) is one graph replay with no host synchronisation.
    """

    def __init__(self, adapter: Adapter, config: CATConfig, pipe=None, runner: StepRunner | None = None):
        self.adapter = adapter
        self.config = config
        self.probe = PipelineProbe(pipe)
        self.runner = runner if runner is not None else StepRunner(config.backend)
        # the fused step, except for RANDOM whose CPU generator cannot be captured in a graph
        self.fuse = self.runner.fuse and config.selection is not Selection.RANDOM
        self.generation: Generation | None = None
        self._no_stats = PruneStats()  # what `stats` shows before the first recorded call of a generation
        self.observers: list[Callable[[StepRecord], None]] = []
        self._buffers: dict[tuple, SignatureBuffers] = {}
        self._macs_cache: dict[tuple, int] = {}

    # ------------------------------------------------------------------ state
    def reset(self, release: bool = False) -> None:
        """Forget the current generation; the next call is step 0. ``release`` also frees the buffers and graphs."""
        self.generation = None
        self._no_stats = PruneStats()
        if release:
            self._buffers.clear()
            self._macs_cache.clear()
            self.runner.clear()

    @property
    def stats(self) -> PruneStats:
        """The current generation's step records, the same object for the whole generation (read by the evaluation
        harness until it uses `inspect`)."""
        return self.generation.stats if self.generation is not None else self._no_stats

    @property
    def idx_rows(self) -> torch.Tensor | None:
        """(B, k) selection of the next pruned step, or None (read by the evaluation harness, see `stats`)."""
        return self.generation.idx_rows if self.generation is not None else None

    @staticmethod
    def _timestep_value(t) -> float:
        if isinstance(t, torch.Tensor):
            return float(t.reshape(-1)[0].item())
        return float(t)

    def _is_new_generation(self, info: CallInfo, tracked: bool, step_index) -> bool:
        gen = self.generation
        if gen is None or gen.step == 0 or gen.broken or info.signature != gen.signature:
            return True
        if tracked and step_index is not None:
            return gen.last_step_index is not None and step_index <= gen.last_step_index
        if tracked and gen.last_step_index is not None:
            return True  # the scheduler was reset by set_timesteps since the last call
        # bare transformer: timesteps decrease within a generation (one host sync per call, only on this path)
        return self._timestep_value(info.timestep) >= self._timestep_value(gen.last_timestep)

    def _new_generation(self, info: CallInfo, memo: dict) -> Generation:
        """A generation for ``info``'s signature; everything that can fail runs before any state is touched."""
        config = self.config
        if not config.pruning_enabled:
            return Generation(info.signature, memo)  # counts and records dense steps only
        m, num_steps = info.num_tokens, self.probe.num_steps()
        if config.final_dense_steps and num_steps is None:
            raise ValueError(
                f"CATConfig.final_dense_steps: expected a generation whose step count catprune can read from the "
                f"pipeline's scheduler, got a call of a bare transformer (final_dense_steps="
                f"{config.final_dense_steps}). Apply catprune to the pipeline (catprune.apply(pipe, config)), or use "
                "final_dense_steps=0."
            )
        clusters = config.clusters_for(m)
        shared = self.probe.shared_rows(config.cfg, info)
        self.runner.check_device(info.device)
        buffers = self._buffers.get(info.signature)
        if buffers is None:
            if len(self._buffers) >= _MAX_SIGNATURES:
                self._buffers.clear()
                self.runner.clear()
            forecast = None
            if config.context is Context.EXTRAPOLATE:
                forecast = ContextForecast(info.batch, m, info.device, config.forecast_max_ratio)
            storage = config.cache_dtype.torch_dtype if config.cache_dtype is not None else None
            buffers = SignatureBuffers(self.adapter.num_caches(), forecast, storage)
            self._buffers[info.signature] = buffers
        gen = Generation(info.signature, memo, num_clusters=clusters, shared=shared, buffers=buffers)
        gen.num_steps = num_steps
        if self.runner.modulation_chunk and self.adapter.modulation_inputs:
            gen.modulation = ModulationRows(self.adapter, self.probe, self.runner.modulation_chunk)
        store, b, device = buffers.store, info.batch, info.device
        rows = torch.arange(b, device=device)
        if shared:
            gen.score_rows = store.put("score_rows", rows[b // 2 :])  # (S,) the conditional rows score
            gen.row_group = store.put("row_group", rows % (b // 2))  # (B,)
        gen.uniforms = store.put("uniforms", kmeans_init_uniforms(clusters, config.seed).to(device))  # (C,)
        self._use(gen, self._picks(gen, config.tokens_kept(m)))  # the first pruned step: progress 0
        return gen

    def _picks(self, gen: Generation, k: int) -> Picks:
        """The selection buffers of size ``k`` (one set per k, so graphs keyed by k keep their addresses)."""
        config, store, device = self.config, gen.buffers.store, gen.buffers.store["uniforms"].device
        quotas = store.get(f"quotas{k}")
        if quotas is None:
            clusters = gen.num_clusters if config.selection is Selection.CAT else 1
            share = round(config.magnitude_share * k)
            values = torch.tensor(cluster_quotas(share, clusters, config.cluster_share_weights), device=device)
            quotas = store.put(f"quotas{k}", values)  # (C,) magnitude picks by cluster rank
        groups = gen.batch // 2 if gen.shared else gen.batch
        idx = store.buffer(f"idx{k}", (groups, k), torch.long, device)  # (S, k)
        rows = idx if gen.row_group is None else store.buffer(f"idx_rows{k}", (gen.batch, k), torch.long, device)
        return Picks(k, quotas, idx, rows)

    @staticmethod
    def _use(gen: Generation, picks: Picks) -> None:
        gen.k, gen.quotas, gen.idx, gen.idx_rows = picks

    def _k_at(self, gen: Generation, step: int, info: CallInfo) -> int:
        """k of pruned step ``step`` under the keep-ratio schedule (constant without ``keep_ratio_end``)."""
        config, m = self.config, info.num_tokens
        if config.keep_ratio_end is None:
            return config.tokens_kept(m)
        if gen.num_steps is not None:  # pruned step j of n, known from the pipeline's scheduler
            j, n = step - config.start_step, gen.num_steps - config.final_dense_steps - config.start_step
            return config.tokens_kept(m, j / (n - 1) if n > 1 else 0.0)
        # bare transformer: progress from the current timestep (one host sync per step, only on this path)
        t, tc = self._timestep_value(info.timestep), gen.capture_time
        return config.tokens_kept(m, 1.0 - t / tc if tc else 0.0)

    def _is_final(self, gen: Generation, step: int) -> bool:
        """Whether ``step`` is one of the ``final_dense_steps`` last steps of the generation."""
        final = self.config.final_dense_steps
        return final > 0 and step >= gen.num_steps - final

    def _is_refresh(self, step: int) -> bool:
        every = self.config.refresh_every
        return every is not None and (step - self.config.start_step + 1) % every == 0

    @staticmethod
    def _times(info: CallInfo) -> torch.Tensor:
        """(B,) float32 timestep of the call, as a device tensor (no host sync)."""
        t = info.timestep if isinstance(info.timestep, torch.Tensor) else torch.tensor(float(info.timestep))
        return t.to(device=info.device, dtype=torch.float32).reshape(-1).expand(info.batch)  # (B,)

    # ------------------------------------------------------------------ one call
    def __call__(self, original, args, kwargs):
        if not self.config.pruning_enabled:
            return self._record_only(original, args, kwargs)
        memo = self.generation.memo if self.generation is not None else {}
        info = self.adapter.inspect_call(args, kwargs, memo)
        if self.adapter.is_auxiliary(info):
            return original(*args, **kwargs)
        tracked, step_index = self.probe.step_index()
        if self._is_new_generation(info, tracked, step_index):
            self.generation = self._new_generation(info, memo)
        gen = self.generation
        try:
            with keeping_stream(info.device):  # a step that fails on an adapter's second stream
                out = self._step(gen, original, args, kwargs, info)
        except BaseException:
            gen.broken = True  # the next call starts a new generation
            raise
        self._advance_counter(gen, info, tracked, step_index)
        return out

    def _record_only(self, original, args, kwargs):
        """Pruning off: the model's own forward, untouched; a call that can be read is counted and recorded."""
        memo = self.generation.memo if self.generation is not None else {}
        try:
            info = self.adapter.inspect_call(args, kwargs, memo)
        except (ValueError, TypeError, NotImplementedError, KeyError):
            info = None  # not a call catprune could prune: the forward reports its own errors, if any
        out = original(*args, **kwargs)
        if info is None or self.adapter.is_auxiliary(info):
            return out
        tracked, step_index = self.probe.step_index()
        if self._is_new_generation(info, tracked, step_index):
            self.generation = Generation(info.signature, memo)
        self._record(self.generation, info, "dense", info.num_tokens)
        self._advance_counter(self.generation, info, tracked, step_index)
        return out

    @staticmethod
    def _advance_counter(gen: Generation, info: CallInfo, tracked: bool, step_index) -> None:
        gen.last_step_index = step_index if tracked else None
        gen.last_timestep = info.timestep  # compared lazily, only when the scheduler cannot tell
        gen.step += 1

    def _step(self, gen: Generation, original, args, kwargs, info: CallInfo):
        t0, i, m = self.config.start_step, gen.step, info.num_tokens
        if i < t0 - 1 or self._is_final(gen, i):
            if i == t0 - 2 and gen.forecast is not None:  # the reference step also gives the forecast its K0
                out, tokens = self._filling_step(gen, original, args, kwargs, info, roll=False)
            else:
                out = self._dense(gen, original, args, kwargs, info)
                tokens = self.adapter.output_tokens(out, info) if i == t0 - 2 else None
            if i == t0 - 2:
                gen.reference = gen.buffers.store.put("reference", gen.score_view(tokens).float())  # (S, M, P)
            self._record(gen, info, "dense", m)
            return out
        if i == t0 - 1:
            out = self._capture(gen, original, args, kwargs, info)
            self._record(gen, info, "capture", m)
            return out
        if self._is_refresh(i):
            out = self._refresh(gen, original, args, kwargs, info)
            self._record(gen, info, "refresh", m)
            return out
        selected, k = gen.idx_rows.clone(), gen.k  # (B, k) the tokens this step computes (the step overwrites them)
        out = self._pruned(gen, info, self._picks(gen, self._k_at(gen, i + 1, info)))
        self._record(gen, info, "pruned", k, selected)
        return out

    def _full_step(self, gen: Generation, original, args, kwargs, info: CallInfo, roll: bool = True):
        """A dense step (eager) that fills every block's K/V cache; when forecasting, K0 <- K1 first (``roll``)
        and the times advance after."""
        forecast = gen.forecast
        if forecast is not None and roll:
            forecast.roll(gen.caches)
        with self.adapter.capture(gen.caches, info):
            out = original(*args, **kwargs)
        if forecast is not None:
            forecast.stamp(self._times(info))
        return out

    def _filling_step(self, gen: Generation, original, args, kwargs, info: CallInfo, roll: bool = True):
        """A dense step that fills every block's K/V cache (the capture, and the forecast's reference step): the
        full-selection pruned step where the runner allows it, else the hooked dense forward. Returns the
        transformer's output and its (B, M, P) tokens."""
        inputs = self._full_capture_inputs(gen, info)
        if inputs is None:
            out = self._full_step(gen, original, args, kwargs, info, roll=roll)
            return out, self.adapter.output_tokens(out, info)  # (B, M, P)
        tokens = self._full_selection(gen, info, inputs)  # (B, M, P)
        return self.adapter.build_output(tokens, info), tokens

    def _capture(self, gen: Generation, original, args, kwargs, info: CallInfo):
        """The last dense step: fill the K/V caches, cluster the tokens and choose the first selection."""
        out, tokens = self._filling_step(gen, original, args, kwargs, info)
        if self.config.keep_ratio_end is not None and gen.num_steps is None:
            gen.capture_time = self._timestep_value(info.timestep)  # the schedule's progress on a bare transformer
        store = gen.buffers.store
        gen.outputs = store.put("outputs", tokens)  # (B, M, P)
        shape, device = (gen.idx.shape[0], info.num_tokens), gen.outputs.device
        gen.labels = store.buffer("labels", shape, torch.long, device)  # (S, M)
        gen.staleness = store.buffer("staleness", shape, torch.float32, device)  # (S, M)
        gen.age = store.buffer("age", shape, torch.long, device)  # (S, M)
        if self.config.selection is Selection.DRIFT:
            gen.rate = store.buffer("rate", shape, torch.float32, device)  # (S, M)
        gen.rng = torch.Generator(device="cpu").manual_seed(self.config.seed)
        if self.fuse:  # k-means (~250 small kernels) and the first selection as one graph replay
            mutable = [gen.labels, gen.staleness, gen.age, gen.idx, gen.idx_rows, *gen.selection_state()]
            key = ("cluster", info.signature, gen.k)
            self.runner.run(key, lambda **_: self._cluster_and_select(gen, info), {}, mutable)
        else:
            self._cluster_and_select(gen, info)
        return out

    def _full_capture_inputs(self, gen: Generation, info: CallInfo) -> dict[str, torch.Tensor] | None:
        """The step inputs when a cache-filling step runs as a full-selection pruned step
        (`StepRunner.full_capture`), else None: the runner says no, or the call has inputs only the eager path
        handles."""
        return self._step_inputs(gen, info) if self.runner.full_capture else None

    def _step_inputs(self, gen: Generation, info: CallInfo) -> dict[str, torch.Tensor] | None:
        """`Adapter.fast_inputs` of a full-selection or pruned step, with the step's modulation row if the
        generation has them (None: the call needs the eager path)."""
        inputs = self.adapter.fast_inputs(info)
        if inputs is not None and gen.modulation is not None:
            inputs["modulation"] = gen.modulation.row(inputs, info)  # (B, W)
        return inputs

    @torch.no_grad()
    def _full_selection(self, gen: Generation, info: CallInfo, inputs: dict) -> torch.Tensor:
        """A cache-filling step as the pruned step with every token selected: it writes every token's K/V into the
        caches (allocated by the adapter's capture, whose hooks never run) and returns the (B, M, P) outputs. With
        the forecast every token's K0 <- K1 and its times advance too (what the hooked step's roll and stamp do),
        and every token's forecast ratio is 0: the step attends to the fresh keys / values alone."""
        m, forecast = info.num_tokens, gen.forecast
        with self.adapter.capture(gen.caches, info):
            pass  # allocates every block's cache; the step below fills all of it
        if forecast is not None:
            forecast.prepare(gen.caches)  # K0 and the working buffer, before anything is traced or captured
        rows = gen.buffers.store.buffer("all_rows", (info.batch, m), torch.long, info.device)  # (B, M) every token
        rows.copy_(torch.arange(m, device=info.device).expand_as(rows))
        core = self.runner.compiled(("pruned", info.signature, m), lambda: self.adapter.pruned_fn(gen.caches, info))
        times = {"step_time": self._times(info)} if forecast is not None else {}
        step = lambda **t: forecasting(core, forecast, rows, **t)  # noqa: E731
        state = self._forecast_state(gen)
        return self.runner.run(("capture", info.signature), step, dict(inputs, **times), state=state)  # (B, M, P)

    def _refresh(self, gen: Generation, original, args, kwargs, info: CallInfo):
        """A refresh step (``refresh_every``): dense, every cache refilled, every token counted as computed."""
        out = self._full_step(gen, original, args, kwargs, info)
        fresh = self.adapter.output_tokens(out, info)  # (B, M, P)
        note_all_computed(gen, fresh)
        gen.outputs.copy_(fresh)
        gen.staleness.mul_(self.config.staleness_decay).add_(1.0)  # f <- gamma * f + 1 for every token
        gen.age.zero_()
        self._use(gen, self._picks(gen, self._k_at(gen, gen.step + 1, info)))
        self._select_next(gen)
        return out

    def _cluster(self, gen: Generation, grid: tuple[int, int]) -> torch.Tensor:
        """k-means labels (S, M) of the current outputs (fixed for the generation once stored)."""
        config = self.config
        features = cluster_features(gen.score_view(gen.outputs).float(), grid, config.cluster_feature_weight)
        return kmeans(features, gen.num_clusters, config.kmeans_iters, config.seed, gen.uniforms)  # (S, M)

    def _cluster_and_select(self, gen: Generation, info: CallInfo) -> torch.Tensor:
        if self.config.selection is Selection.CAT:
            gen.labels.copy_(self._cluster(gen, info.grid))
        else:  # ablations / baselines: one cluster
            gen.labels.zero_()
        gen.staleness.zero_()
        gen.age.zero_()
        start_rates(gen)
        self._select_next(gen)
        return gen.idx

    def _dense(self, gen: Generation, original, args, kwargs, info: CallInfo):
        """A dense step of a pruning generation: the full-selection step of the capture where the runner runs that
        one so (`StepRunner.full_capture`; the same graph, faster than the model's forward) and there is no
        forecast to keep, else the model's forward (compiled / graphed on those backends)."""
        if gen.forecast is None and (inputs := self._full_capture_inputs(gen, info)) is not None:
            return self.adapter.build_output(self._full_selection(gen, info, inputs), info)
        inputs = None if self.runner.backend is Backend.EAGER else self.adapter.fast_inputs(info)
        if inputs is None:
            return original(*args, **kwargs)
        dense = self.runner.compiled(("dense", info.signature), lambda: self.adapter.dense_fn(original))
        sample = self.runner.run(("dense", info.signature), dense, inputs)
        return self.adapter.wrap_sample(sample, info)

    @torch.no_grad()  # cached state written in place: a pruned step is inference only (the forecast uses out= ops)
    def _pruned(self, gen: Generation, info: CallInfo, nxt: Picks):
        """One pruned step over ``gen``'s selection; chooses the next step's ``nxt.k`` tokens into ``nxt``."""
        static = self.runner.backend is not Backend.EAGER or self.fuse  # fused on eager: the fused logic, no graphs
        inputs = self._step_inputs(gen, info) if static else None
        now, forecast = Picks(gen.k, gen.quotas, gen.idx, gen.idx_rows), gen.forecast
        times = {"step_time": self._times(info)} if forecast is not None else {}

        def forward(core, **tensors):  # the block math, between the forecast's begin and commit
            return forecasting(core, forecast, now.idx_rows, **tensors)

        state = self._forecast_state(gen)
        if inputs is None:  # eager (or a call the static path does not cover)

            def core(idx):
                return self.adapter.pruned_forward(gen.caches, idx, info)  # (B, k, P)

            self._advance(gen, forward(core, **times), now, nxt)
            return self.adapter.build_output(gen.outputs, info)
        caches, key = gen.caches, ("pruned", info.signature, now.k)
        core = self.runner.compiled(key, lambda: self.adapter.pruned_fn(caches, info))
        if not self.fuse:
            selected = self.runner.run(key, lambda **t: forward(core, **t), dict(inputs, **times), state=state)
            self._advance(gen, selected, now, nxt)
            return self.adapter.build_output(gen.outputs, info)

        def step(**tensors):
            self._advance(gen, forward(core, **tensors), now, nxt)
            return self.adapter.unpatchify(gen.outputs, info)  # (B, C, H, W)

        mutable = [gen.outputs, gen.staleness, gen.age, *gen.selection_state(), nxt.idx, nxt.idx_rows, *state]
        sample = self.runner.run(("step", *key, nxt.k), step, dict(inputs, **times), state=mutable)
        self._use(gen, nxt)  # a graph replay runs no Python: the next step's buffers are chosen here too
        return self.adapter.wrap_sample(sample, info)

    @staticmethod
    def _forecast_state(gen: Generation) -> list[torch.Tensor]:
        """Tensors a forecasting step advances (not idempotently): restored after a graph's warm-up."""
        forecast = gen.forecast
        if forecast is None:
            return []
        return [forecast.t1, forecast.t0, *(t for c in gen.caches for t in c.tensors.values())]

    def _advance(self, gen: Generation, selected: torch.Tensor, now: Picks, nxt: Picks) -> None:
        """After a pruned step: store the fresh outputs, age the staleness, choose the next step's tokens."""
        note_computed(gen, now.idx, selected)
        scatter_tokens_(gen.outputs, now.idx_rows, selected)  # (B, M, P)
        gen.staleness.copy_(update_staleness(gen.staleness, now.idx, self.config.staleness_decay))
        gen.age.copy_(update_age(gen.age, now.idx))
        self._use(gen, nxt)
        self._select_next(gen)

    def _select_next(self, gen: Generation) -> torch.Tensor:
        """Choose the next step's tokens into the persistent ``idx`` / ``idx_rows`` buffers (in place)."""
        config = self.config
        select = None
        if config.selection is not Selection.RANDOM:  # compiled on the compile backends (one function per k)
            key = ("select", gen.signature, gen.k)
            select = self.runner.compiled(key, lambda: selection_fn(config, gen.k, gen.num_clusters))
        idx = choose_tokens(config, gen, select)  # (S, k)
        gen.idx.copy_(idx)
        if gen.row_group is not None:
            torch.index_select(gen.idx, 0, gen.row_group, out=gen.idx_rows)  # (B, k)
        return gen.idx

    def kernels(self) -> StepKernels:
        """The current generation's clustering and selection as callables (see `StepKernels`); ValueError before
        the capture step of a pruning generation."""
        gen = self.generation
        if gen is None or gen.labels is None:
            raise ValueError(
                "catprune.step_kernels: expected a generation that reached its capture step (start_step - 1), got "
                "none. Run a generation with pruning on first."
            )
        return StepKernels(
            select=lambda: self._select_next(gen),
            cluster=lambda: self._cluster(gen, gen.grid),
            state=(gen.idx, gen.idx_rows),
            fused=self.fuse,
        )

    # ------------------------------------------------------------------ accounting
    def _macs(self, info: CallInfo, computed: int) -> int:
        key = (info.signature, computed)
        if key not in self._macs_cache:
            self._macs_cache[key] = self.adapter.macs(info, computed)
        return self._macs_cache[key]

    def _record(self, gen: Generation, info: CallInfo, phase: str, computed: int, selected=None) -> None:
        record = StepRecord(
            step=gen.step,
            phase=phase,
            rows=info.batch,
            tokens=info.num_tokens,
            computed=computed,
            macs_dense=self._macs(info, info.num_tokens),
            macs=self._macs(info, computed),
            selected=selected,
        )
        gen.records.append(record)
        for observer in list(self.observers):
            observer(record)
