"""Per-step accounting of what a generation computed."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass(frozen=True)
class StepRecord:
    """One transformer call of a generation (read-only: what `catprune.observe` callbacks and `catprune.inspect`
    give). Steps are recorded with pruning off too: then every step is ``"dense"``.

    Example:
        >>> r = StepRecord(3, "pruned", 2, 16, 4, 100, 40, selected=torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]))
        >>> r.kind, tuple(r.selected.shape), r.to_dict()["computed"]
        ('pruned', (2, 4), 4)
    """

    step: int  # denoising step index (0-based)
    phase: str  # "dense" (full step), "capture" (full step that fills the caches), "pruned" or "refresh" (a full
    # step within the pruned ones that refills every cache, CATConfig.refresh_every)
    rows: int  # batch rows (CFG rows included)
    tokens: int  # M, image tokens per row
    computed: int  # image tokens per row recomputed in this step (M for full steps, k for pruned ones)
    macs_dense: int  # analytic multiply-accumulates of the dense step
    macs: int  # analytic multiply-accumulates of the step as run
    # (B, k) long indices of the image tokens each batch row computed (pruned steps; None otherwise): a copy, on the
    # model's device
    selected: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def kind(self) -> str:
        """The same as ``phase``: "dense", "capture", "pruned" or "refresh"."""
        return self.phase

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of the fields, without ``selected``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "selected"}


@dataclass
class PruneStats:
    """What the last (or current) generation computed, per step. ``str(stats)`` gives a readable summary.

    Example:
        >>> s = PruneStats([StepRecord(0, "dense", 2, 16, 16, 100, 100), StepRecord(1, "pruned", 2, 16, 4, 100, 40)])
        >>> round(s.macs_ratio, 2), round(s.macs_speedup, 3)
        (0.7, 1.429)
    """

    steps: list[StepRecord] = field(default_factory=list)

    @property
    def macs_dense(self) -> int:
        """Analytic MACs the dense model would have spent on these steps."""
        return sum(s.macs_dense for s in self.steps)

    @property
    def macs(self) -> int:
        """Analytic MACs spent."""
        return sum(s.macs for s in self.steps)

    @property
    def macs_ratio(self) -> float:
        """MACs spent / dense MACs (1.0 when nothing was pruned)."""
        return self.macs / self.macs_dense if self.macs_dense else 1.0

    @property
    def macs_speedup(self) -> float:
        """Dense MACs / MACs spent: the speed-up the wall clock can at best approach."""
        return self.macs_dense / self.macs if self.macs else 1.0

    @property
    def pruned_steps(self) -> int:
        return sum(s.phase == "pruned" for s in self.steps)

    def to_dict(self) -> dict:
        return {
            "steps": [s.to_dict() for s in self.steps],
            "macs_dense": self.macs_dense,
            "macs": self.macs,
            "macs_ratio": self.macs_ratio,
            "macs_speedup": self.macs_speedup,
            "pruned_steps": self.pruned_steps,
        }

    def __str__(self) -> str:
        if not self.steps:
            return "catprune stats: no transformer call recorded yet"
        first = self.steps[0]
        kept = sorted({s.computed for s in self.steps if s.phase == "pruned"})
        return (
            f"catprune stats: {len(self.steps)} steps ({self.pruned_steps} pruned), {first.rows} rows x "
            f"{first.tokens} image tokens, tokens computed per pruned step: {kept or '-'}; "
            f"MACs {self.macs / 1e9:.2f} G of dense {self.macs_dense / 1e9:.2f} G "
            f"(ratio {self.macs_ratio:.3f}, {self.macs_speedup:.2f}x fewer)"
        )


@dataclass(frozen=True)
class InspectView:
    """A read-only snapshot of catprune on one transformer (what `catprune.inspect` returns).

    Tensors are copies: changing them changes nothing in the runtime.
    """

    family: str  # the adapter's model family
    config: object  # the CATConfig in force
    stats: PruneStats  # the current (or last) generation's per-step records
    grid: tuple[int, int] | None  # (h, w) image-token grid of the current generation, None before the first call
    batch: int | None  # B, rows of the current generation
    cfg_shared: bool | None  # whether CFG rows share one selection (None while the generation prunes nothing)
    next_selection: torch.Tensor | None  # (B, k) tokens the next pruned step computes, None before the capture step
    kv_cache_shapes: tuple[tuple[int, ...], ...]  # shape of every block's K/V cache, e.g. (2, B, M + T, H, hd)
    cache_bytes: int  # bytes of all caches: per-block K/V (+ K0, scales), shared working buffers, outputs, reference
    kv_cache_bytes: int = 0  # the per-block K/V caches alone, as stored (K0 copies and scales included)
    kv_cache_dtype: torch.dtype | None = None  # their storage dtype (CATConfig.cache_dtype or the compute dtype)

    @property
    def steps(self) -> tuple[StepRecord, ...]:
        """The per-step records (`StepRecord`), in call order."""
        return tuple(self.stats.steps)

    def selected(self, step: int) -> torch.Tensor | None:
        """(B, k) token indices each batch row computed at ``step`` (None for a dense / capture / missing step)."""
        return next((r.selected for r in self.stats.steps if r.step == step), None)
