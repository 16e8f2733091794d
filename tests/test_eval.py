"""`catprune eval`: metrics, method specs, the generation cache, scoring, the report and the CLI (tiny random
shapes pipelines at 64x64, few prompts, few steps)."""

import csv
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import catprune
from catprune.evaluation import EvalSettings, generate, parse_methods, score, write_report
from catprune.evaluation.compare import comparisons, main_cat
from catprune.evaluation.files import load_images
from catprune.evaluation.methods import Kind, Method, default_methods
from catprune.evaluation.metrics import finite_mean, paired_difference, psnr, ssim
from catprune.evaluation.store import load_generation

STEPS, START, SIZE = 6, 3, 64  # 16x16 tokens at patch 4
TOKENS = (SIZE // 4) ** 2
QUIET = dict(log=lambda s: None)


def tiny_pipe(seed=0):
    from catprune.models.shapes import build_random_shapes_pipeline

    pipe = build_random_shapes_pipeline(seed=seed, num_layers=2, attention_head_dim=8, num_attention_heads=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_settings(**overrides):
    base = dict(model="shapes", num_prompts=3, steps=STEPS, batch_size=2, height=SIZE, width=SIZE)
    return EvalSettings(**{**base, **overrides})


METHODS = f"dense:3,cat:0.5:{START},random:0.5:{START},ras:0.5:{START}"


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """One generation + scoring + report, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("eval") / tiny_settings().folder_name()
    pipe = tiny_pipe()
    generate(tiny_settings(), parse_methods(METHODS, STEPS), out, pipe=pipe, **QUIET)
    score(out, **QUIET)
    results = write_report(out, **QUIET)
    return out, pipe, results


# ------------------------------------------------------------------------------------------------ metrics
def test_psnr_hand_computed_and_identical_is_inf():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.1  # mse 0.01 -> 20 dB
    values = psnr(a, b)
    assert values[0].item() == pytest.approx(20.0)
    assert math.isinf(values[1].item())


def test_ssim_of_constant_images_matches_formula():
    # constant images: variances and covariance vanish, SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a, b = torch.full((1, 3, 16, 16), 0.5), torch.full((1, 3, 16, 16), 0.75)  # exact in float32
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.75 + c1) / (0.5**2 + 0.75**2 + c1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-9)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0])
    assert ssim(x, 1 - x).tolist() == pytest.approx(ssim(1 - x, x).tolist())  # symmetric
    assert (ssim(x, 1 - x) < 0).all()  # anti-correlated


def test_metric_errors_name_the_argument():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(TypeError, match="two tensors"):
        psnr(np.zeros((1, 3, 4, 4)), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_finite_mean_and_paired_difference():
    assert finite_mean([float("inf"), 1.0, 3.0]) == 2.0
    assert finite_mean([float("inf")]) is None
    d = paired_difference([2.0, 3.0, 4.0, float("inf")], [1.0, 1.0, 1.0, 1.0])
    assert d["n"] == 3 and d["mean"] == pytest.approx(2.0) and d["ci_low"] < 2.0 < d["ci_high"]


# ------------------------------------------------------------------------------------------------ methods
def test_default_methods_cover_the_issue():
    methods = {m.name: m for m in default_methods(28)}
    assert methods["dense-28"].group == "reference"
    assert {"dense-20", "dense-14", "dense-10", "dense-15"} <= set(methods)
    main = methods["cat-a0.3-t8"].config
    for name in ("random", "magnitude", "staleness", "no_clustering", "ras"):
        cfg = methods[f"{name}-a0.3-t8"].config
        assert (cfg.keep_ratio, cfg.start_step, cfg.num_clusters) == (main.keep_ratio, main.start_step, None)
        assert cfg.selection.value == name
    assert {m.config.keep_ratio for m in methods.values() if m.group == "CAT"} >= {0.2, 0.3, 0.5}
    assert {m.config.start_step for m in methods.values() if m.group == "CAT"} >= {4, 8, 12}
    assert methods["dbcache-r0.08"].kind is Kind.PEER


def test_parse_methods_always_includes_the_reference_first():
    names = [m.name for m in parse_methods("ras:0.2:4,dense:5,dense", 8)]
    assert names == ["dense-8", "ras-a0.2-t4", "dense-5"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bogus", "unknown method 'bogus'"),
        ("cat:abc", "expected a keep ratio"),
        ("cat:1.5:8", "keep_ratio"),
        ("dense:40", r"step count in \[1, 28\]"),
        ("dense:2:3", "dense:STEPS"),
    ],
)
def test_parse_methods_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_methods(spec, 28)


def test_keyword_methods_mix_pruning_with_fewer_steps_and_the_pareto_preset():
    a, b = parse_methods("cat:s=20:k=0.55:t=6:fd=2,cat:s=20:k=0.5:t=6:ctx=x:cap=1", 28)[1:]
    assert a.steps == 20 and a.name.endswith("-s20") and a.group == "CAT"
    assert (a.config.keep_ratio, a.config.start_step, a.config.final_dense_steps) == (0.55, 6, 2)
    assert "final_dense_steps=2" in a.description and "20 steps" in a.description
    assert b.config.context.value == "extrapolate" and b.config.forecast_max_ratio == 1.0 and a.name != b.name
    pareto = parse_methods("pareto", 28)
    assert [m.name for m in pareto][:3] == ["dense-28", "dense-24", "dense-20"]
    assert {m.steps for m in pareto if m.config is not None} == {28, 20, 18, 17, 14, 13}
    assert len({m.name for m in pareto}) == len(pareto)
    small = parse_methods("pareto", 8)  # scaled: every run fits the reference, final dense steps after the start
    for m in small:
        assert 1 <= m.steps <= 8
        if m.config is not None:
            assert m.config.start_step + m.config.final_dense_steps < m.steps


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cat:s=40:k=0.3", r"s: expected an int step count in \[2, 28\]"),
        ("cat:k=0.3:q=2", "unknown key 'q'"),
        ("cat:k=0.3:t", "expected KEY=VALUE items"),
        ("cat:k=2", "keep_ratio"),
        ("cat:fd=-1", "final_dense_steps"),
    ],
)
def test_keyword_method_errors_name_the_item(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_methods(spec, 28)
    assert repr(spec) in str(info.value)


def test_fewer_steps_cat_method_generates_and_is_not_the_main_cat(tmp_path):
    """A CAT method with fewer steps than the reference runs (its MACs ratio against the reference's), and the
    comparisons stay about the CAT run at the reference's steps."""
    out = tmp_path / "mix"
    methods = parse_methods(f"cat:0.3:{START},cat:s=4:k=0.5:t=2:fd=1", STEPS)
    generate(tiny_settings(num_prompts=2), methods, out, pipe=tiny_pipe(), warmup=False, **QUIET)
    score(out, **QUIET)
    results = write_report(out, **QUIET)
    rows = {r["name"]: r for r in results["methods"]}
    mix = rows[methods[2].name]
    assert mix["steps"] == 4 and mix["status"] == "ok" and 0 < mix["macs_ratio"] < 4 / STEPS
    assert main_cat(results["methods"])["name"] == methods[1].name


def test_settings_validation_and_folder_name(tmp_path):
    assert tiny_settings().folder_name() == f"shapes-p3-s{STEPS}-seed0-{SIZE}x{SIZE}"
    with pytest.raises(ValueError, match="EvalSettings.num_prompts: expected an int >= 1"):
        EvalSettings(num_prompts=0)
    with pytest.raises(ValueError, match="prompts_file"):
        EvalSettings(model="some/hub-model").prompts()
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    assert EvalSettings(model="x", prompts_file=str(prompts), num_prompts=2).prompts() == ["one", "two"]
    with pytest.raises(ValueError, match="at most the 2 prompts"):
        EvalSettings(model="x", prompts_file=str(prompts), num_prompts=3).prompts()


# ------------------------------------------------------------------------------------------------ generation
def test_generation_cache_layout_timings_and_macs(evaluation):
    out, _, _ = evaluation
    settings, caches, skipped = load_generation(out)
    assert settings == tiny_settings() and skipped == {}
    by_name = {c.method.name: c for c in caches}
    assert set(by_name) == {f"dense-{STEPS}", "dense-3", f"cat-a0.5-t{START}", f"random-a0.5-t{START}",
                            f"ras-a0.5-t{START}"}  # fmt: skip
    for cache in caches:
        batches = cache.batches()
        assert [b["indices"] for b in batches] == [[0, 1], [2]]
        assert all(b["seconds"] > 0 and b["macs"] > 0 for b in batches)
        assert all(cache.image_path(i).is_file() for i in range(3))
    dense_call = by_name[f"dense-{STEPS}"].batches()[0]["dense_macs_per_call"]
    assert by_name[f"dense-{STEPS}"].batches()[0]["macs"] == STEPS * dense_call
    assert by_name["dense-3"].batches()[0]["macs"] == 3 * dense_call


def test_images_match_a_direct_pipeline_call(evaluation):
    out, pipe, _ = evaluation
    settings = tiny_settings()
    prompts = settings.prompts()
    config = catprune.CATConfig(keep_ratio=0.5, start_step=START)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    with catprune.applied(pipe, config):
        direct = pipe(prompts[:2], num_inference_steps=STEPS, generator=generators, output_type="pt",
                      height=SIZE, width=SIZE).images  # fmt: skip
        stats = catprune.stats(pipe)
    cache = {c.method.name: c for c in load_generation(out)[1]}[f"cat-a0.5-t{START}"]
    stored = load_images([cache.image_path(0), cache.image_path(1)])
    assert (stored - direct).abs().max() <= 0.5 / 255 + 1e-6  # PNG quantisation only
    assert cache.batches()[0]["macs"] == stats.macs


def test_selection_counts_match_the_budget(evaluation):
    out, _, _ = evaluation
    caches = {c.method.name: c for c in load_generation(out)[1]}
    k = catprune.CATConfig(keep_ratio=0.5).tokens_kept(TOKENS)
    for name in (f"cat-a0.5-t{START}", f"random-a0.5-t{START}", f"ras-a0.5-t{START}"):
        tokens = caches[name].tokens()
        counts = tokens["counts"]  # (images, M)
        assert counts.shape == (3, TOKENS) and tuple(tokens["grid"]) == (SIZE // 4, SIZE // 4)
        # full steps 0..START-1 compute every token; each pruned step computes exactly k tokens
        assert (counts.sum(axis=1) == START * TOKENS + (STEPS - START) * k).all()
        assert counts.min() >= START and counts.max() <= STEPS
    assert caches[f"dense-{STEPS}"].tokens() is None
    assert not catprune.is_applied(evaluation[1])  # nothing left on the pipeline


def test_generation_resumes_and_invalidates_only_changed_methods(evaluation, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(evaluation[0], out)
    pipe = tiny_pipe()
    calls = []
    original = type(pipe).__call__

    def counting(self, *args, **kwargs):
        calls.append(len(args[0]))
        return original(self, *args, **kwargs)

    type(pipe).__call__, saved = counting, original
    try:
        generate(tiny_settings(), parse_methods(METHODS, STEPS), out, pipe=pipe, **QUIET)
        assert calls == []  # everything cached: no pipeline call, not even the warm-up
        generate(tiny_settings(), parse_methods(f"dense:3,cat:0.5:{START},random:0.3:{START}", STEPS), out,
                 pipe=pipe, warmup=False, **QUIET)  # fmt: skip
        assert calls == [2, 1]  # only the new method, in two batches
    finally:
        type(pipe).__call__ = saved
    with pytest.raises(ValueError, match="holds images of other settings"):
        generate(tiny_settings(seed=5), parse_methods("dense", STEPS), out, pipe=pipe, **QUIET)


def test_unavailable_peer_is_skipped_with_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # import cache_dit -> ImportError
    out = tmp_path / "peer"
    generate(tiny_settings(num_prompts=1), parse_methods("dbcache", STEPS), out, pipe=tiny_pipe(), **QUIET)
    _, caches, skipped = load_generation(out)
    assert [c.method.name for c in caches] == [f"dense-{STEPS}"]
    assert "pip install 'catprune[peers]'" in skipped["dbcache-r0.08"]
    score(out, **QUIET)
    rows = write_report(out, **QUIET)["methods"]
    assert rows[-1]["name"] == "dbcache-r0.08" and rows[-1]["status"].startswith("skipped: cache-dit is not")


def test_dbcache_runs_when_cache_dit_is_installed(tmp_path):
    pytest.importorskip("cache_dit", reason="cache-dit (catprune[peers]) is not installed")
    out = tmp_path / "peer"
    method = Method.dbcache(STEPS, threshold=10.0, warmup=2)  # a huge threshold: every step after warm-up cached
    generate(tiny_settings(num_prompts=1), [Method.dense(STEPS, STEPS), method], out, pipe=tiny_pipe(), **QUIET)
    score(out, **QUIET)
    row = {r["name"]: r for r in write_report(out, **QUIET)["methods"]}[method.name]
    assert row["status"] == "ok" and row["macs_estimated"] is True
    assert row["cached_steps_per_generation"] >= 1 and row["macs_ratio"] < 1
    assert math.isfinite(row["psnr"])  # differs from dense


# ------------------------------------------------------------------------------------------------ scoring
def test_scores_reference_and_adherence(evaluation):
    out, _, _ = evaluation
    scores = json.loads((out / "scores.json").read_text())
    assert scores["reference"] == f"dense-{STEPS}"
    ref = scores["methods"][f"dense-{STEPS}"]
    assert ref["per_image"]["psnr"] == [math.inf] * 3 and ref["summary"]["ssim"] == 1.0
    for name, entry in scores["methods"].items():
        summary = entry["summary"]
        assert 0 <= summary["colour_at_cell"] <= 1 and 0 <= summary["shape"] <= 1 and summary["num_objects"] >= 3
        if name != f"dense-{STEPS}":
            assert all(math.isfinite(v) and v > 0 for v in entry["per_image"]["psnr"])
    assert scores["metrics"]["clip_score"]["available"] is False
    lpips = scores["metrics"]["lpips"]
    assert lpips["available"] is False and "torchvision" in lpips["reason"] and "never downloads" in lpips["reason"]
    assert all("lpips" not in entry["per_image"] for entry in scores["methods"].values())


def test_rescoring_reads_only_the_cache(evaluation, monkeypatch):
    out, _, _ = evaluation
    import catprune.models

    def no_loading(*args, **kwargs):
        raise AssertionError("scoring must not load a pipeline")

    monkeypatch.setattr(catprune.models, "load_pipeline", no_loading)
    before = json.loads((out / "scores.json").read_text())
    again = score(out, **QUIET)
    assert json.loads(json.dumps(again)) == before


# ------------------------------------------------------------------------------------------------ report
def test_report_files(evaluation):
    out, _, results = evaluation
    rows = {r["name"]: r for r in results["methods"]}
    assert rows["dense-3"]["macs_ratio"] == pytest.approx(0.5)
    assert rows[f"dense-{STEPS}"]["macs_ratio"] == 1.0 and rows[f"dense-{STEPS}"]["wall_speedup"] == 1.0
    assert 0 < rows[f"cat-a0.5-t{START}"]["macs_ratio"] < 1
    assert json.loads((out / "results.json").read_text())["methods"] == json.loads(json.dumps(results["methods"]))
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == [r["name"] for r in results["methods"]]
    page = (out / "report.html").read_text()
    for rel in ("grids/overview.png", "grids/focus.png"):
        assert (out / rel).is_file() and rel in page
    assert "id='image-status'" in page and "<h2>How CAT compares</h2>" in page
    assert "Acceptance" not in page and "issue" not in page.lower()
    assert "LPIPS is not reported" in page and "lpips" not in table[0]
    if _has_matplotlib():
        for rel in ("plots/pareto_psnr_wall.png", "plots/pareto_adherence_macs.png", "heatmaps/selection_mean.png"):
            assert (out / rel).is_file() and rel in page


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _row(name, group, steps, macs, seconds, psnr_value, selection=None, keep=None, start=None, **extra):
    return dict(name=name, group=group, status="ok", steps=steps, macs_ratio=macs, seconds_per_image=seconds,
                psnr=psnr_value, selection=selection, keep_ratio=keep, start_step=start, **extra)  # fmt: skip


def _synthetic(cat_psnr=30.0, cat_seconds=1.0, ablation_psnr=25.0):
    adh = dict(colour_at_cell=0.9, shape=0.8, adherence=0.85)
    return [
        _row("dense-28", "reference", 28, 1.0, 2.0, None, psnr_identical=10, **adh),
        _row("dense-15", "fewer steps", 15, 15 / 28, 1.1, 28.0),
        _row("dense-14", "fewer steps", 14, 0.5, 1.0, 27.0),
        _row("cat-a0.3-t8", "CAT", 28, 0.51, cat_seconds, cat_psnr, "cat", 0.3, 8,
             colour_at_cell=0.88, shape=0.76, adherence=0.82),  # fmt: skip
        *[_row(f"{s}-a0.3-t8", "ablation", 28, 0.51, 1.0, ablation_psnr, s, 0.3, 8) for s in
          ("random", "magnitude", "staleness")],  # fmt: skip
        _row("ras-a0.3-t8", "baseline", 28, 0.51, 1.0, 29.0, "ras", 0.3, 8, adherence=0.8),
    ]


def test_comparisons_on_synthetic_rows():
    checks = comparisons(_synthetic(), {})
    assert [c["holds"] for c in checks] == [False, True, True, None]  # shape drops 4 points: a miss
    assert "matched dense run dense-15" in checks[1]["detail"]
    assert "ras-a0.3-t8" in checks[3]["detail"]
    slow = comparisons(_synthetic(cat_seconds=1.5), {})[1]
    assert slow["holds"] is False and "wall-clock condition fails" in slow["detail"]
    assert comparisons(_synthetic(cat_psnr=27.5), {})[1]["holds"] is False  # beaten by dense-15
    assert comparisons(_synthetic(ablation_psnr=31.0), {})[2]["holds"] is False
    assert [c["holds"] for c in comparisons([], {})] == [None, None, None, None]
    no_match = comparisons([r for r in _synthetic() if r["name"] != "dense-15"], {})[1]  # dense-14 is cheaper
    assert no_match["status"] == "not evaluated" and "MACs >= CAT's (0.510)" in no_match["detail"]
    assert "dense:15" in no_match["detail"]  # says which run to add: ceil(0.51 * 28) steps
    missing = comparisons([r for r in _synthetic() if r["name"] != "staleness-a0.3-t8"], {})[2]
    assert missing["status"] == "not evaluated" and "missing: staleness" in missing["detail"]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_eval_end_to_end(tmp_path, monkeypatch, capsys):
    import catprune.models
    from catprune.cli.main import main

    monkeypatch.setattr(catprune.models, "load_pipeline", lambda *a, **k: tiny_pipe())
    args = ["eval", "--model", "shapes", "--num-prompts", "2", "--steps", "4", "--methods", "cat:0.5:2",
            "--height", "32", "--width", "32", "--out", str(tmp_path), "--device", "cpu", "--no-warmup"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    folder = tmp_path / "shapes-p2-s4-seed0-32x32"
    assert "cat-a0.5-t2" in text and str(folder / "report.html") in text
    results = json.loads((folder / "results.json").read_text())
    assert results["command"].startswith("catprune eval --model shapes --num-prompts 2 --steps 4 --methods cat:0.5:2")
    # re-score and re-report an existing folder without generating
    assert main(["eval", "--phase", "report", "--folder", str(folder)]) == 0
    assert main(["eval", "--phase", "generate", "--folder", str(folder)]) == 2
    assert "--folder: expected --phase score or --phase report" in capsys.readouterr().err
    assert main(["eval", "--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_cli_list_methods(capsys):
    from catprune.cli.main import main

    assert main(["eval", "--list-methods", "--steps", "28"]) == 0
    text = capsys.readouterr().out
    for name in ("dense-28", "dense-14", "cat-a0.3-t8", "staleness-a0.3-t8", "ras-a0.3-t8", "dbcache-r0.08"):
        assert name in text


# ------------------------------------------------------------------------------------------------ browser
def test_report_images_load_in_headless_chromium(evaluation, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); the report's images are not "
                    "checked in a browser on this machine")  # fmt: skip
    out = tmp_path / "report"
    shutil.copytree(evaluation[0], out)

    def status():
        done = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom",
             (out / "report.html").as_uri()],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=120,
        )
        import re

        match = re.search(r"id=\"image-status\"[^>]*data-loaded=\"(\d+)\" data-total=\"(\d+)\"", done.stdout)
        assert match, done.stdout[-2000:] + done.stderr[-2000:]
        return int(match.group(1)), int(match.group(2))

    loaded, total = status()
    assert total >= 2 and loaded == total
    (out / "grids" / "overview.png").unlink()  # a broken image is detected
    assert status() == (total - 1, total)


# ------------------------------------------------------------------------------------------------ module split
def test_psnr_single_image_is_the_batch_value():
    a = torch.zeros(3, 4, 4)
    b = torch.full((3, 4, 4), 0.1)
    single = psnr(a, b)
    assert single.dim() == 0 and float(single) == pytest.approx(20.0)
    assert float(single) == pytest.approx(psnr(a[None], b[None])[0].item())
    assert math.isinf(float(psnr(a, a)))
    with pytest.raises(ValueError, match=r"same shape \(C, H, W\) or \(B, C, H, W\)"):
        psnr(torch.zeros(4, 4), torch.zeros(4, 4))


def test_environment_and_cuda_sync():
    from catprune.evaluation import cuda_sync, environment

    env = environment("cpu")
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert env["cpu_count"] >= 1 and env["torch_threads"] == torch.get_num_threads()
    assert env["catprune"] is not None and env["diffusers"] is not None and "gpu" not in env
    assert "driver" not in env and "driver" in environment(driver=True)
    if not torch.cuda.is_available():
        assert env["gpus"] == [] and environment(driver=True)["driver"] is None
    json.dumps(env)  # JSON-ready
    assert cuda_sync("cpu") is None


def test_introspection_selections_and_macs():
    from catprune.evaluation.introspect import selection_counts, watch

    pipe = tiny_pipe()
    prompts = tiny_settings().prompts()[:2]
    kwargs = dict(num_inference_steps=STEPS, output_type="pt", height=SIZE, width=SIZE)
    with watch(pipe) as dense:
        pipe(prompts, generator=torch.Generator().manual_seed(0), **kwargs)
        dense_macs = dense.macs()
    assert dense.calls == STEPS and dense.grid == (SIZE // 4, SIZE // 4)
    assert dense.step_selections() == [None] * STEPS and dense_macs == STEPS * dense.dense_macs_per_call

    k = catprune.CATConfig(keep_ratio=0.5).tokens_kept(TOKENS)
    with catprune.applied(pipe, catprune.CATConfig(keep_ratio=0.5, start_step=START)), watch(pipe) as cat:
        pipe(prompts, generator=torch.Generator().manual_seed(0), **kwargs)
        cat_macs, stats = cat.macs(), catprune.stats(pipe)
    selections = cat.step_selections()
    assert selections[:START] == [None] * START
    assert all(s is not None and s.shape[-1] == k for s in selections[START:])
    assert cat_macs == stats.macs < dense_macs and sum(s is not None for s in selections) == stats.pruned_steps
    counts = selection_counts(selections, 2, TOKENS)
    assert counts.shape == (2, TOKENS) and (counts.sum(dim=1) == START * TOKENS + (STEPS - START) * k).all()

    with catprune.applied(pipe, catprune.CATConfig(keep_ratio=1.0, start_step=START)), watch(pipe) as off:
        pipe(prompts, generator=torch.Generator().manual_seed(0), **kwargs)
        off_stats = catprune.stats(pipe)  # pruning off: every call recorded as a dense step
        off_macs = off.macs()
    assert [r.kind for r in off_stats.steps] == ["dense"] * STEPS and off_stats.pruned_steps == 0
    assert off_macs == dense_macs and off.step_selections() == [None] * STEPS
    assert not pipe.transformer._forward_hooks and not pipe.transformer._forward_pre_hooks  # hooks removed


@pytest.mark.parametrize("steps", [8, 20, 28, 50])
def test_quick_matches_cats_cost_at_any_step_count(steps):
    from catprune.evaluation.methods import estimated_macs_ratio, matched_steps, quick_methods

    methods = quick_methods(steps)
    cat = next(m for m in methods if m.group == "CAT")
    ratio = estimated_macs_ratio(steps, cat.config.keep_ratio, cat.config.start_step)
    best = matched_steps(steps, cat.config.keep_ratio, cat.config.start_step)
    assert all(abs(best / steps - ratio) <= abs(s / steps - ratio) for s in range(1, steps))
    fewer = sorted(m.steps for m in methods if m.group == "fewer steps")
    assert fewer == [best, best + 1]  # the closest and the next costlier one
    selections = {m.config.selection.value for m in methods if m.config is not None}
    assert selections == {"cat", "random", "magnitude", "staleness", "ras"}
    assert {m.config.start_step for m in methods if m.config is not None} == {cat.config.start_step}
    names = {m.name for m in default_methods(steps)}
    assert {f"dense-{best}", f"dense-{best + 1}"} <= names


def test_quick_at_six_steps_evaluates_every_comparison(tmp_path):
    out = tmp_path / "quick"
    lines = []
    generate(tiny_settings(num_prompts=2), parse_methods("quick", STEPS), out, pipe=tiny_pipe(), warmup=False,
             log=lines.append)  # fmt: skip
    score(out, log=lines.append)
    results = write_report(out, log=lines.append)
    statuses = [c["status"] for c in results["comparisons"]]
    assert "not evaluated" not in statuses and statuses[3] == "reported", results["comparisons"]
    rows = {r["name"]: r for r in results["methods"]}
    cat = next(r for r in rows.values() if r["group"] == "CAT")
    match = results["comparisons"][1]["detail"].split("matched dense run ")[1].split(":")[0]
    assert rows[match]["group"] == "fewer steps" and rows[match]["macs_ratio"] >= cat["macs_ratio"]
    (title,) = [t for t in results["figures"]["grids"] if t != "all methods (columns), same seeds (rows)"]
    assert f"matched fewer steps ({match})" in title
    # progress for every phase: generation per method, scoring per method, figures, report
    methods = list(rows)
    for name in methods:
        assert any(line.startswith("[eval] generate") and f" {name} images" in line for line in lines), name
        assert any(line.startswith("[eval] score") and f" {name}" in line for line in lines), name
    for phase in ("image grids", "Pareto plots" if _has_matplotlib() else "image grids", "report.html"):
        assert any(line.startswith("[eval] report:") and phase in line for line in lines), phase


def test_warm_up_reports_progress_for_every_method(tmp_path):
    lines = []
    generate(tiny_settings(num_prompts=1), parse_methods(f"dense:3,cat:0.5:{START}", STEPS), tmp_path / "w",
             pipe=tiny_pipe(), log=lines.append)  # fmt: skip
    warm = [line for line in lines if line.startswith("[eval] warm-up")]
    assert len(warm) == 6  # start and end line for each of the three methods
    for i, name in enumerate([f"dense-{STEPS}", "dense-3", f"cat-a0.5-t{START}"], start=1):
        assert f"[eval] warm-up {i}/3 {name}: one untimed image ..." in warm
        assert any(line.startswith(f"[eval] warm-up {i}/3 {name}: done in ") for line in warm)
    assert lines.index(warm[-1]) < next(i for i, line in enumerate(lines) if line.startswith("[eval] generate"))


def test_report_macs_ratios_have_three_decimals_and_grid_labels_are_large(evaluation):
    import re

    from catprune.evaluation.figures import LABEL_FONT_PX, label_strip

    out, _, results = evaluation
    page = (out / "report.html").read_text()
    header = re.search(r"<h2>Results</h2>.*?</tr>", page, re.S).group(0)
    column = re.findall(r"<th[^>]*>([^<]*)</th>", header).index("MACs ratio")
    table = page.split("<h2>Results</h2>")[1].split("</table>")[0]
    cells = [re.findall(r"<td[^>]*>([^<]*)</td>", row)[column] for row in table.split("<tr")[2:]]
    assert cells and all(re.fullmatch(r"\d\.\d{3}( \(est\.\))?", c) for c in cells), cells
    for entry in results["comparisons"]:
        for value in re.findall(r"MACs ratio (\d+\.\d+)", entry["detail"]):
            assert len(value.split(".")[1]) == 3
    strip = label_strip(["no_clustering-a0.3-t8"], cell=132)
    ink = np.nonzero((np.asarray(strip.convert("L")) < 128).any(axis=1))[0]
    assert LABEL_FONT_PX >= 14 and ink.max() - ink.min() >= 2 * 10  # two lines of large text


def test_model_registry_plugs_loader_prompts_and_adherence(tmp_path, monkeypatch):
    from catprune.evaluation import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    loaded = []

    def load(model, device, dtype):
        loaded.append((model, device, dtype))
        return tiny_pipe()

    def hits(images, prompts):
        per_image = [float(i % 2) for i in range(len(prompts))]
        return {"summary": {"hits": sum(per_image) / len(per_image)}, "per_image": {"hits": per_image}}

    captions = [f"a large red circle at the {cell}" for cell in ("center", "top", "left", "right")]

    def prompts(n, seed):
        return [captions[(seed + i) % 4] for i in range(n)]

    registry.register(registry.EvalModel("toy", load=load, prompts=prompts, adherence=hits, adherence_keys=("hits",)))
    with pytest.raises(ValueError, match="registered already"):
        registry.register(registry.EvalModel("toy"))
    settings = tiny_settings(model="toy", num_prompts=2, prompt_seed=5)
    assert settings.prompts() == [captions[1], captions[2]]
    assert settings.folder_name().startswith("toy-p2")
    out = tmp_path / "toy"
    generate(settings, parse_methods(f"cat:0.5:{START}", STEPS), out, warmup=False, **QUIET)
    assert loaded == [("toy", "cpu", torch.float32)]
    scores = score(out, **QUIET)
    assert scores["adherence_keys"] == ["hits"] and scores["metrics"]["clip_score"]["available"] is False
    assert scores["methods"][f"dense-{STEPS}"]["per_image"]["hits"] == [0.0, 1.0]
    adherence = write_report(out, **QUIET)["comparisons"][0]
    assert adherence["status"] == "holds" and "hits: dense 50.0%, CAT 50.0%" in adherence["detail"]

    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ShapesPipeline"}))
    assert registry.resolve(str(folder)).name == "shapes" and registry.resolve("org/model").adherence is None
    with pytest.raises(ValueError, match="has no held-out prompt set.*--prompts FILE"):
        EvalSettings(model="org/model").prompts()


def test_cli_model_flag_and_quick_list(capsys, tmp_path):
    from catprune.cli.eval_cmd import build_parser
    from catprune.cli.main import main
    from catprune.evaluation.settings import EvalSettings

    assert build_parser().parse_args([]).model == "scenes" and EvalSettings().model == "scenes"  # the default
    text = " ".join(build_parser().format_help().split())
    assert "scenes, the default" in text and "shapes, the fast alternative" in text and "(default: scenes)" in text
    assert "30000 for scenes, 20000 for shapes" in text
    assert EvalSettings(num_prompts=3).prompts() == EvalSettings(model="scenes", num_prompts=3).prompts()
    assert main(["eval", "--list-methods", "--methods", "quick", "--steps", "20"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == ["dense-20", "dense-13", "dense-12", "cat-a0.3-t8", "random-a0.3-t8", "magnitude-a0.3-t8",
                      "staleness-a0.3-t8", "ras-a0.3-t8"]  # fmt: skip
    assert main(["eval", "--model", "org/model", "--out", str(tmp_path), "--methods", "dense"]) == 2
    assert "--prompts FILE" in capsys.readouterr().err


def test_scenes_is_registered_with_its_held_out_set_and_identity_scorer():
    from catprune.evaluation import adherence, identity
    from catprune.evaluation.registry import resolve, scenes_identity
    from catprune.evaluation.settings import EvalSettings
    from catprune.models.scenes import render_captions

    assert resolve("shapes").held_out_seed == adherence.HELD_OUT_CAPTION_SEED
    entry = resolve("scenes")
    assert entry.held_out_seed == identity.HELD_OUT_CAPTION_SEED and entry.adherence_keys == ("identity_top1",)
    assert EvalSettings(model="scenes", num_prompts=200).prompts() == identity.held_out_captions()  # the default
    prompts = EvalSettings(model="scenes", num_prompts=5).prompts()
    assert EvalSettings(model="scenes", num_prompts=5, prompt_seed=7).prompts() != prompts
    truth = render_captions(prompts, seed=0)
    scores = scenes_identity(truth, prompts)
    assert scores["summary"]["identity_top1"] == 1.0 and scores["per_image"]["identity_top1"] == [1.0] * 5
    wrong = scenes_identity(truth, prompts[1:] + prompts[:1])  # captions of other images
    assert wrong["summary"]["identity_top1"] < 0.5


# ------------------------------------------------------------------------------------------------ modelled GPU time
def test_time_model_flag_parses_and_names_itself_in_errors(capsys):
    from catprune.cli.main import main
    from catprune.evaluation.gpu_time import TimeStandIn

    stand_in = TimeStandIn.parse("sd3-medium:cudagraph:512x512")
    fields = (stand_in.preset, stand_in.backend, stand_in.height, stand_in.width)
    assert fields == ("sd3-medium", "cudagraph", 512, 512)
    assert str(stand_in) == "sd3-medium:cudagraph:512x512" and TimeStandIn.parse(str(stand_in)) == stand_in
    for bad, message in [
        ("nosuch", "expected a model with step times on cuda with backend compile+cudagraph, got 'nosuch'"),
        ("sd3-medium:fast", "expected a backend among eager, compile, cudagraph, compile+cudagraph, got 'fast'"),
        ("sd3-medium:cudagraph:big", "expected the size as HEIGHTxWIDTH"),
        ("", "expected PRESET[:BACKEND[:HEIGHTxWIDTH]]"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            TimeStandIn.parse(bad, who="--time-model")
        with pytest.raises(SystemExit) as exit_:
            main(["eval", "--list-methods", "--time-model", bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2
        assert "argument --time-model: " + message in err and "Traceback" not in err


def test_equal_time_comparison_on_synthetic_rows():
    from catprune.evaluation.gpu_time import dense_psnr_at, equal_time_entry

    rows = [dict(r, gpu_time_ratio=r["macs_ratio"]) for r in _synthetic() if r["group"] != "reference"]
    rows = [dict(r, gpu_speedup=1 / r["gpu_time_ratio"]) for r in rows]
    assert dense_psnr_at(rows, 0.51) == pytest.approx(27.0 + (0.51 - 0.5) / (15 / 28 - 0.5))
    assert dense_psnr_at(rows, 0.6) is None  # outside the measured dense runs
    entry = equal_time_entry(rows, "m", lambda a, b: f"ci {a} {b}")
    assert entry["status"] == "reported" and entry["detail"].startswith("cat-a0.3-t8: 30.00 dB at 1.96x")
    assert "ras-a0.3-t8: 29.00 dB" in entry["detail"]  # second best; the ablations (25 dB) third
    best = "cat-a0.3-t8 against dense-15 (1.87x, at least as slow): +2.00 dB, ci cat-a0.3-t8 dense-15"
    assert best in entry["detail"]
    assert equal_time_entry(rows[:2], "m", None)["status"] == "not evaluated"


def test_report_with_a_time_model(evaluation, tmp_path):
    from catprune.evaluation.gpu_time import TimeStandIn

    out, _, _ = evaluation
    copy = tmp_path / out.name
    shutil.copytree(out, copy)
    results = write_report(copy, time_model=TimeStandIn.parse("sd3-medium"), **QUIET)
    rows = {r["name"]: r for r in results["methods"]}
    assert rows[f"dense-{STEPS}"]["gpu_speedup"] == 1.0 and rows["dense-3"]["gpu_speedup"] == pytest.approx(2.0)
    cat = rows[f"cat-a0.5-t{START}"]
    config = catprune.CATConfig(keep_ratio=0.5, start_step=START)
    expected = catprune.planner.estimate_as("sd3-medium", config, STEPS, STEPS,
                                            macs_ratio=cat["macs_ratio"])  # fmt: skip
    assert cat["gpu_time_ratio"] == pytest.approx(expected.time_ratio)
    assert cat["macs_ratio"] < cat["gpu_time_ratio"] < 1  # a pruned step realises less than its MACs ratio
    assert results["time_model"] == "sd3-medium step times (compile+cudagraph, 1024x1024)"
    assert "at equal modelled GPU time" in results["comparisons"][-1]["criterion"]
    page = (copy / "report.html").read_text()
    assert "modelled GPU speed-up" in page
    if _has_matplotlib():
        assert (copy / "plots" / "pareto_psnr_gpu.png").is_file()


def test_printed_table_shows_the_models_own_scores_and_the_gpu_column_only_when_there():
    from catprune.cli.eval_cmd import _table

    long = "no_clustering-a0.55-t7-526f68-s18"
    rows = [_row("dense-28", "reference", 28, 1.0, 2.0, None, psnr_identical=4, identity_top1=0.99),
            _row(long, "ablation", 18, 0.503, 1.0, 31.65, identity_top1=0.987, ssim=0.98)]  # fmt: skip
    text = _table({"methods": rows, "comparisons": []})
    head, first, second = text.splitlines()
    assert "identity" in head and "col@cell" not in head and "gpu x" not in head
    assert second.startswith(long + " ablation") and second.endswith("0.987") and "31.65" in second
    assert len(head) == len(first) == len(second)  # aligned however long the names
    with_gpu = _table({"methods": [dict(r, gpu_speedup=1.9) for r in rows], "comparisons": []})
    assert "gpu x" in with_gpu.splitlines()[0] and "1.90" in with_gpu.splitlines()[2]
