"""The result rows (timings, MACs and scores joined per method) and how CAT compares with what a user could run
instead: dense at fewer steps of equal cost, other selection rules at the same budget, baselines and peers.

Each comparison is a dict ``{"criterion", "holds" (True / False / None), "status", "detail"}``; ``status`` is
"holds", "miss", "not evaluated" (a method it needs was not run; the detail says which) or "reported" (measured,
no verdict). MACs ratios are written with 3 decimals everywhere.

Example:
    >>> rows = [
    ...     {"name": "dense-8", "group": "reference", "status": "ok", "steps": 8, "macs_ratio": 1.0},
    ...     {"name": "dense-6", "group": "fewer steps", "status": "ok", "steps": 6, "macs_ratio": 0.75},
    ...     {"name": "dense-5", "group": "fewer steps", "status": "ok", "steps": 5, "macs_ratio": 0.625},
    ...     {"name": "cat-a0.3-t4", "group": "CAT", "status": "ok", "selection": "cat", "keep_ratio": 0.3,
    ...      "start_step": 4, "macs_ratio": 0.66},
    ... ]
    >>> matched_dense_run(rows, main_cat(rows))["name"]
    'dense-6'
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .files import read_json
from .gpu_time import TimeStandIn, equal_time_entry
from .methods import GROUPS, Method
from .metrics import paired_difference
from .settings import reference_name
from .store import load_generation, timing_summary

#: CAT's main configuration, the one the comparisons are about (when it was run).
MAIN_KEEP, MAIN_START = 0.3, 8
ADHERENCE_TOLERANCE = 0.03  # "within 3 points"
DEFAULT_ADHERENCE_KEYS = ("colour_at_cell", "shape")


def order(method: Method) -> tuple:
    """Display order: group, then more steps first, selection rule, larger keep ratio, earlier start."""
    cfg = method.config
    return (
        GROUPS.index(method.group),
        -method.steps,
        cfg.selection.value if cfg is not None else "",
        -(cfg.keep_ratio if cfg is not None else 0),
        cfg.start_step if cfg is not None else 0,
        method.name,
    )


def build_rows(out_dir: str | os.PathLike, time_model: TimeStandIn | None = None) -> tuple[list[dict], dict]:
    """One row per method (skipped ones included, with their reason) joining timings, MACs and scores; with
    ``time_model``, also the modelled GPU time of dense and catprune rows (`gpu_time.TimeStandIn`)."""
    out = Path(out_dir)
    settings, caches, skipped = load_generation(out)
    scores = read_json(out / "scores.json", default={}) or {}
    method_scores = scores.get("methods", {})
    timings = {c.method.name: timing_summary(c) for c in caches}
    ref_t = timings.get(reference_name(settings), {})
    rows = []
    for cache in sorted(caches, key=lambda c: order(c.method)):
        m, t = cache.method, timings[cache.method.name]
        row = {
            "name": m.name,
            "group": m.group,
            "status": "ok" if m.name in method_scores else "not scored",
            "steps": m.steps,
            "keep_ratio": m.config.keep_ratio if m.config is not None else None,
            "start_step": m.config.start_step if m.config is not None else None,
            "selection": m.config.selection.value if m.config is not None else None,
            "images": t["images"],
            "seconds_per_image": t["seconds_per_image"],
            "macs_per_image": t["macs_per_image"],
            "macs_estimated": t["macs_estimated"],
            "description": m.description,
        }
        if ref_t.get("seconds_per_image") and t["seconds_per_image"]:
            row["wall_speedup"] = ref_t["seconds_per_image"] / t["seconds_per_image"]
        if ref_t.get("macs_per_image") and t["macs_per_image"]:
            row["macs_ratio"] = t["macs_per_image"] / ref_t["macs_per_image"]
            row["macs_speedup"] = ref_t["macs_per_image"] / t["macs_per_image"]
        if "cached_steps_per_call" in t:
            row["cached_steps_per_generation"] = t["cached_steps_per_call"]
        row.update(method_scores.get(m.name, {}).get("summary", {}))
        if time_model is not None:
            time_model.add_to(row, m, settings.steps)
        rows.append(row)
    for name, reason in sorted(skipped.items()):
        rows.append({"name": name, "group": "peer", "status": f"skipped: {reason}", "description": reason})
    return rows, scores


def find(rows: list[dict], **match) -> dict | None:
    """The first scored row whose fields equal ``match``."""
    for row in rows:
        if row.get("status") == "ok" and all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def main_cat(rows: list[dict]) -> dict | None:
    """The CAT row the comparisons are about: keep 0.3 / start 8 if it was run, else the first CAT row with keep
    0.3, else the first CAT row (runs with fewer steps start CAT earlier); rows at the reference's step count before
    the mixes of pruning and fewer steps."""
    cats = [r for r in rows if r.get("selection") == "cat" and r.get("status") == "ok"]
    reference = next((r.get("steps") for r in rows if r.get("group") == "reference"), None)
    cats = [r for r in cats if r.get("steps") == reference] + [r for r in cats if r.get("steps") != reference]
    for pick in (
        lambda r: r["keep_ratio"] == MAIN_KEEP and r["start_step"] == MAIN_START,
        lambda r: r["keep_ratio"] == MAIN_KEEP,
        lambda r: True,
    ):
        found = [r for r in cats if pick(r)]
        if found:
            return found[0]
    return None


def fewer_steps_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("group") == "fewer steps" and r.get("status") == "ok" and r.get("macs_ratio")]


def matched_dense_run(rows: list[dict], cat: dict | None, costlier_only: bool = True) -> dict | None:
    """The dense fewer-steps run that matches ``cat``'s cost: the cheapest one with MACs at or above CAT's (so
    that CAT runs at equal or lower cost). With ``costlier_only=False``, when there is none, the closest in MACs.
    """
    fewer = fewer_steps_rows(rows)
    if cat is None or cat.get("macs_ratio") is None or not fewer:
        return None
    costlier = [r for r in fewer if r["macs_ratio"] >= cat["macs_ratio"] - 1e-12]
    if costlier:
        return min(costlier, key=lambda r: r["macs_ratio"])
    return None if costlier_only else min(fewer, key=lambda r: abs(r["macs_ratio"] - cat["macs_ratio"]))


def _per_image(scores: dict, name: str, key: str) -> list[float] | None:
    return scores.get("methods", {}).get(name, {}).get("per_image", {}).get(key)


def paired(scores: dict, a: str, b: str, key: str = "psnr") -> dict | None:
    """Paired per-image difference ``a - b`` of ``key`` with its 95% CI (None without per-image scores)."""
    x, y = _per_image(scores, a, key), _per_image(scores, b, key)
    if x is None or y is None:
        return None
    return paired_difference(x, y)


def db(row: dict) -> str:
    """PSNR of a row as text; identical images have infinite PSNR and are left out of the mean."""
    value = row.get("psnr")
    if value is None:
        return "identical to dense (inf)" if row.get("psnr_identical") else "n/a"
    same = f", {row['psnr_identical']} identical" if row.get("psnr_identical") else ""
    return f"{value:.2f} dB{same}"


def psnr_key(row: dict) -> float:
    value = row.get("psnr")
    return math.inf if value is None and row.get("psnr_identical") else (value if value is not None else -math.inf)


def ci(d: dict | None, unit: str = " dB") -> str:
    if d is None:
        return ""
    return f"paired difference {d['mean']:+.2f}{unit} (95% CI {d['ci_low']:+.2f} to {d['ci_high']:+.2f}, n={d['n']})"


def _entry(criterion: str, holds: bool | None, detail: str) -> dict:
    return {"criterion": criterion, "holds": holds, "detail": detail}


def _adherence(rows, cat, ref, label, keys) -> dict:
    crit = f"{label} keeps adherence within 3 points of dense"
    if cat is None or ref is None or ref.get(keys[0]) is None:
        return _entry(crit, None, "not evaluated (needs a model with an adherence scorer, e.g. shapes, dense and CAT)")
    drops = {k: ref[k] - cat[k] for k in keys if ref.get(k) is not None and cat.get(k) is not None}
    holds = all(v <= ADHERENCE_TOLERANCE + 1e-12 for v in drops.values())
    detail = "; ".join(
        f"{k}: dense {100 * ref[k]:.1f}%, CAT {100 * cat[k]:.1f}% (drop {100 * v:+.1f} points)"
        for k, v in drops.items()
    )
    return _entry(crit, holds, detail)


def _fewer_steps(rows, scores, cat, ref, label) -> dict:
    crit = f"at equal or lower MACs and wall-clock, {label} has higher PSNR-to-dense than dense with fewer steps"
    fewer = [r for r in rows if r.get("group") == "fewer steps" and r.get("status") == "ok"]
    if cat is None or not fewer or cat.get("macs_ratio") is None:
        return _entry(
            crit, None, "not evaluated (needs CAT, dense with fewer steps and MACs; --methods quick has them)"
        )
    match = matched_dense_run(rows, cat)
    if match is None:
        steps = ref["steps"] if ref is not None else max(r["steps"] for r in fewer) + 1
        need = math.ceil(cat["macs_ratio"] * steps - 1e-9)
        return _entry(
            crit,
            None,
            f"not evaluated: no dense fewer-steps run has MACs >= CAT's ({cat['macs_ratio']:.3f}); add "
            f"--methods ...,dense:{need}",
        )
    wall_ok = cat["seconds_per_image"] <= match["seconds_per_image"]
    psnr_ok = psnr_key(cat) > psnr_key(match)
    parts = [
        f"matched dense run {match['name']}: MACs ratio {match['macs_ratio']:.3f} vs CAT {cat['macs_ratio']:.3f}",
        f"wall-clock {match['seconds_per_image']:.4g} s/image vs CAT {cat['seconds_per_image']:.4g} s/image"
        + ("" if wall_ok else " (CAT is slower: wall-clock condition fails)"),
        f"PSNR {db(match)} vs CAT {db(cat)}",
        ci(paired(scores, cat["name"], match["name"])),
    ]
    others = [f"{r['name']} {db(r)}" for r in sorted(fewer, key=lambda r: -r["steps"]) if r is not match]
    if others:
        parts.append("other fewer-steps runs: " + ", ".join(others))
    return _entry(crit, bool(wall_ok and psnr_ok), "; ".join(p for p in parts if p))


def _ablations(rows, scores, cat, label, keep, start) -> dict:
    crit = f"at the same budget, {label} beats random, magnitude-only and staleness-only selection on PSNR"
    ablations = [
        find(rows, selection=s, keep_ratio=keep, start_step=start) for s in ("random", "magnitude", "staleness")
    ]
    if cat is None or any(a is None for a in ablations):
        missing = [s for s, a in zip(("random", "magnitude", "staleness"), ablations, strict=True) if a is None]
        return _entry(crit, None, f"not evaluated (needs CAT and the ablations; missing: {', '.join(missing)})")
    wins = [psnr_key(cat) > psnr_key(a) for a in ablations]
    detail = "; ".join(
        f"{a['selection']}: {db(a)} vs CAT {db(cat)}, {ci(paired(scores, cat['name'], a['name']))}" for a in ablations
    )
    nc = find(rows, selection="no_clustering", keep_ratio=keep, start_step=start)
    if nc is not None:
        detail += f"; (no verdict) no_clustering: {db(nc)}, {ci(paired(scores, cat['name'], nc['name']))}"
    return _entry(crit, all(wins), detail)


def _others(rows, scores, cat, label) -> dict:
    crit = f"{label} against the RAS-style baseline and cache-dit (reported as measured)"
    parts = []
    for row in rows:
        if row.get("group") not in ("baseline", "peer"):
            continue
        if row.get("status") != "ok":
            parts.append(f"{row['name']}: {row['status']}")
            continue
        if cat is None:
            continue
        bits = [f"{row['name']}: PSNR {db(row)} vs CAT {db(cat)}"]
        d = paired(scores, cat["name"], row["name"])
        if d is not None:
            bits.append(ci(d))
        if row.get("adherence") is not None and cat.get("adherence") is not None:
            bits.append(f"adherence {100 * row['adherence']:.1f}% vs CAT {100 * cat['adherence']:.1f}%")
        if row.get("macs_ratio") is not None and cat.get("macs_ratio") is not None:
            est = " (estimated)" if row.get("macs_estimated") else ""
            bits.append(f"MACs ratio {row['macs_ratio']:.3f}{est} vs CAT {cat['macs_ratio']:.3f}")
        if row.get("seconds_per_image") is not None:
            bits.append(f"{row['seconds_per_image']:.4g} s/image vs CAT {cat['seconds_per_image']:.4g}")
        parts.append(", ".join(bits))
    return _entry(crit, None, "; ".join(parts) or "no baseline or peer was run")


def comparisons(rows: list[dict], scores: dict, time_model: TimeStandIn | None = None) -> list[dict]:
    """How CAT compares, on the measured rows: adherence against dense, PSNR against dense with fewer steps at
    equal cost, PSNR against the ablations at the same budget (verdicts), and the baselines and peers (reported);
    with ``time_model`` (rows from ``build_rows(..., time_model)``) also every pruned run against dense at equal
    modelled GPU time (reported).

    Example:
        >>> [c["status"] for c in comparisons([], {})]
        ['not evaluated', 'not evaluated', 'not evaluated', 'reported']
    """
    cat = main_cat(rows)
    ref = find(rows, group="reference")
    keep, start = (cat["keep_ratio"], cat["start_step"]) if cat is not None else (MAIN_KEEP, MAIN_START)
    label = f"CAT (keep {keep:g}, start {start})"
    keys = tuple(scores.get("adherence_keys") or DEFAULT_ADHERENCE_KEYS)
    out = [
        _adherence(rows, cat, ref, label, keys),
        _fewer_steps(rows, scores, cat, ref, label),
        _ablations(rows, scores, cat, label, keep, start),
        _others(rows, scores, cat, label),
    ]
    for entry in out[:3]:
        entry["status"] = {True: "holds", False: "miss", None: "not evaluated"}[entry["holds"]]
    out[3]["status"] = "reported"
    if time_model is not None:
        out.append(equal_time_entry(rows, time_model.label, lambda a, b: ci(paired(scores, a, b))))
    return out


__all__ = [
    "build_rows",
    "comparisons",
    "find",
    "main_cat",
    "matched_dense_run",
    "order",
]
