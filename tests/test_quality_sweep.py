"""scripts/quality_sweep.py end to end on a tiny run, its row specs, the Pareto plot and the ingest into the planner's
data (scripts/quality_rows_from_sweep.py)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import catprune
from catprune import CATConfig
from catprune.planner import Tables

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import plot_sweep  # noqa: E402
import quality_rows_from_sweep as ingest  # noqa: E402
import quality_sweep  # noqa: E402
from sweep_rows import PRESETS, legacy_rows, parse_rows  # noqa: E402

sys.path.remove(str(SCRIPTS))


def test_row_specs_name_what_they_run():
    rows = parse_rows("pareto", 28)
    names = [r.name for r in rows]
    assert len(names) == len(set(names)) == sum(len(p.split(",")) for p in PRESETS["pareto"])
    by_name = {r.name: r for r in rows}
    assert by_name["r-k0.3-t8"].config == CATConfig(keep_ratio=0.3, start_step=8, context="reuse")
    assert by_name["x1-k0.38-t6"].config.forecast_max_ratio == 1.0 and by_name["x1-k0.38-t6"].method == "cat-forecast"
    assert (
        by_name["x-k0.5e0.15-t8"].config.keep_ratio_end == 0.15 and by_name["x-k0.2-t8-rf7"].config.refresh_every == 7
    )
    assert by_name["x-k0.5-t6-s20"].steps == 20 and by_name["plan-3x"].speedup == 3.0
    assert by_name["oracle-k0.3-t8"].config.context.value == "reuse" and by_name["oracle-k0.3-t8"].kind == "oracle"
    assert [r.name for r in parse_rows("cat:k=0.2:cap=none:ctx=x:sel=staleness,dense:9,dense:9", 28)] == [
        "xnocap-k0.2-t8-staleness",
        "dense-9",
    ]
    with pytest.raises(ValueError, match="'cat:k=2'"):
        parse_rows("cat:k=2", 28)
    with pytest.raises(ValueError, match="unknown item 'fast:2'"):
        parse_rows("fast:2", 28)
    assert legacy_rows()["cat-x5-0.3"].config == CATConfig(keep_ratio=0.3, start_step=8, context="extrapolate")


def test_pareto_front_and_marks():
    section = {
        "rows": [
            {"row": "d", "method": "dense", "macs_ratio": 0.5, "psnr": 30.0},
            {"row": "x", "method": "cat-forecast", "macs_ratio": 0.45, "psnr": 30.0},
            {"row": "o", "method": "oracle", "macs_ratio": 0.45, "psnr": 45.0},
            {"row": "r", "method": "cat-reuse", "macs_ratio": 0.7, "psnr": 35.0},
        ]
    }
    plot_sweep.mark_pareto(section)
    assert [r["row"] for r in section["rows"] if r["pareto"]] == ["x", "r"]


def test_tiny_sweep_end_to_end_and_its_ingest(tmp_path):
    """Shapes model, 2 prompts, a 4-step reference: every kind of row, the JSON, the plot, then the quality rows in
    the planner's data and a plan that uses them."""
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    rows = "dense:2,cat:k=0.5:t=2:ctx=r,cat:s=3:k=0.5:t=2:ctx=x,plan:1.5,oracle:k=0.5:t=2"
    result = quality_sweep.main(["--model", "shapes", "--num-prompts", "2", "--batch-size", "1", "--steps", "4",
                                 "--rows", rows, "--no-warmup", "--json", str(out), "--plot", str(png)])  # fmt: skip
    section = json.loads(out.read_text())["models"]["shapes"]
    assert section["prompts"] == 2 and section["caption_seed"] == 20_000 and section["reference"]["macs_ratio"] == 1
    got = {r["row"]: r for r in section["rows"]}
    assert list(got) == ["dense-2", "r-k0.5-t2", "x-k0.5-t2-s3", "plan-1.5x", "oracle-k0.5-t2"]
    assert got["dense-2"]["macs_ratio"] == pytest.approx(0.5) and got["dense-2"]["predicted_time_ratio"] == 0.5
    assert got["x-k0.5-t2-s3"]["steps"] == 3 and got["x-k0.5-t2-s3"]["context"] == "extrapolate"
    assert got["r-k0.5-t2"]["macs_ratio"] == pytest.approx(got["oracle-k0.5-t2"]["macs_ratio"])
    for r in got.values():
        assert 5 < r["psnr"] < 100 and 0 < r["ssim"] <= 1 and 0 <= r["shape"] <= 1 and r["seconds"] > 0
    assert "predicted_time_ratio" not in got["oracle-k0.5-t2"] and "summary" in got["plan-1.5x"]["plan"]
    assert result["models"]["shapes"]["rows"][0]["row"] == "dense-2"
    assert png.exists() == (importlib.util.find_spec("matplotlib") is not None)

    quality = ingest.quality_rows(json.loads(out.read_text()), "sweep.json")
    assert "oracle" not in json.dumps([q["config"] for q in quality])
    assert {(q["steps"], json.dumps(q["config"], sort_keys=True)) for q in quality} >= {
        (2, "null"),
        (4, '{"context": "reuse", "keep_ratio": 0.5, "start_step": 2}'),
        (3, '{"context": "extrapolate", "forecast_max_ratio": 0.5, "keep_ratio": 0.5, "start_step": 2}'),
    }
    assert all(q["reference_steps"] == 4 and "sweep.json, shapes model, 2 held-out" in q["source"] for q in quality)
    tables_path = tmp_path / "tables.json"
    tables_path.write_text(json.dumps({"quality": [{**quality[0], "psnr_db": 1.0}], "step_times": []}))
    assert ingest.main([str(out), "--tables", str(tables_path), "--write"]) == 0
    merged = json.loads(tables_path.read_text())
    assert len(merged["quality"]) == len(quality) and merged["quality"][0]["psnr_db"] != 1.0  # replaced, not added
    best = max(quality, key=lambda q: q["psnr_db"])
    pipe = catprune.load_pipeline("shapes")
    plan = catprune.plan(pipe, 1.01, num_inference_steps=4, tables=Tables.from_dict(merged), device="cpu")
    assert plan.expected_quality is not None and plan.expected_quality.psnr_db <= best["psnr_db"]


