"""catprune.plan: a configuration for a requested speed-up, from measured step times and measured quality."""

import dataclasses
import json
import warnings

import pytest
import torch

import catprune
from catprune import CATConfig
from catprune.families import FAMILIES, load
from catprune.planner import Plan, Tables, shipped_tables
from catprune.planner.costs import TimeModel
from catprune.planner.tables import StepTimeRow


@pytest.fixture(scope="module")
def shapes_pipe():
    from catprune.models.shapes import build_random_shapes_pipeline

    return build_random_shapes_pipeline(seed=0)


def _quality(steps, psnr, config=None, reference=10):
    return {
        "model": "shapes",
        "reference_steps": reference,
        "steps": steps,
        "config": config,
        "psnr_db": psnr,
        "source": "test",
    }


# ---------------------------------------------------------------- every family
@pytest.mark.parametrize("record", FAMILIES, ids=lambda r: r.name)
@pytest.mark.parametrize("speedup", [1.5, 2.0, 3.0])
def test_valid_plan_for_every_family(record, speedup):
    model = load(record.tiny)().transformer()
    plan = catprune.plan(model, speedup, num_inference_steps=28)
    assert isinstance(plan, Plan) and plan.family == record.name
    assert plan.predicted_speedup >= speedup * (1 - 1e-9)
    assert 1 <= plan.num_inference_steps <= 28 and 0 < plan.macs_ratio < 1
    assert plan.config is None or isinstance(plan.config, CATConfig)
    assert plan.reason and plan.pipeline_kwargs() == {"num_inference_steps": plan.num_inference_steps}
    if plan.config is None:  # plain fewer steps: the step count carries the whole speed-up
        assert plan.num_inference_steps < 28
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.num_inference_steps = 3


def test_shapes_pipeline_plan_follows_the_measured_rows(shapes_pipe):
    plan = catprune.plan(shapes_pipe, 2.0, num_inference_steps=28)
    # docs/quality_per_cost.md, shapes 200-prompt grid: on a CPU (cost = MACs) 20 steps with the forecast and the
    # drift rule at keep 0.5 / start 6 (43.02 dB, MACs 0.470; 42.64 with CAT's rule) is the best measured row
    # reaching 2x; dense-14 has 40.84 dB
    assert plan.model == "shapes" and plan.num_inference_steps == 20 and plan.config is not None
    c = plan.config
    assert (c.keep_ratio, c.start_step, c.context.value, c.final_dense_steps) == (0.5, 6, "extrapolate", 0)
    assert c.selection.value == "drift"
    assert plan.expected_quality.psnr_db == pytest.approx(43.02) and "shapes-drift" in plan.expected_quality.source
    assert "20 steps" in plan.summary() and "context='extrapolate'" in plan.summary() and "43.02 dB" in plan.summary()
    measured = [r for r in shipped_tables().quality if r.model == "shapes" and r.macs_ratio <= 0.5]
    assert plan.expected_quality.psnr_db == max(r.quality.psnr_db for r in measured)  # nothing better was skipped


def test_measured_step_times_are_used_on_the_gpu_rows(shapes_pipe):
    # on the H200 the shapes model's pruned step is slower than its dense step: CAT cannot reach 1.2x there
    plan = catprune.plan(shapes_pipe, 1.2, num_inference_steps=28, device="cuda", backend="cudagraph")
    assert plan.config is None and "measured step times of shapes" in plan.time_source
    cpu = catprune.plan(shapes_pipe, 1.2, num_inference_steps=28, device="cpu")
    assert "analytic MACs" in cpu.time_source


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [1.0, 0.5, -2, float("nan"), float("inf")])
def test_rejects_speedup_at_most_one_or_not_finite(bad):
    with pytest.raises(ValueError, match=r"catprune.plan: speedup: expected a finite number > 1.*got.*speedup=2.0"):
        catprune.plan(load(FAMILIES[0].tiny)().transformer(), bad)


