"""Cost as a full-size model's GPU time: ``catprune eval --time-model sd3-medium``.

The embedded models are small enough that their own GPU step times say little (a 1 024-token step is
launch-bound: pruning makes it slower, not faster), and the CPU's say little about a GPU. So the evaluation can
charge every method the time its mix of dense steps, cache fills and pruned steps would take at a full-size model's
measured step times (`catprune.planner.estimate_as`, the planner's own time model, from the shipped ``catprune
bench`` rows); the pruned steps' MACs ratio is the one measured on the evaluated model. The plot and table label
it "modelled GPU speed-up" and name the model, backend and size.

Example:
    >>> stand_in = TimeStandIn.parse("sd3-medium")
    >>> stand_in.label
    'sd3-medium step times (compile+cudagraph, 1024x1024)'
    >>> rows = [{"name": "dense-14", "group": "fewer steps", "status": "ok", "psnr": 29.0, "gpu_time_ratio": 0.5},
    ...         {"name": "dense-20", "group": "fewer steps", "status": "ok", "psnr": 33.0, "gpu_time_ratio": 0.7},
    ...         {"name": "cat-x", "group": "CAT", "status": "ok", "psnr": 32.0, "gpu_time_ratio": 0.6}]
    >>> round(dense_psnr_at(rows, 0.6), 2)
    31.0
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import Backend
from .methods import Kind, Method

#: the groups whose rows run catprune (CAT, the other selection rules, the RAS-style baseline)
PRUNED_GROUPS = ("CAT", "ablation", "baseline")


@dataclass(frozen=True)
class TimeStandIn:
    """The model whose measured step times stand in: preset, backend and image size."""

    preset: str
    backend: str = Backend.COMPILE_CUDAGRAPH.value
    height: int = 1024
    width: int = 1024

    @classmethod
    def parse(cls, text: str, who: str = "TimeStandIn.parse") -> TimeStandIn:
        """``PRESET[:BACKEND[:HEIGHTxWIDTH]]``, checked against the shipped step times; a ValueError names ``who``
        (e.g. the flag; "" for none), what was expected and what was received."""
        say = f"{who}: " if who else ""
        parts = str(text).split(":")
        if not 1 <= len(parts) <= 3 or not parts[0]:
            raise ValueError(f"{say}expected PRESET[:BACKEND[:HEIGHTxWIDTH]], e.g. sd3-medium, got {text!r}")
        backend = parts[1] if len(parts) > 1 else cls.backend
        size = re.fullmatch(r"(\d+)x(\d+)", parts[2] if len(parts) > 2 else f"{cls.height}x{cls.width}")
        if size is None:
            raise ValueError(f"{say}expected the size as HEIGHTxWIDTH (e.g. 1024x1024), got {parts[2]!r}")
        if backend not in {b.value for b in Backend}:
            choices = ", ".join(b.value for b in Backend)
            raise ValueError(f"{say}expected a backend among {choices}, got {backend!r}")
        stand_in = cls(parts[0], backend, int(size.group(1)), int(size.group(2)))
        try:
            stand_in.time_ratio(None, 2, 2)
        except ValueError as e:
            raise ValueError(say + str(e).split(": ", 2)[-1].rstrip(".")) from None
        return stand_in

    def __str__(self) -> str:  # the flag's value that gives this stand-in (a reproducing command line)
        return f"{self.preset}:{self.backend}:{self.height}x{self.width}"

    @property
    def label(self) -> str:
        return f"{self.preset} step times ({self.backend}, {self.height}x{self.width})"

    def time_ratio(self, method: Method | None, macs_ratio: float | None, reference_steps: int) -> float:
        """Predicted transformer-loop time of ``method`` (None: the reference) over the dense reference run."""
        from ..planner import estimate_as

        steps = reference_steps if method is None else method.steps
        config = None if method is None else method.config
        return estimate_as(
            self.preset, config, steps, reference_steps, macs_ratio=macs_ratio, height=self.height,
            width=self.width, backend=self.backend,
        ).time_ratio  # fmt: skip

    def add_to(self, row: dict, method: Method, reference_steps: int) -> None:
        """Sets ``gpu_time_ratio`` / ``gpu_speedup`` of a dense or catprune row with a measured MACs ratio (a peer
        that skips steps has no step-time model: left out)."""
        if method.kind not in (Kind.DENSE, Kind.CATPRUNE) or row.get("macs_ratio") is None:
            return
        ratio = self.time_ratio(method, row["macs_ratio"], reference_steps)
        row["gpu_time_ratio"], row["gpu_speedup"] = ratio, 1.0 / ratio


def _timed_dense(rows: list[dict]) -> list[dict]:
    """The scored dense runs with fewer steps that have a modelled time."""
    return [
        r for r in rows
        if r.get("group") == "fewer steps" and r.get("status") == "ok" and r.get("gpu_time_ratio") is not None
    ]  # fmt: skip


def dense_psnr_at(rows: list[dict], time_ratio: float) -> float | None:
    """PSNR of dense with fewer steps, linear between the measured step counts, at a modelled ``time_ratio``;
    None outside their range."""
    points = sorted((r["gpu_time_ratio"], r["psnr"]) for r in _timed_dense(rows) if r.get("psnr") is not None)
    for (t0, p0), (t1, p1) in zip(points, points[1:], strict=False):
        if t0 <= time_ratio <= t1:
            return p0 if t1 == t0 else p0 + (p1 - p0) * (time_ratio - t0) / (t1 - t0)
    return None


def equal_time_entry(rows: list[dict], label: str, ci) -> dict:
    """The comparison at equal modelled GPU time (reported, no verdict): each pruned row's PSNR against dense at
    the same time, the three best, and the best against the cheapest dense run at least as slow (paired ``ci``)."""
    crit = f"at equal modelled GPU time ({label}), the best pruned runs against dense with fewer steps"
    gains = []
    for r in rows:
        if r.get("group") in PRUNED_GROUPS and r.get("status") == "ok" and r.get("psnr") is not None:
            dense = dense_psnr_at(rows, r.get("gpu_time_ratio", -1.0))
            if dense is not None:
                gains.append((r["psnr"] - dense, r, dense))
    if not gains:
        return {"criterion": crit, "holds": None, "status": "not evaluated", "detail": "not evaluated (needs "
                "pruned runs and dense runs with fewer steps around their modelled time)"}  # fmt: skip
    gains.sort(key=lambda g: -g[0])
    parts = [
        f"{r['name']}: {r['psnr']:.2f} dB at {r['gpu_speedup']:.2f}x vs dense {dense:.2f} dB ({gain:+.2f} dB)"
        for gain, r, dense in gains[:3]
    ]
    best = gains[0][1]
    slower = [d for d in _timed_dense(rows) if d["gpu_time_ratio"] >= best["gpu_time_ratio"] - 1e-9]
    if slower:
        d = min(slower, key=lambda x: x["gpu_time_ratio"])
        parts.append(
            f"{best['name']} against {d['name']} ({d['gpu_speedup']:.2f}x, at least as slow): "
            f"{best['psnr'] - d['psnr']:+.2f} dB, {ci(best['name'], d['name'])}"
        )
    return {"criterion": crit, "holds": None, "status": "reported", "detail": "; ".join(parts)}


__all__ = ["PRUNED_GROUPS", "TimeStandIn", "dense_psnr_at", "equal_time_entry"]
