"""``catprune.plan``: state the speed-up you want, get the best configuration the project measured.

The planner counts cost in measured step times (``catprune bench`` tables shipped with the package, per model
preset, device kind, backend and resolution; a pruned step realises less than its MACs ratio), with the family's
analytic MACs as the fallback; it picks, among the candidates predicted to reach the speed-up, the one with the best
measured quality (PSNR to the dense image), else the CAT configuration that skips the least work; and it recommends
plain fewer steps (``config=None``) when they win. Data: ``catprune/data/cost_tables.json`` (`tables`).

Example:
    >>> import catprune
    >>> from catprune.models.testing import tiny_sd3_transformer
    >>> plan = catprune.plan(tiny_sd3_transformer(), speedup=1.5, num_inference_steps=28)
    >>> plan.predicted_speedup >= 1.5, plan.pipeline_kwargs()["num_inference_steps"] <= 28
    (True, True)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass, field

import torch

from .. import api
from .._target import resolve_model
from ..config import Backend, CATConfig, describe_config
from .choose import Candidate, CostModel, candidates, choose
from .costs import MacsModel, TimeModel, family_of, model_key, select_rows, text_tokens, token_grid
from .tables import Quality, QualityRow, StepTimeRow, Tables

_TABLES: Tables | None = None


def shipped_tables() -> Tables:
    """The tables shipped with the package (loaded once)."""
    global _TABLES
    if _TABLES is None:
        _TABLES = Tables.load()
    return _TABLES


@dataclass(frozen=True)
class Plan:
    """What `plan` recommends. Frozen.

    - ``num_inference_steps``: steps to run (the planner may cut steps); pass ``pipeline_kwargs()`` to the pipeline.
    - ``config``: the `CATConfig` to apply, or None when plain fewer steps are best.
    - ``macs_ratio``: transformer MACs over the dense run of ``reference_steps`` steps.
    - ``predicted_speedup``: transformer-loop speed-up predicted by the time model (``time_source`` says which).
    - ``expected_quality``: measured `Quality` (PSNR / SSIM to the dense image, with its source), or None.
    - ``reason``: why this candidate, in words. ``alternatives``: the next candidates reaching the speed-up.
    """

    num_inference_steps: int
    config: CATConfig | None
    macs_ratio: float
    predicted_speedup: float
    expected_quality: Quality | None
    reason: str
    requested_speedup: float
    reference_steps: int
    family: str
    model: str | None
    time_source: str
    step_cache: tuple[tuple[str, object], ...] | None = None
    alternatives: tuple[Candidate, ...] = field(default=(), repr=False)

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments for the pipeline call: ``pipe(prompt, **plan.pipeline_kwargs())``.

        `catprune.apply` cannot change the step count a pipeline is called with; this does.
        """
        return {"num_inference_steps": self.num_inference_steps}

    def apply_to(self, pipe_or_transformer, runner=None):
        """Apply the plan (what ``catprune.apply(pipe, plan)`` calls): the config, and the step cache if any.

        A plan without a config leaves the transformer dense (a previous `catprune.apply` is removed) and warns:
        its speed-up comes only from ``pipeline_kwargs()``.
        """
        if self.config is None:
            api.remove(pipe_or_transformer)
            warnings.warn(
                f"catprune.apply: the plan recommends plain fewer steps ({self.num_inference_steps} instead of "
                f"{self.reference_steps}) and no CAT Pruning, so the transformer stays dense. Pass "
                "plan.pipeline_kwargs() to the pipeline call: pipe(prompt, **plan.pipeline_kwargs()).",
                stacklevel=3,
            )
        else:
            api.apply(pipe_or_transformer, self.config, runner=runner)
        if self.step_cache is not None:
            from ..stacking import apply_step_cache

            apply_step_cache(pipe_or_transformer, **dict(self.step_cache))
        return pipe_or_transformer

    def summary(self) -> str:
        """Several lines for people: what was chosen, the cost, the quality, and why."""
        chosen = self.config and f"CAT Pruning {describe_config(self.config)}"
        quality = (
            f"{self.expected_quality.psnr_db:.2f} dB PSNR to dense ({self.expected_quality.source})"
            if self.expected_quality is not None
            else "not measured for this model"
        )
        return "\n".join(
            [
                f"plan for {self.requested_speedup:g}x on {self.model or self.family} at {self.reference_steps} "
                f"steps: {chosen or 'no CAT Pruning'}, {self.num_inference_steps} steps",
                f"  predicted speed-up {self.predicted_speedup:.2f}x (MACs ratio {self.macs_ratio:.3f}); cost from "
                f"{self.time_source}",
                f"  expected quality: {quality}",
                f"  why: {self.reason}",
            ]
        )