def test_rejects_non_numbers_and_bad_steps():
    model = load(FAMILIES[0].tiny)().transformer()
    with pytest.raises(TypeError, match="speedup: expected a number"):
        catprune.plan(model, "2")
    with pytest.raises(TypeError, match="speedup"):
        catprune.plan(model, True)
    with pytest.raises(ValueError, match="num_inference_steps: expected an int >= 2"):
        catprune.plan(model, 2.0, num_inference_steps=1)
    with pytest.raises(TypeError, match="pipe_or_transformer"):
        catprune.plan(object(), 2.0)
    with pytest.raises(ValueError, match="backend: expected"):
        catprune.plan(model, 2.0, backend="fast")


def test_unreachable_speedup_says_what_is_reachable(shapes_pipe):
    with pytest.raises(ValueError, match=r"speedup: expected at most (\d+\.\d+)x for shapes at 28 steps.*got 50") as e:
        catprune.plan(shapes_pipe, 50.0, num_inference_steps=28)
    reachable = float(e.value.args[0].split("at most ")[1].split("x")[0])
    assert catprune.plan(shapes_pipe, reachable * 0.999, num_inference_steps=28).predicted_speedup >= reachable * 0.999


# ---------------------------------------------------------------- injected tables
def test_fewer_steps_win_when_the_table_says_so(shapes_pipe):
    tables = Tables.from_dict(
        {"quality": [_quality(5, 40.0), _quality(10, 30.0, {"keep_ratio": 0.3, "start_step": 2})]}
    )
    plan = catprune.plan(shapes_pipe, 2.0, num_inference_steps=10, tables=tables)
    assert plan.config is None and plan.num_inference_steps == 5 and plan.expected_quality.psnr_db == 40.0
    assert "best measured quality" in plan.reason


def test_cat_wins_when_a_row_says_so(shapes_pipe):
    cat = {"keep_ratio": 0.3, "start_step": 2}
    tables = Tables.from_dict({"quality": [_quality(5, 30.0), _quality(10, 40.0, cat)]})
    plan = catprune.plan(shapes_pipe, 2.0, num_inference_steps=10, tables=tables)
    assert plan.config == CATConfig(**cat) and plan.num_inference_steps == 10
    assert plan.expected_quality.psnr_db == 40.0 and plan.predicted_speedup >= 2.0


def test_measured_step_times_can_make_cat_unreachable(shapes_pipe):
    # a row saying a pruned step costs as much as a dense one: only fewer steps reach 2x
    row = {
        "model": "shapes",
        "device": "cpu",
        "backend": "eager",
        "height": 128,
        "width": 128,
        "keep_ratio": 0.3,
        "dense_ms": 10.0,
        "pruned_ms": 10.0,
        "pruned_macs_ratio": 0.35,
        "source": "test",
    }
    tables = Tables.from_dict(
        {"step_times": [row], "quality": [_quality(10, 40.0, {"keep_ratio": 0.3, "start_step": 2})]}
    )
    plan = catprune.plan(shapes_pipe, 2.0, num_inference_steps=10, tables=tables, device="cpu")
    assert plan.config is None and plan.num_inference_steps == 5 and "test" in plan.time_source


def test_rows_with_unknown_fields_are_skipped_with_a_warning():
    data = {"quality": [_quality(10, 40.0, {"keep_ratio": 0.3, "not_a_field_yet": 2}), _quality(5, 30.0)]}
    with pytest.warns(UserWarning, match="no field.*not_a_field_yet.*skipped"):
        tables = Tables.from_dict(data)
    assert len(tables.quality) == 1 and tables.quality[0].config is None


def test_bad_rows_name_the_row_and_key():
    with pytest.raises(ValueError, match=r"step_times\[0\]: dense_ms: expected a positive finite number"):
        Tables.from_dict(
            {
                "step_times": [
                    {
                        "model": "x",
                        "device": "cuda",
                        "backend": "eager",
                        "height": 1,
                        "width": 1,
                        "keep_ratio": 0.3,
                        "dense_ms": -1,
                        "pruned_ms": 1,
                        "pruned_macs_ratio": 0.3,
                    }
                ]
            }
        )


