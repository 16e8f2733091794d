"""The planner's data: measured step times and measured quality, shipped as package data.

``catprune/data/cost_tables.json`` holds two lists (its ``_format`` key describes every field):

- ``step_times``: one row per benchmarked case (``catprune bench --json``, converted by
  ``scripts/cost_rows_from_bench.py``): dense and pruned milliseconds per step of one model preset on one device kind
  and backend, at one resolution, batch, keep ratio and context (``reuse`` or ``extrapolate``; rows without it were
  measured before the forecast existed, i.e. with ``reuse``), with the MACs ratio of one pruned step.
- ``quality``: one row per measured method: the model, the reference step count, the steps the method runs, its
  ``CATConfig`` fields (``null`` for plain fewer steps), an optional step cache, and PSNR / SSIM to the dense image.

Adding a measurement is adding a row: no code changes. A row whose config names a field this version's `CATConfig`
does not have (or an invalid value) is skipped with a warning, and is used once the field exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..config import CATConfig

DATA_FILE = Path(__file__).resolve().parents[1] / "data" / "cost_tables.json"


@dataclass(frozen=True)
class StepTimeRow:
    """Measured step times of one benchmarked case."""

    model: str  # preset name (catprune.models.model_configs) or "shapes"
    device: str  # device type: "cuda" or "cpu"
    backend: str  # CATConfig.backend value the case ran with (dense baseline in the same mode)
    height: int
    width: int
    batch: int
    keep_ratio: float
    dense_ms: float  # one dense step
    pruned_ms: float  # one pruned step
    pruned_macs_ratio: float  # MACs of one pruned step over one dense step
    source: str
    card: str = ""
    context: str = "reuse"  # CATConfig.context the pruned steps ran with (rows without it predate the forecast)
    capture_ms: float | None = None  # the capture step (the full step that fills the caches), when recorded


@dataclass(frozen=True)
class Quality:
    """Measured quality of a method against the dense image of the same seed."""

    psnr_db: float
    ssim: float | None
    source: str


@dataclass(frozen=True)
class QualityRow:
    """One measured method: ``config`` None and ``steps < reference_steps`` is plain fewer steps."""

    model: str
    reference_steps: int
    steps: int
    config: CATConfig | None
    quality: Quality
    step_cache: tuple[tuple[str, object], ...] | None = None  # (key, value) pairs of the step cache, e.g. kind
    macs_ratio: float | None = None  # total MACs over the reference's, when measured


def config_from_fields(fields: dict | None, where: str) -> CATConfig | None:
    """``CATConfig(**fields)``, or None with a warning when a field is unknown to this version or invalid.

    Example:
        >>> config_from_fields({"keep_ratio": 0.5}, "example").keep_ratio
        0.5
    """
    known = {f.name for f in dataclasses.fields(CATConfig)}
    unknown = sorted(set(fields or {}) - known)
    if unknown:
        warnings.warn(
            f"catprune.plan: {where}: CATConfig has no field(s) {', '.join(unknown)} in this version; the row is "
            "skipped (it is used once catprune has the field). Upgrade catprune, or remove the row.",
            stacklevel=3,
        )
        return None
    try:
        return CATConfig(**(fields or {}))
    except (TypeError, ValueError) as exc:
        warnings.warn(f"catprune.plan: {where}: invalid config, row skipped ({exc}).", stacklevel=3)
        return None


def _positive(row: dict, key: str, where: str) -> float:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"catprune.plan: tables: {where}: {key}: expected a positive finite number, got {value!r}. Fix the row."
        )
    return float(value)


def _step_time_row(row: dict, where: str) -> StepTimeRow:
    try:
        return StepTimeRow(
            model=str(row["model"]),
            device=str(row["device"]),
            backend=str(row["backend"]),
            height=int(row["height"]),
            width=int(row["width"]),
            batch=int(row.get("batch", 1)),
            keep_ratio=_positive(row, "keep_ratio", where),
            dense_ms=_positive(row, "dense_ms", where),
            pruned_ms=_positive(row, "pruned_ms", where),
            pruned_macs_ratio=_positive(row, "pruned_macs_ratio", where),
            source=str(row.get("source", "")),
            card=str(row.get("card", "")),
            context=str(row.get("context", "reuse")),
            capture_ms=_positive(row, "capture_ms", where) if row.get("capture_ms") is not None else None,
        )
    except KeyError as exc:
        raise ValueError(f"catprune.plan: tables: {where}: missing key {exc}. See the file's _format.") from None


def _quality_row(row: dict, where: str) -> QualityRow | None:
    config = None
    if row.get("config") is not None:
        config = config_from_fields(row["config"], where)
        if config is None:
            return None
    cache = row.get("step_cache")
    try:
        return QualityRow(
            model=str(row["model"]),
            reference_steps=int(row["reference_steps"]),
            steps=int(row["steps"]),
            config=config,
            quality=Quality(_positive(row, "psnr_db", where), row.get("ssim"), str(row.get("source", ""))),
            step_cache=tuple(sorted(cache.items())) if cache else None,
            macs_ratio=_positive(row, "macs_ratio", where) if row.get("macs_ratio") is not None else None,
        )
    except KeyError as exc:
        raise ValueError(f"catprune.plan: tables: {where}: missing key {exc}. See the file's _format.") from None


@dataclass(frozen=True)
class Tables:
    """The planner's data: step times and quality rows.

    Example:
        >>> tables = Tables.load()
        >>> {r.model for r in tables.quality} >= {"shapes"}
        True
    """

    step_times: tuple[StepTimeRow, ...] = ()
    quality: tuple[QualityRow, ...] = ()

    @classmethod
    def from_dict(cls, data: dict, origin: str = "tables") -> Tables:
        """Tables from the JSON structure of ``cost_tables.json`` (rows with unknown config fields skipped)."""
        if not isinstance(data, dict):
            raise TypeError(f"catprune.plan: tables: expected a dict with step_times / quality, got {type(data)}.")
        times = tuple(_step_time_row(r, f"{origin} step_times[{i}]") for i, r in enumerate(data.get("step_times", [])))
        quality = [_quality_row(r, f"{origin} quality[{i}]") for i, r in enumerate(data.get("quality", []))]
        return cls(times, tuple(r for r in quality if r is not None))

    @classmethod
    def load(cls, path: str | Path | None = None) -> Tables:
        """The shipped tables (``catprune/data/cost_tables.json``) or those at ``path``."""
        path = Path(path) if path is not None else DATA_FILE
        return cls.from_dict(json.loads(path.read_text()), path.name)