def test_merge_replaces_same_rows_and_fresh_drops_the_models_other_rows():
    old = [
        {"model": "shapes", "reference_steps": 28, "steps": 14, "config": None, "psnr_db": 1.0},
        {"model": "shapes", "reference_steps": 28, "steps": 20, "config": None, "psnr_db": 2.0},
        {"model": "scenes", "reference_steps": 28, "steps": 20, "config": None, "psnr_db": 3.0},
    ]
    new = [{"model": "shapes", "reference_steps": 28, "steps": 14, "config": None, "psnr_db": 9.0}]
    tables = {"quality": old, "step_times": []}
    merged = ingest.merge(tables, new, [])["quality"]
    assert [r["psnr_db"] for r in merged] == [2.0, 3.0, 9.0]  # the same measurement replaced, the others kept
    fresh = ingest.merge(tables, new, [], fresh=True)["quality"]
    assert [r["psnr_db"] for r in fresh] == [3.0, 9.0]  # shapes rows of other settings gone, scenes untouched


def test_compact_configs_keep_their_meaning():
    full = CATConfig(keep_ratio=0.4, start_step=5, context="extrapolate", forecast_max_ratio=1.0, backend="eager")
    full = full.to_dict()
    compact = ingest.compact_config(full)
    assert compact == {"context": "extrapolate", "forecast_max_ratio": 1.0, "keep_ratio": 0.4, "start_step": 5}
    assert CATConfig(**compact) == CATConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in full.items()})
    assert ingest.compact_config(None) is None


def test_row_specs_take_a_cache_dtype():
    rows = parse_rows("cat:k=0.3:t=8,cat:k=0.3:t=8:cd=fp8,cat:k=0.3:t=8:ctx=x:cache_dtype=bf16", 28)
    assert [r.name for r in rows] == ["r-k0.3-t8", "r-k0.3-t8-fp8", "x-k0.3-t8-bf16"]
    assert [r.config.cache_dtype for r in rows] == [None, catprune.CacheDtype.FP8, catprune.CacheDtype.BF16]