def test_shipped_tables_parse_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tables = Tables.load()
    assert {"sd3-medium", "flux-dev", "pixart-sigma-1024", "shapes"} <= {r.model for r in tables.step_times}
    assert len([r for r in tables.quality if r.model == "shapes"]) >= 15
    assert shipped_tables() is shipped_tables()
    json.loads(json.dumps([r.quality.psnr_db for r in tables.quality]))  # plain numbers


def test_time_model_interpolates_in_macs_and_keeps_the_overhead_outside():
    def row(m, t):
        return StepTimeRow("x", "cuda", "eager", 8, 8, 1, 0.3, 10.0, 10.0 * t, m, "test")

    one = TimeModel((row(0.4, 0.5),))
    assert one.step_ratio(0.2) == pytest.approx(0.3) and one.step_ratio(1.0) == 1.0
    two = TimeModel((row(0.2, 0.4), row(0.6, 0.7)))
    assert two.step_ratio(0.4) == pytest.approx(0.55) and two.step_ratio(0.8) == pytest.approx(0.9)
    assert TimeModel().step_ratio(0.37) == 0.37 and not TimeModel().measured


# ---------------------------------------------------------------- apply
def test_apply_a_plan_and_remove_it():
    model = load(FAMILIES[2].tiny)().transformer()  # flux: CAT reaches 2x on the tiny model
    plan = catprune.plan(model, 2.0, num_inference_steps=28)
    assert plan.config is not None
    assert catprune.apply(model, plan) is model and catprune.get_config(model) == plan.config
    catprune.remove(model)
    assert not catprune.is_applied(model)


def test_apply_a_fewer_steps_plan_leaves_the_model_dense_and_warns():
    model = load(FAMILIES[0].tiny)().transformer()
    catprune.apply(model, CATConfig(keep_ratio=0.5))
    tables = Tables.from_dict({})
    plan = catprune.plan(model, 3.9, num_inference_steps=8, tables=tables)
    assert plan.config is None
    with pytest.warns(UserWarning, match=r"plain fewer steps.*pipeline_kwargs"):
        catprune.apply(model, plan)
    assert not catprune.is_applied(model)


def test_planned_config_generates(shapes_pipe):
    tables = Tables.from_dict({"quality": [_quality(6, 40.0, {"keep_ratio": 0.5, "start_step": 2}, reference=6)]})
    plan = catprune.plan(shapes_pipe, 1.3, num_inference_steps=6, tables=tables)
    catprune.apply(shapes_pipe, plan)
    try:
        out = shapes_pipe(
            "a red circle", generator=torch.Generator().manual_seed(0), output_type="pt", **plan.pipeline_kwargs()
        ).images
        assert torch.isfinite(out).all() and catprune.stats(shapes_pipe).pruned_steps == 4
    finally:
        catprune.remove(shapes_pipe)


