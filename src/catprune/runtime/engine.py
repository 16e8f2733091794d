"""The per-transformer runtime: step counter, caches, staleness and selection, driven once per transformer call."""

from __future__ import annotations

import weakref

import torch

from ..adapters import Adapter, CallInfo, LayerCache
from ..algorithm import (
    cluster_features,
    cluster_quotas,
    cluster_scores,
    kmeans,
    kmeans_init_uniforms,
    ras_priority,
    scatter_tokens_,
    select_tokens,
    topk_tokens,
    update_age,
    update_staleness,
)
from ..config import CATConfig, CFGMode, Selection
from .backends import StepRunner
from .stats import PruneStats, StepRecord

_MAX_SIGNATURES = 2  # shape signatures whose buffers (and graphs) are kept alive at once


class _SignatureState:
    """Buffers of one shape signature, allocated once and then written in place: captured CUDA graphs keep
    pointing at them across generations."""

    def __init__(self, num_blocks: int):
        self.caches = [LayerCache() for _ in range(num_blocks)]
        self._store = LayerCache()  # the same named-buffer store as the K/V caches

    def get(self, name: str, shape, dtype, device) -> torch.Tensor:
        return self._store.buffer(name, shape, device, dtype)

    def put(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Copy ``value`` into the persistent buffer ``name`` (allocated on first use) and return the buffer."""
        return self.get(name, value.shape, value.dtype, value.device).copy_(value)


class Runtime:
    """State of CAT Pruning for one transformer; called in place of its forward.

    One call is one denoising step. A new generation is detected before the call touches any state: through the
    pipeline's scheduler (``step_index`` is None at the first step of every diffusers generation) when catprune was
    applied to a pipeline, through the timestep otherwise (timesteps decrease within a generation), and always when
    the batch size, resolution, text length, device or dtype change. `reset` starts one explicitly.

    All per-generation tensors live in persistent per-signature buffers written in place, so that with the CUDA-graph
    backends a whole pruned step (the pruned forward, the output scatter, the staleness update and the selection of
    the next step's tokens) is one graph replay with no host synchronisation.
    """

    def __init__(self, adapter: Adapter, config: CATConfig, pipe=None):
        self.adapter = adapter
        self.config = config
        self._pipe = weakref.ref(pipe) if pipe is not None else None
        self.stats = PruneStats()
        self._macs_cache: dict[tuple, int] = {}
        self._states: dict[tuple, _SignatureState] = {}
        self.runner = StepRunner(config.backend.value)
        # the whole pruned step in one graph, except for RANDOM whose CPU generator cannot be captured
        self.fuse = self.runner.uses_graphs and config.selection is not Selection.RANDOM
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self, release: bool = False) -> None:
        """Forget the current generation; the next call is step 0. ``release`` also frees the buffers and graphs."""
        self.step = 0
        self.signature = None
        self._last_timestep = None  # timestep of the previous call (tensor or number)
        self._last_step_index: int | None = None
        self._broken = False
        self.state: _SignatureState | None = None
        self.caches: list[LayerCache] = []
        # views of the persistent buffers of the current signature (None until the step that fills them)
        self.reference = None  # (S, M, P) float32 n_ref
        self.outputs = None  # (B, M, P) latest per-token output of every token
        self.labels = None  # (S, M) cluster labels
        self.staleness = None  # (S, M) f
        self.age = None  # (S, M) steps since each token was last computed (tie-break of f)
        self.idx = None  # (S, k) selection for the next step
        self.idx_rows = None  # (B, k) the same, per batch row
        self.stats = PruneStats()
        if release:
            self._states.clear()
            self._macs_cache.clear()
            self.runner.clear()

    def _scheduler_step_index(self):
        pipe = self._pipe() if self._pipe is not None else None
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None or not hasattr(type(scheduler), "step_index"):
            return False, None
        return True, scheduler.step_index

    @staticmethod
    def _timestep_value(t) -> float:
        if isinstance(t, torch.Tensor):
            return float(t.reshape(-1)[0].item())
        return float(t)

    def _is_new_generation(self, info: CallInfo, tracked: bool, step_index) -> bool:
        if self.step == 0 or self._broken or info.signature != self.signature:
            return True
        if tracked and step_index is not None:
            return self._last_step_index is not None and step_index <= self._last_step_index
        if tracked and self._last_step_index is not None:
            return True  # the scheduler was reset by set_timesteps since the last call
        # bare transformer: timesteps decrease within a generation (one host sync per call, only on this path)
        return self._timestep_value(info.timestep) >= self._timestep_value(self._last_timestep)

    def _cfg_shared(self, info: CallInfo) -> bool:
        mode, batch = self.config.cfg, info.batch
        if mode is CFGMode.PER_ROW:
            return False
        if mode is CFGMode.AUTO:
            pipe = self._pipe() if self._pipe is not None else None
            if pipe is None or batch % 2:
                return False
            flag = getattr(pipe, "do_classifier_free_guidance", None)
            if flag is not None:
                return bool(flag)
            # pipelines that keep the decision in a local variable (PixArtSigmaPipeline): a CFG batch repeats the
            # same latents as [uncond rows; cond rows]; one host sync per generation
            x = info.arguments.get("hidden_states")
            return isinstance(x, torch.Tensor) and torch.equal(x[: batch // 2], x[batch // 2 :])
        if batch % 2:
            raise ValueError(
                f"CATConfig.cfg: 'shared' expects an even batch [unconditional rows, conditional rows], got "
                f"{batch} rows. Use cfg='per_row' or cfg='auto'."
            )
        return True

    def _start_generation(self, info: CallInfo) -> None:
        # everything that can fail is computed before any state is touched
        cfg = self.config
        m = info.num_tokens
        k = cfg.tokens_kept(m)
        clusters = cfg.clusters_for(m)
        shared = self._cfg_shared(info)
        if self.runner.uses_graphs and info.device.type != "cuda":
            raise ValueError(
                f"CATConfig.backend: {cfg.backend.value!r} captures CUDA graphs and needs CUDA inputs, got inputs on "
                f"{info.device}. Use backend='eager' or 'compile' on this device."
            )
        num_blocks = self.adapter.num_caches()
        signature = info.signature

        state = self._states.get(signature)
        if state is None:
            if len(self._states) >= _MAX_SIGNATURES:
                self._states.clear()
                self.runner.clear()
            state = self._states[signature] = _SignatureState(num_blocks)
        self.reset()
        self.state, self.caches, self.signature = state, state.caches, signature
        self.k, self.num_clusters, self.shared = k, clusters, shared
        b, device = info.batch, info.device
        groups = b // 2 if shared else b
        rows = torch.arange(b, device=device)
        self.score_rows = state.put("score_rows", rows[groups:]) if shared else None  # conditional rows score
        self.row_group = state.put("row_group", rows % groups) if shared else None
        policy_clusters = clusters if cfg.selection is Selection.CAT else 1
        quotas = cluster_quotas(round(cfg.magnitude_share * k), policy_clusters, cfg.cluster_share_weights)
        self.quotas = state.put("quotas", torch.tensor(quotas, device=device))  # (C,) by cluster rank
        self.uniforms = state.put("uniforms", kmeans_init_uniforms(clusters, cfg.seed).to(device))  # (C,)
        self.idx = state.get("idx", (groups, k), torch.long, device)
        self.idx_rows = self.idx if self.row_group is None else state.get("idx_rows", (b, k), torch.long, device)

    # ------------------------------------------------------------------ one call
    def __call__(self, original, args, kwargs):
        if not self.config.pruning_enabled:
            return original(*args, **kwargs)  # exact dense: nothing recorded, nothing touched
        info = self.adapter.inspect_call(args, kwargs)
        if self.adapter.is_auxiliary(info):
            return original(*args, **kwargs)
        tracked, step_index = self._scheduler_step_index()
        if self._is_new_generation(info, tracked, step_index):
            self._start_generation(info)
        try:
            out = self._step(original, args, kwargs, info)
        except BaseException:
            self._broken = True  # the next call starts a new generation
            raise
        self._last_step_index = step_index if tracked else None
        self._last_timestep = info.timestep  # compared lazily, only when the scheduler cannot tell
        self.step += 1
        return out

    def _step(self, original, args, kwargs, info: CallInfo):
        t0 = self.config.start_step
        i = self.step
        m = info.num_tokens
        if i < t0 - 1:
            out = self._dense(original, args, kwargs, info)
            if i == t0 - 2:
                tokens = self._score_view(self.adapter.output_tokens(out, info)).float()  # (S, M, P)
                self.reference = self.state.put("reference", tokens)
            self._record(info, "dense", m)
            return out
        if i == t0 - 1:
            with self.adapter.capture(self.caches, info):
                out = original(*args, **kwargs)
            self.outputs = self.state.put("outputs", self.adapter.output_tokens(out, info))  # (B, M, P)
            shape, device = (self.idx.shape[0], m), self.outputs.device
            self.labels = self.state.get("labels", shape, torch.long, device)  # (S, M)
            self.staleness = self.state.get("staleness", shape, torch.float32, device)  # (S, M)
            self.age = self.state.get("age", shape, torch.long, device)  # (S, M)
            self._rng = torch.Generator(device="cpu").manual_seed(self.config.seed)
            if self.fuse:  # k-means (~250 small kernels) and the first selection as one graph replay
                mutable = [self.labels, self.staleness, self.age, self.idx, self.idx_rows]
                self.runner.run(("cluster", info.signature), lambda **_: self._cluster_and_select(info), {}, mutable)
            else:
                self._cluster_and_select(info)
            self._record(info, "capture", m)
            return out
        out = self._pruned(info)
        self._record(info, "pruned", self.k)
        return out

    def _cluster_and_select(self, info: CallInfo) -> torch.Tensor:
        """End of the capture step: cluster the tokens (fixed for the generation) and choose the first selection."""
        scored = self._score_view(self.outputs).float()  # (S, M, P)
        cfg = self.config
        if cfg.selection is Selection.CAT:
            features = cluster_features(scored, info.grid, cfg.cluster_feature_weight)  # (S, M, P + 2)
            self.labels.copy_(kmeans(features, self.num_clusters, cfg.kmeans_iters, cfg.seed, self.uniforms))
        else:  # ablations / baselines: one cluster
            self.labels.zero_()
        self.staleness.zero_()
        self.age.zero_()
        self._select_next()
        return self.idx

    def _dense(self, original, args, kwargs, info: CallInfo):
        inputs = None if self.runner.backend == "eager" else self.adapter.fast_inputs(info)
        if inputs is None:
            return original(*args, **kwargs)
        dense = self.runner.compiled(("dense", info.signature), lambda: self.adapter.dense_fn(original))
        sample = self.runner.run(("dense", info.signature), dense, inputs)
        return self.adapter.wrap_sample(sample, info)

    def _pruned(self, info: CallInfo):
        static = self.runner.backend != "eager" or self.fuse  # fuse on eager: the fused logic without graphs (tests)
        inputs = self.adapter.fast_inputs(info) if static else None
        if inputs is None:  # eager (or a call the static path does not cover)
            selected = self.adapter.pruned_forward(self.caches, self.idx_rows, info)  # (B, k, P)
            self._advance(selected)
            return self.adapter.build_output(self.outputs, info)
        caches, key = self.caches, ("pruned", info.signature, self.k)
        core = self.runner.compiled(key, lambda: self.adapter.pruned_fn(caches, info))
        if not self.fuse:
            selected = self.runner.run(key, core, dict(idx=self.idx_rows, **inputs))  # (B, k, P)
            self._advance(selected)
            return self.adapter.build_output(self.outputs, info)

        def step(**tensors):
            self._advance(core(idx=self.idx_rows, **tensors))
            return self.adapter.unpatchify(self.outputs, info)  # (B, C, H, W)

        mutable = [self.outputs, self.staleness, self.age, self.idx, self.idx_rows]
        sample = self.runner.run(("step",) + key, step, inputs, state=mutable)
        return self.adapter.wrap_sample(sample, info)

    def _advance(self, selected: torch.Tensor) -> None:
        """After a pruned step: store the fresh outputs, age the staleness, choose the next step's tokens."""
        scatter_tokens_(self.outputs, self.idx_rows, selected)  # (B, M, P)
        self.staleness.copy_(update_staleness(self.staleness, self.idx, self.config.staleness_decay))
        self.age.copy_(update_age(self.age, self.idx))
        self._select_next()

    def _score_view(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens if self.score_rows is None else tokens[self.score_rows]  # (S, M, P)

    def _select_next(self) -> None:
        """Choose the next step's tokens into the persistent ``idx`` / ``idx_rows`` buffers (in place)."""
        cfg = self.config
        current = self._score_view(self.outputs)  # (S, M, P)
        policy = cfg.selection
        if policy is Selection.RANDOM:
            noise = torch.rand(current.shape[1], generator=self._rng).to(current.device)  # (M,) same for every sample
            idx = topk_tokens(noise.expand(current.shape[:2]), self.k)
        elif policy is Selection.RAS:
            idx = topk_tokens(ras_priority(current, self.age, cfg.ras_starvation), self.k)
        else:  # the change-based rules: only they read n_i - n_ref
            delta = current.float() - self.reference  # (S, M, P)
            score = delta.norm(dim=-1)  # (S, M)
            if policy is Selection.MAGNITUDE:
                idx = topk_tokens(score, self.k)
            else:  # CAT, NO_CLUSTERING (one cluster), STALENESS (no magnitude part)
                if policy is Selection.CAT:
                    per_cluster = cluster_scores(delta, self.labels, self.num_clusters)  # (S, C)
                else:
                    per_cluster = score.new_zeros(score.shape[0], 1)  # (S, 1) a single cluster
                idx = select_tokens(
                    score,
                    per_cluster,
                    self.labels,
                    self.staleness,
                    self.k,
                    0.0 if policy is Selection.STALENESS else cfg.magnitude_share,
                    cfg.cluster_share_weights,
                    age=self.age,
                    quotas=self.quotas,
                )  # (S, k)
        self.idx.copy_(idx)
        if self.row_group is not None:
            torch.index_select(self.idx, 0, self.row_group, out=self.idx_rows)  # (B, k)

    def _record(self, info: CallInfo, phase: str, computed: int) -> None:
        key = (info.signature, computed)
        if key not in self._macs_cache:
            self._macs_cache[key] = self.adapter.macs(info, computed)
        dense_key = (info.signature, info.num_tokens)
        if dense_key not in self._macs_cache:
            self._macs_cache[dense_key] = self.adapter.macs(info, info.num_tokens)
        self.stats.steps.append(
            StepRecord(
                step=self.step,
                phase=phase,
                rows=info.batch,
                tokens=info.num_tokens,
                computed=computed,
                macs_dense=self._macs_cache[dense_key],
                macs=self._macs_cache[key],
            )
        )
