"""Turn ``catprune bench --json`` records into step-time rows of the planner's data file.

    python scripts/cost_rows_from_bench.py docs/bench/*.json > rows.json

prints a JSON list of rows (one per benchmarked case) to paste into ``src/catprune/data/cost_tables.json`` under
``step_times``. A row's ``context`` is the case's ``CATConfig.context`` (``catprune bench --context``; records
written before the option existed were measured with ``reuse``). A row's ``pruned_macs_ratio`` is the MACs of one pruned step over one dense step, recovered from the
record's total MACs: ``(macs_cat / macs_dense * N - dense) / (N - dense)``, ``dense`` the warm-up and final dense
steps. ``capture_ms`` is the CAT run's capture step (the full step that fills the caches; the planner charges
it, and with the forecast the reference step too, at that time). Cases with a keep-ratio schedule
(``--keep-ratio-end``) are left out. Cases measured with a low-precision
cache (``catprune bench --cache-dtype`` other than none) are left out: the planner's configurations keep the
model's cache dtype, and on an H200 the fp8 cache made the step slower, not faster.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows_from_record(record: dict, source: str) -> list[dict]:
    rows = []
    for result in record["results"]:
        case, dense, cat = result["case"], result["dense"], result["cat"]
        if not cat.get("pruned_step_s") or case.get("cache_dtype") not in (None, "none"):
            continue
        if case.get("keep_ratio_end") is not None:
            continue  # a keep-ratio schedule: no single keep ratio for the pruned step time
        n, start = case["steps"], case["start_step"]
        dense_steps = start + case.get("final_dense_steps", 0)
        step_s = cat.get("step_s") or []
        capture = round(step_s[start - 1] * 1e3, 3) if 1 <= start <= len(step_s) else None
        total = cat["macs"] / cat["macs_dense"]
        rows.append(
            {
                "model": case["preset"],
                "device": "cpu" if result.get("device", "cpu") == "cpu" else "cuda",
                "card": result.get("device", ""),
                "backend": case["mode"],
                "height": case["height"],
                "width": case["width"],
                "batch": case["batch_size"],
                "dtype": case["dtype"],
                "keep_ratio": case["keep_ratio"],
                "context": case.get("context", "reuse"),  # records without it predate the context forecast
                "dense_ms": round(dense["full_step_s"] * 1e3, 3),
                "pruned_ms": round(cat["pruned_step_s"] * 1e3, 3),
                "pruned_macs_ratio": round((total * n - dense_steps) / (n - dense_steps), 4),
                "source": f"{source} (steps {n}, start {start})",
            }
        )
        if capture is not None:
            rows[-1]["capture_ms"] = capture  # the capture step, from the CAT run's per-step times
    return rows


def main(paths: list[str]) -> int:
    rows = []
    for path in paths:
        rows += rows_from_record(json.loads(Path(path).read_text()), Path(path).as_posix())
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