# ---------------------------------------------------------------- CLI
def test_cli_speedup_prints_its_choice(tmp_path, capsys):
    from catprune.cli.main import main

    args = ["generate", "a red circle", "--model", "shapes", "--speedup", "2", "--steps", "4"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "nothing will be pruned" not in captured.err  # the default --start-step is not what runs
    assert "plan for 2x" in out and "2 steps" in out and "why:" in out and (tmp_path / "a.png").is_file()


def test_cli_speedup_refuses_explicit_config_flags(tmp_path, capsys):
    from catprune.cli.main import main

    args = ["generate", "x", "--speedup", "2", "--keep-ratio", "0.5", "--out", str(tmp_path / "a.png")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--speedup: chooses the steps" in err and "--keep-ratio" in err and not (tmp_path / "a.png").exists()
    args = ["generate", "x", "--model", "shapes", "--speedup", "1", "--steps", "4"]
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 2
    assert "speedup: expected a finite number > 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "preset, measured_loop, measured_macs",
    [("sd3-medium", 1.83, 1.861), ("flux-dev", 1.74, 1.80), ("pixart-sigma-1024", 1.82, 1.985)],
)
def test_time_model_reproduces_the_measured_bench_case(preset, measured_loop, measured_macs):
    """Full-size configs on the meta device (no memory): the prediction for the benchmarked case (keep 0.3, start 8,
    28 steps, cudagraph, 1024 px) matches docs/bench/*.json."""
    import diffusers

    from catprune.models import model_configs
    from catprune.planner.choose import CostModel
    from catprune.planner.costs import MacsModel, family_of, model_key, select_rows, text_tokens, token_grid

    entry = model_configs()[preset]
    with torch.device("meta"):
        model = getattr(diffusers, entry["class"])(**entry["config"])
    family, key = family_of(model), model_key(model)
    grid, size = token_grid(model, None, family, key, None, None)
    assert key == preset and size == (1024, 1024)
    time = TimeModel(select_rows(shipped_tables().step_times, key, "cuda", "cudagraph", size))
    costs = CostModel(28, MacsModel(model, grid, text_tokens(family, key)), time)
    macs, seconds = costs.cost(28, CATConfig(keep_ratio=0.3, start_step=8))
    assert 1 / macs == pytest.approx(measured_macs, rel=0.01)
    assert 1 / seconds == pytest.approx(measured_loop, rel=0.015)


@pytest.mark.parametrize(
    "steps, config, measured_loop",
    [
        (28, dict(keep_ratio=0.3, start_step=8), 1.84),
        (17, dict(keep_ratio=0.55, start_step=6, final_dense_steps=2), 1.24),
        (17, dict(keep_ratio=0.55, start_step=6, final_dense_steps=2, context="extrapolate"), 1.23),
        (20, dict(keep_ratio=0.55, start_step=6, final_dense_steps=2), 1.27),
        (17, dict(keep_ratio=0.45, start_step=7, final_dense_steps=3, context="extrapolate"), 1.20),
        (28, dict(keep_ratio=0.3, start_step=8, context="extrapolate", selection="drift"), 1.71),
    ],
)
def test_time_model_charges_the_measured_capture_steps(steps, config, measured_loop):
    """compile+cudagraph on SD3-medium (docs/bench/2026-12-03-h200-sd3-medium-modulation-rows.json for keep 0.3;
    docs/bench/2026-12-03-h200-sd3-medium-k055-t6-forecast-skip.json, …-k055-t6-forecast-full-shortcut.json and
    …-k045-t7-fd3-forecast.json, …-k03-t8-forecast-drift.json for the rest): the capture is a full-selection step
    in both contexts, 1.0-1.1 dense steps (the forecast's K0 roll and the reuse capture differ by less than the
    stock step's run-to-run spread of about 1 ms), and with the forecast the reference step before it is one too;
    the predictions match the measured loops within 2%."""
    import diffusers

    from catprune.models import model_configs
    from catprune.planner.choose import CostModel
    from catprune.planner.costs import MacsModel, family_of, model_key, select_rows, text_tokens, token_grid

    entry = model_configs()["sd3-medium"]
    with torch.device("meta"):
        model = getattr(diffusers, entry["class"])(**entry["config"])
    family, key = family_of(model), model_key(model)
    grid, size = token_grid(model, None, family, key, None, None)
    time = TimeModel(select_rows(shipped_tables().step_times, key, "cuda", "compile+cudagraph", size))
    assert all(1.1 > time.for_context(c).capture_ratio() > 1.0 for c in ("extrapolate", "reuse"))
    costs = CostModel(steps, MacsModel(model, grid, text_tokens(family, key)), time)
    _, seconds = costs.cost(steps, CATConfig(**config))
    assert 1 / seconds == pytest.approx(measured_loop, rel=0.02)


def test_embedded_models_are_identified_by_architecture():
    from catprune.models.scenes import build_random_scenes_pipeline

    pipe = build_random_scenes_pipeline(seed=0)
    assert catprune.plan(pipe, 2.0).model == "scenes"
    assert catprune.plan(pipe.transformer, 2.0).model == "scenes"  # by config, without the pipeline


def test_step_cache_rows_are_candidates_only_where_they_apply_and_were_measured():
    from catprune.models.testing import tiny_flux_transformer
    from catprune.planner.choose import CostModel, candidates, choose
    from catprune.planner.costs import MacsModel

    data = {
        "quality": [
            {**_quality(10, 45.0), "step_cache": {"kind": "fbcache", "threshold": 0.1}, "macs_ratio": 0.5},
            {**_quality(10, 44.0), "step_cache": {"kind": "fbcache", "threshold": 0.2}},  # no measured cost: never
        ]
    }
    rows = list(Tables.from_dict(data).quality)
    costs = CostModel(10, MacsModel(tiny_flux_transformer(), (4, 4), 5), TimeModel())
    cached = [c for c in candidates(costs, rows, "eager", lambda spec: True) if c.step_cache is not None]
    assert [dict(c.step_cache)["threshold"] for c in cached] == [0.1] and cached[0].speedup == pytest.approx(2.0)
    best, why = choose([c for c in candidates(costs, rows, "eager", lambda spec: True) if c.speedup >= 2.0], 10, "x")
    assert best.step_cache == cached[0].step_cache and "45.00 dB" in why
    assert not [c for c in candidates(costs, rows, "eager", lambda spec: False) if c.step_cache is not None]


def _step_row(pruned_ms, context=None):
    row = {"model": "shapes", "device": "cpu", "backend": "eager", "height": 128, "width": 128, "keep_ratio": 0.3,
           "dense_ms": 10.0, "pruned_ms": pruned_ms, "pruned_macs_ratio": 0.35, "source": f"test {context}"}  # fmt: skip
    return row if context is None else {**row, "context": context}


def test_step_times_are_taken_from_the_rows_of_the_configs_context(shapes_pipe):
    """Rows without a context are the paper's reuse (they predate the forecast); a config is timed with the rows
    of its own context when there are any, and the source says when another context's times stand in."""
    reuse_only = Tables.from_dict({"step_times": [_step_row(5.0)]})
    assert reuse_only.step_times[0].context == "reuse"
    both = Tables.from_dict({"step_times": [_step_row(5.0), _step_row(8.0, "extrapolate")]})
    x = CATConfig(keep_ratio=0.3, start_step=2, context="extrapolate")
    r = CATConfig(keep_ratio=0.3, start_step=2, context="reuse")
    kwargs = dict(device="cpu", backend="eager")
    e_x = catprune.planner.estimate(shapes_pipe, x, 10, 10, tables=both, **kwargs)
    e_r = catprune.planner.estimate(shapes_pipe, r, 10, 10, tables=both, **kwargs)
    assert e_x.time_ratio - e_r.time_ratio == pytest.approx(8 * (0.8 - 0.5) / 10)  # each row's own overhead
    assert e_x.macs_ratio == e_r.macs_ratio and "not timed" not in e_x.time_source
    fallback = catprune.planner.estimate(shapes_pipe, x, 10, 10, tables=reuse_only, **kwargs)
    assert fallback.time_ratio == pytest.approx(e_r.time_ratio)
    assert "pruned steps of context 'extrapolate' not timed" in fallback.time_source
    forecast_only = Tables.from_dict({"step_times": [_step_row(8.0, "extrapolate")]})
    plan = catprune.plan(shapes_pipe, 1.5, num_inference_steps=10, tables=forecast_only, **kwargs)
    assert plan.config is not None and plan.config.context.value == "reuse"  # the default context
    assert "pruned steps of context 'reuse' not timed" in plan.time_source


def test_estimate_matches_the_plan_and_takes_a_measured_macs_ratio(shapes_pipe):
    plan = catprune.plan(shapes_pipe, 2.0, num_inference_steps=28)  # a measured row: its MACs ratio is measured
    e = catprune.planner.estimate(shapes_pipe, plan.config, plan.num_inference_steps, 28, macs_ratio=plan.macs_ratio)
    assert e.macs_ratio == pytest.approx(plan.macs_ratio) and e.speedup == pytest.approx(plan.predicted_speedup)
    analytic = catprune.planner.estimate(shapes_pipe, plan.config, plan.num_inference_steps, 28)
    assert analytic.macs_ratio == pytest.approx(plan.macs_ratio, abs=1e-4)  # the row's ratio is rounded to 4 places
    config = CATConfig(keep_ratio=0.3, start_step=8)
    measured = catprune.planner.estimate(shapes_pipe, config, 20, 28, macs_ratio=0.4, device="cpu")
    assert measured.macs_ratio == pytest.approx(0.4) and measured.config.backend.value == "eager"
    assert catprune.planner.estimate(shapes_pipe, None, 14, 28).macs_ratio == pytest.approx(0.5)


def test_a_dense_step_count_between_two_measured_ones_competes_with_interpolated_quality(shapes_pipe):
    """Between measured dense-6 (20 dB) and dense-8 (26 dB) dense-7 is taken as 23 dB: at 10 / 7 = 1.43x it beats a
    measured CAT row of 22 dB, which without the interpolation would have been the only candidate above dense-6."""
    cat = {"keep_ratio": 0.3, "start_step": 2}
    tables = Tables.from_dict({"quality": [_quality(6, 20.0), _quality(8, 26.0), _quality(10, 22.0, cat)]})
    plan = catprune.plan(shapes_pipe, 1.4, num_inference_steps=10, tables=tables, device="cpu")
    assert plan.config is None and plan.num_inference_steps == 7
    assert plan.expected_quality.psnr_db == pytest.approx(23.0)
    assert "interpolated between the measured dense-6 and dense-8 rows" in plan.expected_quality.source
    assert "best interpolated quality" in plan.reason
    twice = Tables.from_dict({"quality": [_quality(6, 20.0), _quality(6, 20.5), _quality(8, 26.0)]})  # two dense-6
    assert catprune.plan(shapes_pipe, 1.4, num_inference_steps=10, tables=twice, device="cpu").num_inference_steps == 7
    worse = Tables.from_dict({"quality": [_quality(6, 20.0), _quality(8, 21.0), _quality(10, 22.0, cat)]})
    plan = catprune.plan(shapes_pipe, 1.4, num_inference_steps=10, tables=worse, device="cpu")
    assert plan.config is not None and plan.expected_quality.psnr_db == pytest.approx(22.0)  # measured CAT wins


def test_estimate_as_charges_another_models_step_times(shapes_pipe):
    """A run of one model (its measured MACs ratio) timed at another model's step times: by hand from one row, and
    equal to the planner's own estimate for that model where both apply."""
    row = {**_step_row(5.0), "model": "big", "device": "cuda", "backend": "compile+cudagraph", "capture_ms": 11.0}
    tables = Tables.from_dict({"step_times": [row]})
    kwargs = dict(height=128, width=128, tables=tables)
    config = CATConfig(keep_ratio=0.3, start_step=8)
    e = catprune.planner.estimate_as("big", config, 28, 28, macs_ratio=(8 + 20 * 0.35) / 28, **kwargs)
    assert e.time_ratio == pytest.approx((8 + 0.1 + 20 * 0.5) / 28)  # capture 1.1 dense steps, pruned 0.5
    assert e.macs_ratio == pytest.approx(15 / 28) and "measured step times of big" in e.time_source
    assert catprune.planner.estimate_as("big", None, 14, 28, **kwargs).time_ratio == 0.5
    with pytest.raises(ValueError, match="macs_ratio: expected the run's measured MACs ratio"):
        catprune.planner.estimate_as("big", config, 28, 28, **kwargs)
    with pytest.raises(ValueError, match=r"preset: expected a model with step times .* got 'small'.*big \(cuda"):
        catprune.planner.estimate_as("small", None, 14, 28, **kwargs)
    shapes = catprune.planner.estimate(shapes_pipe, config, 20, 28, device="cuda", backend="cudagraph")
    same = catprune.planner.estimate_as(
        "shapes", config, 20, 28, macs_ratio=shapes.macs_ratio, height=128, width=128, backend="cudagraph"
    )
    assert same.time_ratio == pytest.approx(shapes.time_ratio) and same.time_source == shapes.time_source
