"""Candidates and the choice among them: measured quality first, then a heuristic.

The heuristic, for models without quality rows: the highest keep ratio that reaches the speed-up, then the most
warm-up steps. On the measured shapes rows the keep ratio mattered more than the warm-up (keep 0.3 / start 4 beat
keep 0.2 / start 8 at fewer MACs, keep 0.5 / start 8 beat keep 0.3 / start 12 by 4.6 dB).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import CATConfig, describe_config
from .costs import MacsModel, TimeModel
from .tables import Quality, QualityRow

KEEP_RATIOS = tuple(round(0.05 * i, 2) for i in range(2, 20))  # 0.1, 0.15, ..., 0.95
START_STEPS_AT_28 = (4, 8, 12)  # warm-up steps tried, scaled to the step count
MIN_STEP_SHARE = 0.25  # plain fewer steps go down to a quarter of the requested steps (at most 4x)


@dataclass(frozen=True)
class Candidate:
    """One way to run: ``steps`` steps, with ``config`` (None: dense) and an optional step cache."""

    steps: int
    config: CATConfig | None
    macs_ratio: float  # total transformer MACs over the reference (dense, reference steps)
    time_ratio: float  # predicted transformer time over the reference
    quality: Quality | None = None
    step_cache: tuple[tuple[str, object], ...] | None = None

    @property
    def speedup(self) -> float:
        return 1.0 / self.time_ratio

    def describe(self) -> str:
        if self.config is None and self.step_cache is None:
            what = f"dense, {self.steps} steps"
        elif self.config is None:
            what = f"step cache {dict(self.step_cache)}, {self.steps} steps"
        else:
            what = f"CAT {describe_config(self.config)}, {self.steps} steps"
        psnr = f", {self.quality.psnr_db:.2f} dB" if self.quality is not None else ""
        return f"{what} ({self.speedup:.2f}x predicted, MACs {self.macs_ratio:.3f}{psnr})"


@dataclass(frozen=True)
class CostModel:
    """Costs of candidates against a dense run of ``reference`` steps."""

    reference: int
    macs: MacsModel | None  # None: every pruning config comes with its measured macs_ratio
    time: TimeModel

    def cost(self, steps: int, config: CATConfig | None, macs_ratio: float | None = None) -> tuple[float, float]:
        """(MACs ratio, time ratio) of ``steps`` steps with ``config``; ``macs_ratio`` (measured total) overrides
        the analytic MACs of the pruned steps. The cache-filling steps (the capture; with the forecast also the
        reference step) take their measured time where the rows recorded it."""
        n = self.reference
        if config is None or not config.pruning_enabled:
            return steps / n, steps / n
        dense = min(config.start_step + config.final_dense_steps, steps)
        pruned = steps - dense
        if pruned == 0:
            return steps / n, steps / n
        if macs_ratio is not None:  # e.g. a field the analytic model does not know changes the cost
            m = min(1.0, max(1e-6, (macs_ratio * n - dense) / pruned))
        else:
            m = self.macs.pruned_ratio(config.keep_ratio)
        time = self.time.for_context(config.context.value)  # pruned-step times of the config's context, if timed
        fills = 2 if config.context.value == "extrapolate" else 1  # the capture, and the forecast's reference step
        extra = fills * (time.capture_ratio() - 1.0)  # cache-filling steps cost more (or less) than a dense one
        return (dense + pruned * m) / n, (dense + extra + pruned * time.step_ratio(m)) / n

    def time_source(self, config: CATConfig | None) -> str:
        """Where the time of a candidate with ``config`` comes from (`TimeModel.source_for`)."""
        pruning = config is not None and config.pruning_enabled
        return self.time.source_for(config.context.value if pruning else None)


def _start_steps(n: int) -> list[int]:
    return sorted({min(n - 1, max(2, round(s * n / 28))) for s in START_STEPS_AT_28 if n > 2})


def candidates(costs: CostModel, rows: list[QualityRow], backend, cache_ok) -> list[Candidate]:
    """Plain fewer steps, a grid of CAT configs at the reference steps, and every measured row's method."""
    n = costs.reference
    out: dict[tuple, Candidate] = {}

    def add(steps, config, quality=None, cache=None, macs=None):
        if config is not None:
            config = dataclasses.replace(config, backend=backend)
        macs_ratio, time_ratio = (macs, macs) if cache is not None else costs.cost(steps, config, macs)
        key = (steps, config, cache)
        if quality is not None or key not in out:
            out[key] = Candidate(steps, config, macs_ratio, time_ratio, quality, cache)

    for steps in range(max(1, math.ceil(n * MIN_STEP_SHARE)), n):
        add(steps, None)
    for start in _start_steps(n):
        for keep in KEEP_RATIOS:
            add(n, CATConfig(keep_ratio=keep, start_step=start))
    for row in rows:
        if row.step_cache is not None and (row.macs_ratio is None or not cache_ok(dict(row.step_cache))):
            continue  # a step cache is a candidate only where it can be applied and its cost was measured
        add(row.steps, row.config, row.quality, row.step_cache, row.macs_ratio)
    for steps, quality in dense_between(rows).items():
        add(steps, None, quality)
    return list(out.values())


