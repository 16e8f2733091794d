"""Per-step accounting of what a generation computed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class StepRecord:
    """One transformer call of a generation."""

    step: int  # denoising step index (0-based)
    phase: str  # "dense" (full step), "capture" (full step that fills the caches) or "pruned"
    rows: int  # batch rows (CFG rows included)
    tokens: int  # M, image tokens per row
    computed: int  # image tokens per row recomputed in this step (M for full steps, k for pruned ones)
    macs_dense: int  # analytic multiply-accumulates of the dense step
    macs: int  # analytic multiply-accumulates of the step as run


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
            "steps": [asdict(s) for s in self.steps],
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
