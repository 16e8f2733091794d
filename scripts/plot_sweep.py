#!/usr/bin/env python3
"""The Pareto plot of a ``scripts/quality_sweep.py`` result: per model, PSNR to the dense reference against the
MACs ratio (left) and against the cost in time (right: measured wall-clock ratio, filled; the planner's predicted
time ratio, hollow, joined to it by a thin line), with the Pareto front of the runnable rows (dense, CAT, planner;
the oracle is a bound) dashed.

    python scripts/plot_sweep.py sweep.json sweep.png

Example:
    >>> rows = [{"row": "a", "method": "dense", "macs_ratio": 0.5, "psnr": 30.0},
    ...         {"row": "b", "method": "cat-forecast", "macs_ratio": 0.5, "psnr": 31.0},
    ...         {"row": "c", "method": "cat-reuse", "macs_ratio": 0.6, "psnr": 29.0},
    ...         {"row": "d", "method": "oracle", "macs_ratio": 0.4, "psnr": 40.0}]
    >>> [r["row"] for r in pareto_front(rows)]
    ['b']
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

STYLE = {  # method -> (colour, marker)
    "dense": ("#7f7f7f", "o"),
    "cat-reuse": ("#1f77b4", "s"),
    "cat-forecast": ("#d62728", "D"),
    "planner": ("#2ca02c", "*"),
    "oracle": ("#9467bd", "X"),
}
RUNNABLE = ("dense", "cat-reuse", "cat-forecast", "planner")


def _ok(row: dict, x: str = "macs_ratio") -> bool:
    return all(isinstance(row.get(k), (int, float)) and math.isfinite(row[k]) for k in (x, "psnr"))


def pareto_front(rows: list[dict], x: str = "macs_ratio") -> list[dict]:
    """The runnable rows no other runnable row beats (``x`` no higher and PSNR no lower, one strictly), by ``x``."""
    pts = [r for r in rows if r.get("method") in RUNNABLE and _ok(r, x)]

    def beaten(r):
        return any(
            o is not r and o[x] <= r[x] and o["psnr"] >= r["psnr"] and (o[x] < r[x] or o["psnr"] > r["psnr"])
            for o in pts
        )

    return sorted((r for r in pts if not beaten(r)), key=lambda r: r[x])


def mark_pareto(section: dict) -> None:
    """Set ``pareto`` (on the PSNR / MACs front) on every row of a model's section."""
    front = {id(r) for r in pareto_front(section.get("rows", []))}
    for r in section.get("rows", []):
        r["pareto"] = id(r) in front


def _panel(ax, rows: list[dict], x: str, title: str, hollow: str | None = None) -> None:
    for method, (colour, marker) in STYLE.items():
        pts = [r for r in rows if r.get("method") == method and _ok(r, x)]
        if not pts:
            continue
        ax.scatter(
            [r[x] for r in pts], [r["psnr"] for r in pts], c=colour, marker=marker, s=36, label=method, zorder=3
        )
        if hollow:
            pred = [r for r in pts if _ok(r, hollow)]
            ax.scatter([r[hollow] for r in pred], [r["psnr"] for r in pred], facecolors="none", edgecolors=colour,
                       marker=marker, s=36, zorder=3)  # fmt: skip
            for r in pred:
                ax.plot([r[x], r[hollow]], [r["psnr"]] * 2, color=colour, lw=0.6, alpha=0.5, zorder=2)
    dense = sorted((r for r in rows if r.get("method") == "dense" and _ok(r, x)), key=lambda r: r[x])
    ax.plot([r[x] for r in dense], [r["psnr"] for r in dense], "-", color="#bbbbbb", zorder=1)
    front = pareto_front(rows, x)
    ax.plot([r[x] for r in front], [r["psnr"] for r in front], "--", color="black", lw=1, zorder=2, label="Pareto")
    for i, r in enumerate(sorted((r for r in rows if _ok(r, x)), key=lambda r: (r[x], r["psnr"]))):
        ax.annotate(
            r["row"], (r[x], r["psnr"]), fontsize=6, xytext=(4, (3, -8, 10)[i % 3]), textcoords="offset points"
        )
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("PSNR to the dense reference (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def plot(result: dict, path: str) -> str:
    """Draw the Pareto plot of ``result`` (a quality_sweep result) to ``path``; returns a line saying what it did."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot: matplotlib is not installed; {path} not written (pip install matplotlib)"
    models = [(m, s) for m, s in result["models"].items() if s.get("rows")]
    if not models:
        return f"plot: no rows to draw; {path} not written"
    fig, axes = plt.subplots(len(models), 2, figsize=(16, 6.5 * len(models)), dpi=100, squeeze=False)
    for (model, section), (left, right) in zip(models, axes, strict=True):
        rows = section["rows"]
        n, ref = section.get("prompts"), section.get("reference", {}).get("steps")
        _panel(left, rows, "macs_ratio", f"{model}: PSNR against MACs ratio ({n} prompts, reference dense-{ref})")
        left.set_xlabel("transformer MACs / dense reference (catprune.stats)")
        _panel(right, rows, "seconds_ratio", f"{model}: PSNR against time (filled: measured, hollow: predicted)",
               hollow="predicted_time_ratio")  # fmt: skip
        right.set_xlabel("time / dense reference (measured wall-clock; planner's predicted transformer time)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"plot: {path} ({', '.join(m for m, _ in models)})"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("Example:")[0], file=sys.stderr)
        return 2
    result = json.loads(Path(argv[0]).read_text())
    print(plot(result, argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