def dense_between(rows: list[QualityRow]) -> dict[int, Quality]:
    """Plain fewer-steps counts without a quality row of their own but with measured dense rows on both sides: their
    quality interpolated linearly in the step count (PSNR and SSIM are smooth in it), the source naming both rows. So
    a speed-up that falls between two measured dense counts is compared with the dense count that reaches it.

    Example:
        >>> q = lambda db: Quality(db, 0.9, "m")
        >>> rows = [QualityRow("m", 28, n, None, q(db)) for n, db in ((10, 23.0), (12, 26.0))]
        >>> round(dense_between(rows)[11].psnr_db, 2), dense_between(rows)[11].source
        (24.5, 'interpolated between the measured dense-10 and dense-12 rows (m; m)')
    """
    measured = ((r.steps, r.quality) for r in rows if r.config is None and r.step_cache is None)
    dense = sorted(measured, key=lambda d: d[0])  # by steps only: Quality does not order
    out = {}
    for (a, qa), (b, qb) in zip(dense, dense[1:], strict=False):
        for steps in range(a + 1, b):
            w = (steps - a) / (b - a)
            ssim = None if qa.ssim is None or qb.ssim is None else qa.ssim + w * (qb.ssim - qa.ssim)
            source = f"interpolated between the measured dense-{a} and dense-{b} rows ({qa.source}; {qb.source})"
            out[steps] = Quality(qa.psnr_db + w * (qb.psnr_db - qa.psnr_db), ssim, source)
    return out


def choose(feasible: list[Candidate], n: int, key: str | None) -> tuple[Candidate, str]:
    """The candidate to recommend among those reaching the speed-up, and why."""
    measured = [c for c in feasible if c.quality is not None]
    if measured:
        ranked = sorted(measured, key=lambda c: (-c.quality.psnr_db, -c.speedup))
        best = ranked[0]
        what = "interpolated" if best.quality.source.startswith("interpolated") else "measured"
        why = (
            f"best {what} quality ({best.quality.psnr_db:.2f} dB PSNR to dense) among {len(measured)} measured or "
            "interpolated candidate(s) predicted to reach the speed-up"
        )
        if len(ranked) > 1:
            why += f"; next: {ranked[1].describe()}"
        return best, why
    cat = [c for c in feasible if c.config is not None and c.steps == n]
    fewer = max((c for c in feasible if c.config is None), key=lambda c: c.steps, default=None)
    if not cat:
        return fewer, "no CAT configuration reaches the speed-up; plain fewer steps do (quality not measured)"
    best = max(cat, key=lambda c: (c.config.keep_ratio, c.config.start_step, c.time_ratio))
    why = (
        f"no measured quality for {key or 'this model'} at {n} steps; heuristic: the highest keep ratio predicted "
        "to reach the speed-up, then the most warm-up steps (on the measured shapes rows the keep ratio mattered "
        "more than the warm-up)"
    )
    if fewer is not None:
        why += (
            f". Plain fewer steps ({fewer.steps}) also reach it; which is better is not measured for this model (on "
            "the shapes model fewer steps won at 2x). Measure with `catprune eval` and add quality rows"
        )
    return best, why