def _check_speedup(speedup) -> float:
    if isinstance(speedup, bool) or not isinstance(speedup, numbers.Real):
        raise TypeError(
            f"catprune.plan: speedup: expected a number > 1 (e.g. 2.0 for twice as fast), got "
            f"{type(speedup).__name__}. Pass e.g. speedup=2.0."
        )
    if not (math.isfinite(speedup) and speedup > 1.0):
        raise ValueError(
            f"catprune.plan: speedup: expected a finite number > 1 (the transformer-loop speed-up over dense), got "
            f"{speedup!r}. Pass e.g. speedup=2.0; for the dense model, do not apply catprune."
        )
    return float(speedup)


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 2:
        raise ValueError(
            f"catprune.plan: num_inference_steps: expected an int >= 2 (the steps you would run dense), got "
            f"{steps!r}. Pass e.g. num_inference_steps=28."
        )
    return int(steps)


def _device_and_backend(model: torch.nn.Module, device, backend) -> tuple[str, Backend]:
    if device is None:
        types = {p.device.type for p in model.parameters()}
        device = "cuda" if "cuda" in types else "cpu"
    device = torch.device(device).type
    if backend is None:
        backend = Backend.CUDAGRAPH if device == "cuda" else Backend.EAGER
    return device, Backend.parse(
        backend, "catprune.plan: backend", "Leave it out for cudagraph on CUDA and eager elsewhere."
    )


def plan(
    pipe_or_transformer,
    speedup: float,
    num_inference_steps: int = 28,
    *,
    height: int | None = None,
    width: int | None = None,
    device: str | torch.device | None = None,
    backend: Backend | str | None = None,
    tables: Tables | None = None,
) -> Plan:
    """The configuration predicted to reach ``speedup`` (transformer loop, over the dense run of
    ``num_inference_steps`` steps) with the best measured quality.

    ``height`` / ``width``: image size in pixels (the model's default when left out); ``device``: where it will run
    (default: where the model's parameters are); ``backend``: the `CATConfig.backend` to plan for (default
    ``cudagraph`` on CUDA, ``eager`` elsewhere); ``tables``: the data (default: the shipped `shipped_tables`).
    Raises ValueError for ``speedup <= 1``, NaN, or a speed-up no candidate reaches (the message says what is
    reachable). Apply with ``catprune.apply(pipe, plan)`` and call ``pipe(prompt, **plan.pipeline_kwargs())``.

    Example:
        >>> import catprune
        >>> from catprune.models.testing import tiny_flux_transformer
        >>> p = catprune.plan(tiny_flux_transformer(), 2.0, num_inference_steps=20)
        >>> p.predicted_speedup >= 2.0
        True
    """
    speedup, n = _check_speedup(speedup), _check_steps(num_inference_steps)
    setup = _Setup.of(pipe_or_transformer, n, height, width, device, backend, tables, "plan")
    costs, key, family, backend = setup.costs, setup.key, setup.family, setup.backend
    rows = [r for r in setup.tables.quality if r.model == key and r.reference_steps == n]
    pool = candidates(costs, rows, backend, lambda spec: _step_cache_ok(pipe_or_transformer, spec))
    feasible = [c for c in pool if c.speedup >= speedup * (1 - 1e-9)]
    if not feasible:
        best = max(pool, key=lambda c: c.speedup)
        raise ValueError(
            f"catprune.plan: speedup: expected at most {best.speedup:.2f}x for {key or family} at {n} steps "
            f"({best.describe()}; cost from {costs.time_source(best.config)}), got {speedup:g}. Ask for a smaller "
            "speed-up, or plan for more num_inference_steps."
        )
    chosen, reason = choose(feasible, n, key)
    others = tuple(sorted((c for c in feasible if c is not chosen), key=lambda c: -c.time_ratio)[:5])
    return Plan(
        num_inference_steps=chosen.steps,
        config=chosen.config,
        macs_ratio=chosen.macs_ratio,
        predicted_speedup=chosen.speedup,
        expected_quality=chosen.quality,
        reason=reason,
        requested_speedup=speedup,
        reference_steps=n,
        family=family,
        model=key,
        time_source=costs.time_source(chosen.config),
        step_cache=chosen.step_cache,
        alternatives=others,
    )


@dataclass(frozen=True)
class _Setup:
    """What `plan` and `estimate` derive from the model: its table name, family, backend and cost model."""

    costs: CostModel
    key: str | None
    family: str
    backend: Backend
    tables: Tables

    @classmethod
    def of(cls, pipe_or_transformer, n, height, width, device, backend, tables, caller) -> _Setup:
        model, pipe = resolve_model(pipe_or_transformer, caller)
        tables = tables if tables is not None else shipped_tables()
        if not isinstance(tables, Tables):
            raise TypeError(
                f"catprune.{caller}: tables: expected a catprune.planner.Tables, got {type(tables).__name__}."
            )
        family, key = family_of(model), model_key(model, pipe)
        device, backend = _device_and_backend(model, device, backend)
        grid, size = token_grid(model, pipe, family, key, height, width)
        time = TimeModel(select_rows(tables.step_times, key, device, backend.value, size))
        costs = CostModel(n, MacsModel(model, grid, text_tokens(family, key)), time)
        return cls(costs, key, family, backend, tables)


