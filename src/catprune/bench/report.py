"""The lines under ``catprune bench``'s table and the JSON summary: per size / batch / steps the dense baseline
(with the candidates ``--dense-baseline best`` timed) and the fastest CAT mode; each case's implementation vs
pruning split."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .baselines import SAME

if TYPE_CHECKING:
    from . import BenchResult


def summarize(results: list[BenchResult]) -> list[dict]:
    """One record per size / batch / steps: the dense baseline (and the candidates ``best`` timed), the fastest CAT
    mode among the cases run, and its ratios against that baseline."""
    groups: dict[tuple, list[BenchResult]] = {}
    for r in results:
        groups.setdefault((r.case.width, r.case.height, r.case.batch_size, r.case.steps), []).append(r)
    out = []
    for (width, height, batch, steps), rows in groups.items():
        best = min(rows, key=lambda r: r.cat.loop_s)
        out.append(
            dict(
                size=f"{width}x{height}",
                batch_size=batch,
                steps=steps,
                dense_baseline=best.baseline.get("name", SAME),
                dense_candidates_ms=best.baseline.get("candidates_ms") or {},
                dense_skipped=best.baseline.get("skipped") or {},
                best_cat_mode=best.case.mode,
                loop_speedup=best.loop_speedup,
                macs_speedup=best.macs_speedup,
                efficiency=best.loop_speedup / best.macs_speedup,
                end_to_end_speedup=best.end_to_end_speedup,
            )
        )
    return out


def format_details(results: list[BenchResult]) -> str:
    """Lines under the table: per size / batch / steps the dense candidates ``best`` timed (ms/step, the winner
    starred) and the fastest CAT mode; then each case's implementation vs pruning split."""
    lines = []
    for g in summarize(results):
        head = f"{g['size']} B{g['batch_size']} N{g['steps']}"
        if g["dense_candidates_ms"]:
            times = ", ".join(
                f"{name} {ms:.2f}" + (" *" if name == g["dense_baseline"] else "")
                for name, ms in g["dense_candidates_ms"].items()
            )
            skipped = f"; skipped: {', '.join(g['dense_skipped'])}" if g["dense_skipped"] else ""
            lines.append(f"{head}: dense candidates (ms/step): {times}{skipped}")
        lines.append(
            f"{head}: best CAT mode {g['best_cat_mode']} vs dense {g['dense_baseline']}: loop x "
            f"{g['loop_speedup']:.2f} (MACs x {g['macs_speedup']:.2f}, eff {g['efficiency']:.2f}), e2e x "
            f"{g['end_to_end_speedup']:.2f}"
        )
    for r in results:
        c = r.case
        if c.cache_dtype is not None or len({x.case.cache_dtype for x in results}) > 1:  # with --cache-dtype
            lines.append(
                f"cache {c.mode} {c.width}x{c.height} N{c.steps} cache_dtype={c.cache_dtype or 'none'} context="
                f"{c.context}: K/V {r.kv_cache_mem_gb:.3f} GiB, all caches {r.cache_mem_gb:.3f} GiB, "
                f"peak GiB dense/CAT {r.dense.peak_mem_gb:.2f}/{r.cat.peak_mem_gb:.2f}"
            )
        sp = r.split
        if sp and "pruning_efficiency" in sp:
            lines.append(
                f"split {r.case.mode} {r.case.width}x{r.case.height} N{r.case.steps}: stock step "
                f"{sp['stock_step_ms']:.2f} ms, CAT full-selection {sp['full_selection_step_ms']:.2f} ms "
                f"(implementation x {sp['implementation_x']:.2f}); pruned {sp['pruned_step_ms']:.2f} ms (pruning x "
                f"{sp['pruning_x']:.2f} of MACs x {sp['pruning_macs_x']:.2f}: efficiency {sp['pruning_efficiency']:.2f})"
            )
    return "\n".join(lines)
