"""`Generation`: everything one generation owns, in one object that `Runtime.reset` drops."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .contract import BufferStore
from .forecast import ContextForecast
from .modulation import ModulationRows
from .stats import PruneStats, StepRecord


class SignatureBuffers:
    """Buffers of one shape signature, allocated once and then written in place: CUDA graphs captured over them keep
    pointing at them across generations. ``caches``: one K/V store per block; ``store``: the runtime's own tensors
    (reference, outputs, labels, staleness, age, selection, CFG row maps, quotas, k-means uniforms); ``forecast``:
    the shared state of ``Context.EXTRAPOLATE`` (None with ``Context.REUSE``); ``storage``: the K/V caches' storage
    dtype (``CATConfig.cache_dtype``, None: the compute dtype)."""

    def __init__(self, num_blocks: int, forecast: ContextForecast | None = None, storage: torch.dtype | None = None):
        self.forecast = forecast
        self.caches = [BufferStore(forecast, storage) for _ in range(num_blocks)]
        self.store = BufferStore()

    def nbytes(self) -> int:
        extra = self.forecast.nbytes() if self.forecast is not None else 0
        return sum(c.nbytes() for c in self.caches) + self.store.nbytes() + extra


@dataclass(eq=False)
class Generation:
    """The state of one generation: from its first transformer call until the next generation starts or `reset`.

    Tensors are views of persistent `SignatureBuffers` (None until the step that fills them). With pruning off a
    generation has no buffers: it only counts and records the dense steps.
    """

    signature: tuple  # CallInfo.signature of its calls
    memo: dict = field(default_factory=dict)  # the adapter's per-call memo (Adapter.inspect_call)
    stats: PruneStats = field(default_factory=PruneStats)  # one StepRecord per counted call, in stats.steps
    step: int = 0  # calls counted so far (the next call's step index)
    last_timestep: object = None  # timestep of the previous call (tensor or number)
    last_step_index: int | None = None  # the scheduler's step_index at the previous call
    broken: bool = False  # an exception inside a step: the next call starts a new generation
    # sizes and selection parameters, fixed for the generation
    k: int = 0  # tokens the next pruned step recomputes (the size of ``idx``)
    num_steps: int | None = None  # inference steps of the generation, when the pipeline's scheduler tells
    capture_time: float | None = None  # timestep of the capture step (keep-ratio schedule on a bare transformer)
    num_clusters: int = 0  # C
    shared: bool = False  # CFG rows of one sample share a selection
    buffers: SignatureBuffers | None = None
    modulation: ModulationRows | None = None  # the steps' modulation rows, computed several steps at once
    quotas: torch.Tensor | None = None  # (C,) magnitude picks per cluster rank
    uniforms: torch.Tensor | None = None  # (C,) k-means initialisation draws
    rng: torch.Generator | None = None  # Selection.RANDOM's CPU generator
    score_rows: torch.Tensor | None = None  # (S,) the conditional rows that score, when CFG rows share
    row_group: torch.Tensor | None = None  # (B,) selection group of every batch row, when CFG rows share
    reference: torch.Tensor | None = None  # (S, M, P) float32 n_ref
    outputs: torch.Tensor | None = None  # (B, M, P) latest per-token output of every token
    labels: torch.Tensor | None = None  # (S, M) cluster labels
    staleness: torch.Tensor | None = None  # (S, M) f
    age: torch.Tensor | None = None  # (S, M) steps since each token was last computed (tie-break of f)
    rate: torch.Tensor | None = None  # (S, M) drift rate per step (Selection.DRIFT only)
    idx: torch.Tensor | None = None  # (S, k) selection for the next step
    idx_rows: torch.Tensor | None = None  # (B, k) the same, per batch row

    @property
    def batch(self) -> int:
        """B, rows of every call of this generation (CallInfo.signature[0])."""
        return self.signature[0]

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) image-token grid of this generation (CallInfo.signature[1])."""
        return tuple(self.signature[1])

    @property
    def records(self) -> list[StepRecord]:
        """The step records so far (the list inside ``stats``)."""
        return self.stats.steps

    @property
    def caches(self) -> list[BufferStore]:
        """The per-block K/V caches (empty when the generation prunes nothing)."""
        return self.buffers.caches if self.buffers is not None else []

    def selection_state(self) -> list[torch.Tensor]:
        """The rule-specific buffers a step advances besides outputs, staleness and age (a graph's mutable state)."""
        return [] if self.rate is None else [self.rate]

    def score_view(self, tokens: torch.Tensor) -> torch.Tensor:
        """The rows that score: all, or only the conditional rows when CFG rows share a selection."""
        return tokens if self.score_rows is None else tokens[self.score_rows]  # (S, M, P)

    @property
    def forecast(self) -> ContextForecast | None:
        """The context forecast state (``Context.EXTRAPOLATE``), or None."""
        return self.buffers.forecast if self.buffers is not None else None

    def kv_cache_bytes(self) -> int:
        """Bytes of the per-block K/V caches as stored (K0 copies and low-precision scales included)."""
        return sum(c.nbytes() for c in self.caches)

    def cache_bytes(self) -> int:
        """Bytes of the caches a pruned step reads: per-block K/V (and K0 when forecasting), the forecast's working
        buffer and times, the output cache, the reference and the modulation rows. (A low-precision cache is rebuilt for its attention
        in a temporary of the step, as a dense step's keys/values are: not counted.)"""
        total = self.kv_cache_bytes()
        total += self.forecast.nbytes() if self.forecast is not None else 0
        total += self.modulation.nbytes() if self.modulation is not None else 0
        return total + sum(t.numel() * t.element_size() for t in (self.outputs, self.reference) if t is not None)