@dataclass(frozen=True)
class Estimate:
    """The planner's predicted cost of one way to run, against the dense run of ``reference_steps`` steps."""

    steps: int
    config: CATConfig | None
    reference_steps: int
    macs_ratio: float  # transformer MACs over the reference's
    time_ratio: float  # predicted transformer-loop time over the reference's
    time_source: str

    @property
    def speedup(self) -> float:
        return 1.0 / self.time_ratio


def estimate(
    pipe_or_transformer,
    config: CATConfig | None,
    steps: int,
    num_inference_steps: int = 28,
    *,
    macs_ratio: float | None = None,
    height: int | None = None,
    width: int | None = None,
    device: str | torch.device | None = None,
    backend: Backend | str | None = None,
    tables: Tables | None = None,
) -> Estimate:
    """The cost `plan` predicts for running ``steps`` steps with ``config`` (None: dense), against the dense run of
    ``num_inference_steps`` steps: the same time model (measured step times of the config's context where the
    tables have them, else analytic MACs). ``macs_ratio``: a measured total MACs ratio that replaces the analytic
    one (as a quality row's does). Other arguments as for `plan`.

    Example:
        >>> import catprune
        >>> from catprune.models.testing import tiny_sd3_transformer
        >>> e = estimate(tiny_sd3_transformer(), None, 14, 28)
        >>> e.macs_ratio, e.time_ratio
        (0.5, 0.5)
    """
    n, steps = _check_steps(num_inference_steps), _check_steps(steps)
    setup = _Setup.of(pipe_or_transformer, n, height, width, device, backend, tables, "estimate")
    if config is not None:
        config = dataclasses.replace(config, backend=setup.backend)
    macs, time = setup.costs.cost(steps, config, macs_ratio)
    return Estimate(steps, config, n, macs, time, setup.costs.time_source(config))


def estimate_as(
    preset: str,
    config: CATConfig | None,
    steps: int,
    num_inference_steps: int = 28,
    *,
    macs_ratio: float | None = None,
    height: int = 1024,
    width: int = 1024,
    device: str = "cuda",
    backend: Backend | str = Backend.COMPILE_CUDAGRAPH,
    tables: Tables | None = None,
) -> Estimate:
    """What running ``steps`` steps with ``config`` would cost on the measured step times of another model,
    ``preset`` (a `catprune.models.model_configs` name with rows in the tables): the time a small model's mix of
    steps, pruning and cache fills would take at that model's speed. ``macs_ratio`` is the run's measured total
    MACs over the dense run of ``num_inference_steps`` steps (it fixes the pruned steps' MACs ratio; required for a
    pruning ``config``). ``backend`` defaults to ``compile+cudagraph``, whose dense side is the stock model compiled.
    Raises ValueError when the tables have no step times for ``preset`` on that device and backend.

    Example:
        >>> from catprune import CATConfig
        >>> e = estimate_as("sd3-medium", CATConfig(keep_ratio=0.3, start_step=8), 28, 28, macs_ratio=0.512)
        >>> e.macs_ratio, 1.6 < e.speedup < 1.9
        (0.512, True)
    """
    n, steps = _check_steps(num_inference_steps), _check_steps(steps)
    tables = tables if tables is not None else shipped_tables()
    backend = Backend.parse(backend, "catprune.planner.estimate_as: backend", "")
    device = torch.device(device).type
    rows = select_rows(tables.step_times, preset, device, backend.value, (int(height), int(width)))
    if not rows:
        have = sorted({(r.model, r.device, r.backend) for r in tables.step_times})
        raise ValueError(
            f"catprune.planner.estimate_as: preset: expected a model with step times on {device} with backend "
            f"{backend.value}, got {preset!r}. Measured: {', '.join(f'{m} ({d}, {b})' for m, d, b in have)}."
        )
    pruning = config is not None and config.pruning_enabled and steps > config.start_step + config.final_dense_steps
    if pruning and macs_ratio is None:
        raise ValueError("catprune.planner.estimate_as: macs_ratio: expected the run's measured MACs ratio, got None.")
    costs = CostModel(n, None, TimeModel(rows))
    macs, time = costs.cost(steps, config, macs_ratio)
    return Estimate(steps, config, n, macs_ratio if pruning else macs, time, costs.time_source(config))


def _step_cache_ok(pipe_or_transformer, spec: dict) -> bool:
    from ..stacking import step_cache_support

    return step_cache_support(pipe_or_transformer, spec.get("kind", "")) is None


__all__ = [
    "Candidate",
    "Estimate",
    "Plan",
    "Quality",
    "QualityRow",
    "StepTimeRow",
    "Tables",
    "estimate",
    "estimate_as",
    "plan",
    "shipped_tables",
]
