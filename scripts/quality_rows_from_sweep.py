#!/usr/bin/env python3
"""Ingest a ``scripts/quality_sweep.py`` result (and ``catprune bench --json`` records) into the planner's data.

    python scripts/quality_rows_from_sweep.py sweep.json                       # print the quality rows
    python scripts/quality_rows_from_sweep.py sweep.json --models scenes --write   # into cost_tables.json
    python scripts/quality_rows_from_sweep.py sweep.json --bench bench.json --write  # and step-time rows
    python scripts/quality_rows_from_sweep.py sweep.json --models shapes --write --fresh  # only this sweep's rows

Quality rows (the format of the shipped shapes rows, ``src/catprune/data/cost_tables.json``): one per measured
dense or CAT row of each model (planner picks become the row of their config; the oracle is a bound, not a way to
run, and is left out), with PSNR / SSIM to the dense reference, the measured MACs ratio, the adherence score and
the measurement's source. A config is written with the fields that differ from today's defaults plus
``keep_ratio``, ``start_step``, ``context`` (and ``forecast_max_ratio`` with the forecast), so that a later change
of a default does not change what the row means. ``--bench``: step-time rows through
``scripts/cost_rows_from_bench.py`` (with their ``context``). ``--write`` replaces rows that measure the same thing
(same model, reference steps, steps and config; for step times the same case) and keeps the others; then it prints
what ``catprune.plan`` picks with the new data.

Example:
    >>> compact_config({"keep_ratio": 0.3, "start_step": 8, "context": "reuse", "backend": "eager"})
    {'context': 'reuse', 'keep_ratio': 0.3, 'start_step': 8}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cost_rows_from_bench import rows_from_record  # noqa: E402

import catprune  # noqa: E402
from catprune import CATConfig  # noqa: E402
from catprune.planner import Tables  # noqa: E402
from catprune.planner.tables import DATA_FILE  # noqa: E402

ALWAYS = ("keep_ratio", "start_step", "context")
NOT_QUALITY = ("backend",)  # speed only: the planner sets it
RUNNABLE = ("dense", "cat-reuse", "cat-forecast", "planner")


def compact_config(fields: dict | None) -> dict | None:
    """The fields of a `CATConfig` dict that fix its meaning: those unlike today's defaults, plus `ALWAYS` (and
    ``forecast_max_ratio`` with ``context="extrapolate"``); never ``backend``."""
    if fields is None:
        return None
    full = CATConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}).to_dict()
    default = CATConfig().to_dict()
    keep = set(ALWAYS) | ({"forecast_max_ratio"} if full["context"] == "extrapolate" else set())
    return {k: full[k] for k in sorted(full) if k not in NOT_QUALITY and (k in keep or full[k] != default[k])}


def _config_key(fields: dict | None) -> str:
    if fields is None:
        return "dense"
    full = CATConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}).to_dict()
    return json.dumps({k: v for k, v in full.items() if k not in NOT_QUALITY}, sort_keys=True)


def _source(name: str, model: str, section: dict, result: dict, row: str) -> str:
    s, env = result["settings"], result.get("environment", {})
    card = (env.get("gpus") or [env.get("cpu") or "cpu"])[0] if s["device"] != "cpu" else env.get("cpu") or "cpu"
    n, seed = section["prompts"], s["seed"]
    precision = "fp32 + TF32" if s.get("tf32") else "fp32"
    return (
        f"{name}, {model} model, {n} held-out prompts (caption seed {section['caption_seed']}), seeds {seed}.."
        f"{seed + n - 1}, {precision} eager, batch {section['batch_size']}, {card} ({row})"
    )


def quality_rows(result: dict, name: str, models: list[str] | None = None) -> list[dict]:
    """Planner quality rows of a sweep result (models: all, or those named)."""
    out, seen = [], set()
    for model, section in result["models"].items():
        if (models and model not in models) or "reference" not in section:
            continue
        reference = section["reference"]["steps"]
        for r in section["rows"]:
            if r["method"] not in RUNNABLE or not r.get("psnr") or (r["config"] is None and r["steps"] >= reference):
                continue
            key = (model, reference, r["steps"], _config_key(r["config"]))
            if key in seen:
                continue
            seen.add(key)
            row = {"model": model, "reference_steps": reference, "steps": r["steps"]}
            row.update(config=compact_config(r["config"]), psnr_db=round(r["psnr"], 2), ssim=round(r["ssim"], 4))
            row["macs_ratio"] = round(r["macs_ratio"], 4)
            for k in ("identity_top1", "colour_at_cell", "shape"):
                if k in r:
                    row[k] = round(r[k], 4)
            row["source"] = _source(name, model, section, result, r["row"])
            out.append(row)
    return out


def _quality_key(row: dict) -> tuple:
    return (
        row["model"],
        row["reference_steps"],
        row["steps"],
        _config_key(row.get("config")),
        str(row.get("step_cache")),
    )


def _time_key(row: dict) -> tuple:
    fields = ("model", "device", "card", "backend", "height", "width", "batch", "keep_ratio", "dtype")
    return (*(row.get(k) for k in fields), row.get("context", "reuse"))


def merge(tables: dict, quality: list[dict], times: list[dict], fresh: bool = False) -> dict:
    """``tables`` (the cost_tables.json structure) with ``quality`` / ``times`` added, replacing rows that measure
    the same thing; the others keep their order. ``fresh``: every earlier quality row of the models in ``quality``
    goes (rows measured under other settings, e.g. other prompts or precision, do not compare in dB)."""
    new_q, new_t = {_quality_key(r) for r in quality}, {_time_key(r) for r in times}
    models = {r["model"] for r in quality} if fresh else set()
    out = dict(tables)
    kept = [r for r in tables.get("quality", []) if _quality_key(r) not in new_q and r["model"] not in models]
    out["quality"] = kept + quality
    out["step_times"] = [r for r in tables.get("step_times", []) if _time_key(r) not in new_t] + times
    return out


def show_plans(tables: dict, models: list[str]) -> None:
    """What the planner picks on each model (on CUDA, 28 steps) with the new data."""
    data = Tables.from_dict(tables)
    for model in models:
        pipe = catprune.load_pipeline(model)
        for speedup in (2.0, 3.0):
            try:
                print(catprune.plan(pipe, speedup, 28, device="cuda", tables=data).summary())
            except ValueError as exc:
                print(f"{model} {speedup:g}x: {exc}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", nargs="?", help="a quality_sweep.py --json result")
    p.add_argument("--models", default=None, help="comma-separated models to ingest (default: all in the result)")
    p.add_argument("--bench", action="append", default=[], help="catprune bench --json records (step-time rows)")
    p.add_argument("--tables", default=str(DATA_FILE), help="the data file (default: the shipped cost_tables.json)")
    p.add_argument("--write", action="store_true", help="write the rows into --tables (else print them)")
    p.add_argument(
        "--fresh", action="store_true", help="with --write: drop the earlier quality rows of the ingested models"
    )
    args = p.parse_args(argv)
    models = args.models.split(",") if args.models else None
    quality = []
    if args.sweep:
        quality = quality_rows(json.loads(Path(args.sweep).read_text()), Path(args.sweep).name, models)
    times = [row for path in args.bench for row in rows_from_record(json.loads(Path(path).read_text()), path)]
    if not args.write:
        print(json.dumps({"quality": quality, "step_times": times}, indent=1))
        return 0
    path = Path(args.tables)
    raw = path.read_text()
    tables = merge(json.loads(raw), quality, times, fresh=args.fresh)
    Tables.from_dict(tables)  # every row must parse before the file changes
    path.write_text(json.dumps(tables, indent=1) + ("\n" if raw.endswith("\n") else ""))
    print(f"{path}: {len(quality)} quality rows and {len(times)} step-time rows written")
    show_plans(tables, sorted({r["model"] for r in quality}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
