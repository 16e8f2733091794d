#!/usr/bin/env python3
"""Quality at equal GPU time: the rows of ``scripts/quality_sweep.py`` results timed with a ``catprune bench``
step-time model, each compared with dense at the same time.

    python scripts/equal_time.py --sweep docs/bench/2026-12-02-h200-scenes-final-dense.json \\
        --bench docs/bench/2026-12-02-h200-sd3-medium-compile-cudagraph-full-capture.json \\
        --bench docs/bench/2026-12-02-h200-sd3-medium-k055-s20-full-capture.json \\
        --bench docs/bench/2026-12-02-h200-sd3-medium-k055-s20-compile-cudagraph.json:extrapolate --model scenes

The embedded models are too small for their own GPU step times to mean anything (a 1 024-token step is
launch-bound), so a full-size model's measured steps stand in: from each bench case (same preset, size and mode),
the stock dense step (the baseline's median), catprune's dense-phase step (median of its steps before the
reference step), the capture step and, with the forecast, the reference step before it (both per context: the
capture runs as a full-selection step on the compile and graph backends with reuse, as a hooked dense forward
otherwise) and the pruned step at the case's keep ratio, per context; catprune's full-selection step (``--split``)
is the pruned step at keep 1. A pruned step at another keep ratio is interpolated linearly in the
keep ratio between the measured ones; a context measured at fewer keep ratios takes reuse's curve plus its measured
overhead (the forecast's lerp runs over every token, so its overhead barely depends on k).

``--bench PATH:CONTEXT`` takes only that context's cases of a record (e.g. a record whose reuse case was measured
before a change the other records have).

A row's time is the sum of its steps (the ``final_dense_steps`` last ones at the dense-phase time); dense rows take
the stock step. "dense at equal time" interpolates the dense rows' PSNR linearly in their time.

Example:
    >>> model = StepTimes(39.9, 39.6, {"reuse": 41.6}, {"reuse": {0.3: 16.2, 1.0: 41.0}})
    >>> round(model.pruned_ms("reuse", 0.65), 2)
    28.6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass
class StepTimes:
    """Milliseconds per step: stock dense, catprune's dense phase, the capture (and the forecast's reference) step
    by context, pruned by context and keep."""

    stock_ms: float
    dense_ms: float
    capture_ms: dict[str, float]
    pruned: dict[str, dict[float, float]] = field(default_factory=dict)  # context -> keep ratio -> ms

    @staticmethod
    def _interp(points: dict[float, float], k: float) -> float:
        keys = sorted(points)
        if len(keys) == 1:
            return points[keys[0]]
        lo = max([x for x in keys if x <= k], default=keys[0])
        hi = min([x for x in keys if x > k], default=keys[-1])
        if lo == hi:
            lo, hi = (keys[0], keys[1]) if k < keys[0] else (keys[-2], keys[-1])
        return points[lo] + (points[hi] - points[lo]) * (k - lo) / (hi - lo)

    def pruned_ms(self, context: str, k: float) -> float:
        base = self._interp(self.pruned["reuse"], k)
        if context == "reuse" or context not in self.pruned:
            return base
        own = self.pruned[context]
        overhead = {x: ms - self._interp(self.pruned["reuse"], x) for x, ms in own.items()}
        return base + self._interp(overhead, k)


def step_times(paths: list[str]) -> StepTimes:
    """The step-time model from ``catprune bench --json`` records (one preset, size and mode)."""
    stock, dense, capture, pruned = [], [], {}, {}
    for spec in paths:
        path, _, only = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
        for r in json.loads(Path(path).read_text())["results"]:
            case, cat = r["case"], r["cat"]
            if (only and case["context"] != only) or case.get("keep_ratio_end") is not None:
                continue  # another context, or a schedule (no single keep ratio for its pruned step time)
            start, steps = case["start_step"], cat["step_s"]
            stock.append(1e3 * statistics.median(r["dense"]["step_s"]))
            dense += [1e3 * s for s in steps[: start - 2]]
            capture.setdefault(case["context"], []).append(1e3 * steps[start - 1])
            per = pruned.setdefault(case["context"], {})
            per[case["keep_ratio"]] = 1e3 * cat["pruned_step_s"]
            if r.get("split"):
                per[1.0] = r["split"]["full_selection_step_ms"]
    captures = {context: statistics.median(values) for context, values in capture.items()}
    return StepTimes(statistics.median(stock), statistics.median(dense), captures, pruned)


def row_ms(row: dict, times: StepTimes) -> float:
    """Predicted loop milliseconds of one sweep row."""
    n, config = row["steps"], row.get("config")
    if config is None:
        return n * times.stock_ms
    start, final = config["start_step"], config.get("final_dense_steps", 0)
    context = config.get("context", "reuse")
    keep, end = config["keep_ratio"], config.get("keep_ratio_end")
    pruned_steps = max(0, n - final - start)
    total = 0.0
    for i in range(n):
        if i >= n - final or i < start - 2 or (i == start - 2 and context == "reuse"):
            total += times.dense_ms
        elif i < start:  # the capture (and the forecast's reference step, a hooked forward like its capture)
            total += times.capture_ms.get(context, times.capture_ms["reuse"])
        else:
            j = i - start
            k = keep if end is None else keep + (end - keep) * (j / (pruned_steps - 1) if pruned_steps > 1 else 0.0)
            total += times.pruned_ms(context, k)
    return total


def table(sweeps: list[dict], model: str, times: StepTimes) -> list[dict]:
    """One entry per distinct row of the sweeps (the first sweep that has it), compared with the dense rows of all."""
    rows, seen = [], set()
    for sweep in sweeps:
        section = sweep["models"][model]
        for r in section["rows"]:
            if r["method"] in ("dense", "cat-reuse", "cat-forecast") and r.get("psnr") and r["row"] not in seen:
                seen.add(r["row"])
                rows.append(r)
    reference = sweeps[0]["models"][model]["reference"]["steps"]
    dense = sorted((row_ms(r, times), r["psnr"]) for r in rows if r["config"] is None)
    full = reference * times.stock_ms
    out = []
    for r in rows:
        ms = row_ms(r, times)
        below = [d for d in dense if d[0] <= ms]
        above = [d for d in dense if d[0] > ms]
        if below and above:
            (t0, p0), (t1, p1) = below[-1], above[0]
            at_time = p0 + (p1 - p0) * (ms - t0) / (t1 - t0)
        else:
            at_time = None
        score = next((r[k] for k in ("identity_top1", "shape") if k in r), None)
        out.append(
            dict(
                row=r["row"], method=r["method"], macs=r["macs_ratio"], time=ms / full,
                dense_steps=ms / times.stock_ms, psnr=r["psnr"], ssim=r["ssim"], dense_psnr=at_time, score=score,
            )
        )  # fmt: skip
    return out


def plot(rows: list[dict], title: str, path: str) -> str:
    """PSNR against MACs (left) and against the modelled GPU time (right); the Pareto front of each panel dashed and
    its rows named; rows with final dense steps outlined in black."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot: matplotlib is not installed; {path} not written (pip install matplotlib)"
    from plot_sweep import STYLE, pareto_front

    fig, axes = plt.subplots(1, 2, figsize=(16, 6.5), dpi=100)
    for ax, x, label in ((axes[0], "macs", "transformer MACs / dense-28"), (axes[1], "time", "GPU time / dense-28")):
        pts = [dict(r, x=r[x], macs_ratio=r[x]) for r in rows]
        for method in ("dense", "cat-reuse", "cat-forecast"):
            colour, marker = STYLE[method]
            mine = [r for r in pts if r["method"] == method]
            edges = ["black" if "-fd" in r["row"] else colour for r in mine]
            ax.scatter([r["x"] for r in mine], [r["psnr"] for r in mine], c=colour, marker=marker, s=36,
                       edgecolors=edges, linewidths=1.2, label=method, zorder=3)  # fmt: skip
        dense = sorted((r for r in pts if r["method"] == "dense"), key=lambda r: r["x"])
        ax.plot([r["x"] for r in dense], [r["psnr"] for r in dense], "-", color="#bbbbbb", zorder=1)
        front = pareto_front(pts)
        ax.plot([r["x"] for r in front], [r["psnr"] for r in front], "--", color="black", lw=1, label="Pareto")
        for r in front:
            ax.annotate(r["row"], (r["x"], r["psnr"]), fontsize=7, xytext=(4, -10), textcoords="offset points")
        ax.set_xlim(0.25, 0.75)
        ax.set_ylim(15, 40)
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR to dense-28 (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_title(f"{title}: against MACs (outlined: final dense steps)", fontsize=10)
    axes[1].set_title(f"{title}: against GPU time (SD3-medium step times, compile+cudagraph)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"plot: {path}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", action="append", required=True, help="quality_sweep.py --json results (repeatable)")
    p.add_argument(
        "--bench", action="append", required=True, help="catprune bench --json records, PATH or PATH:CONTEXT (repeatable)"
    )
    p.add_argument("--model", default="scenes")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: PSNR against MACs and against the modelled GPU time")
    args = p.parse_args(argv)
    times = step_times(args.bench)
    print(
        f"step ms: stock {times.stock_ms:.2f}, catprune dense phase {times.dense_ms:.2f}, capture "
        f"{json.dumps(times.capture_ms)}, pruned {json.dumps(times.pruned)}"
    )
    rows = table([json.loads(Path(path).read_text()) for path in args.sweep], args.model, times)
    print(f"{'row':<26}{'MACs':>7}{'time':>7}{'=dense N':>9}{'PSNR':>7}{'SSIM':>8}{'dense@time':>11}{'delta':>7}"
          f"{'score':>7}")  # fmt: skip
    for r in sorted(rows, key=lambda r: r["time"]):
        dense = "" if r["dense_psnr"] is None else f"{r['dense_psnr']:.2f}"
        delta = "" if r["dense_psnr"] is None else f"{r['psnr'] - r['dense_psnr']:+.2f}"
        score = "" if r["score"] is None else f"{r['score']:.3f}"
        print(f"{r['row']:<26}{r['macs']:>7.3f}{r['time']:>7.3f}{r['dense_steps']:>9.2f}{r['psnr']:>7.2f}"
              f"{r['ssim']:>8.4f}{dense:>11}{delta:>7}{score:>7}")  # fmt: skip
    if args.plot:
        print(plot(rows, args.model, args.plot))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(step_ms=times.__dict__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
