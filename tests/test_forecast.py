"""Context forecast (``Context.EXTRAPOLATE``), keep-ratio schedules and refresh steps: the equivalence contract over
every model family (tiny random models, CPU, fp32), the exact MACs accounting, and the config errors."""

import inspect
from types import SimpleNamespace

import pytest
import torch

import catprune
from catprune import Backend, CATConfig, Context
from catprune.adapters import adapter_for
from catprune.runtime import PipelineProbe, StepRunner

STEPS = 6
X = dict(context="extrapolate")


def test_pruning_off_is_bit_identical_with_every_option(case):
    tiny, model, inputs = case
    dense = tiny.denoise(model, inputs, STEPS)
    for config in (
        CATConfig(keep_ratio=1.0, **X),
        CATConfig(keep_ratio=1.0, keep_ratio_end=1.0, refresh_every=2, **X),
        CATConfig(keep_ratio=0.3, start_step=STEPS, keep_ratio_end=0.2, **X),  # the last step captures
    ):
        catprune.apply(model, config)
        assert torch.equal(tiny.denoise(model, inputs, STEPS), dense), config
        assert catprune.stats(model).macs_ratio == 1.0


def test_extrapolate_differs_from_reuse_is_finite_close_and_repeatable(case):
    tiny, model, inputs = case
    dense = tiny.denoise(model, inputs, STEPS)
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=3, context="reuse"))
    reuse = tiny.denoise(model, inputs, STEPS)
    reuse_bytes = catprune.inspect(model).cache_bytes
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=3, **X))
    first, second = tiny.denoise(model, inputs, STEPS), tiny.denoise(model, inputs, STEPS)
    assert torch.isfinite(first).all() and torch.equal(first, second)
    assert not torch.equal(first, reuse) and not torch.equal(first, dense)
    assert (first - dense).abs().mean() < 0.25 * (dense - dense.roll(1, dims=0)).abs().mean()
    # the same MACs; the extra memory is K0 per block + one shared working buffer (the largest block's K/V) + times
    view = catprune.inspect(model)
    assert catprune.stats(model).macs == sum(r.macs for r in view.steps)
    itemsize = first.element_size()
    k0 = sum(2 * s[1] * 24 * s[3] * s[4] for s in view.kv_cache_shapes) * itemsize  # (2, B, M, H, hd) each
    work = max(2 * s[1] * s[2] * s[3] * s[4] for s in view.kv_cache_shapes) * itemsize
    assert view.cache_bytes - reuse_bytes == k0 + work + 3 * 2 * 24 * 4 + 2 * 24  # t1, t0, ratio f32; computed u8


def test_batch_of_two_equals_each_sample_alone(case):
    tiny, model, inputs = case
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=3, cfg="per_row", keep_ratio_end=0.5, **X))
    both = tiny.denoise(model, inputs, STEPS)
    for i in range(2):
        alone = tiny.denoise(model, tiny.row(inputs, i), STEPS)
        assert torch.allclose(both[i : i + 1], alone, atol=1e-4), (both[i] - alone[0]).abs().max()


def test_apply_is_idempotent_and_remove_leaves_no_trace(case):
    tiny, model, inputs = case
    signature, attributes = inspect.signature(model.forward), set(model.__dict__)
    dense = tiny.denoise(model, inputs, STEPS)
    config = CATConfig(keep_ratio=0.3, start_step=2, refresh_every=2, **X)
    catprune.apply(model, config)
    once = tiny.denoise(model, inputs, STEPS)
    catprune.apply(model, config)
    catprune.apply(model, config)
    assert torch.equal(tiny.denoise(model, inputs, STEPS), once)
    assert inspect.signature(model.forward) == signature
    catprune.remove(model)
    assert torch.equal(tiny.denoise(model, inputs, STEPS), dense)
    assert set(model.__dict__) == attributes and "forward" not in model.__dict__
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "options",
    [dict(**X), dict(keep_ratio_end=0.6, refresh_every=2, **X), dict(keep_ratio_end=0.6, selection="ras")],
    ids=["extrapolate", "extrapolate-schedule-refresh", "reuse-schedule"],
)
def test_fused_step_logic_matches_unfused(case, options):
    """The CUDA-graph code path (one fused function per step over persistent buffers, the forecast inside it), run
    eagerly, equals the unfused eager path."""
    tiny, model, inputs = case
    config = CATConfig(keep_ratio=0.3, start_step=2, **options)
    catprune.apply(model, config)
    unfused = tiny.denoise(model, inputs, STEPS)
    catprune.apply(model, config, runner=StepRunner(Backend.EAGER, fuse=True))
    fused = tiny.denoise(model, inputs, STEPS)
    assert torch.equal(fused, unfused)
    assert torch.equal(tiny.denoise(model, inputs, STEPS), fused)  # persistent buffers reset between generations


def test_schedule_and_refresh_accounting_is_exact(case):
    tiny, model, inputs = case
    steps, start, m = 8, 2, 24
    config = CATConfig(keep_ratio=0.5, keep_ratio_end=0.1, start_step=start, refresh_every=3, **X)
    catprune.apply(model, config)
    tiny.denoise(model, inputs, steps)
    records = catprune.inspect(model).steps
    scheduler = tiny.scheduler()
    scheduler.set_timesteps(steps)
    ts = [float(t) for t in scheduler.timesteps]
    adapter, info = adapter_for(model), adapter_for(model).inspect_call((), tiny.call_kwargs(model, inputs, 500.0))
    expected_kinds = ["dense", "capture"] + ["pruned", "pruned", "refresh"] * 2
    assert [r.kind for r in records] == expected_kinds
    for i, r in enumerate(records):
        if r.kind == "pruned":  # bare transformer: progress 1 - t / t_capture, read at the step before
            k = config.tokens_kept(m, 0.0 if i == start else 1.0 - ts[i - 1] / ts[start - 1])
            assert r.computed == k and r.selected.shape == (2, k)
        else:
            assert r.computed == m and r.selected is None
        assert r.macs == adapter.macs(info, r.computed) and r.macs_dense == adapter.macs(info, m)
    assert len({r.computed for r in records if r.kind == "pruned"}) > 1  # the schedule really changes k
    assert catprune.stats(model).macs == sum(adapter.macs(info, r.computed) for r in records)


def test_schedule_progress_from_the_pipeline_and_keep_values():
    class Pipe:  # the probe holds its pipeline weakly
        scheduler = SimpleNamespace(timesteps=torch.arange(28))

    pipe = Pipe()
    assert PipelineProbe(pipe).num_steps() == 28 and PipelineProbe(None).num_steps() is None
    config = CATConfig(keep_ratio=0.5, keep_ratio_end=0.2)
    assert [config.tokens_kept(100, p) for p in (0.0, 0.5, 1.0, 2.0)] == [50, 35, 20, 20]
    assert CATConfig(keep_ratio=1.0, keep_ratio_end=0.5).pruning_enabled
    assert CATConfig().context is Context.REUSE and CATConfig().forecast_max_ratio == 0.5  # the defaults
    assert CATConfig(context=Context.REUSE).to_dict()["context"] == "reuse"


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(context="forecast"), ValueError, ["CATConfig.context", "'reuse'", "'extrapolate'", "'forecast'"]),
        (dict(keep_ratio_end=0.0), ValueError, ["CATConfig.keep_ratio_end", "(0, 1]", "0.0", "None"]),
        (dict(keep_ratio_end="0.2"), TypeError, ["CATConfig.keep_ratio_end", "float", "'0.2'", "Pass"]),
        (dict(refresh_every=0), ValueError, ["CATConfig.refresh_every", "int >= 1", "0", "None"]),
        (dict(refresh_every=2.5), TypeError, ["CATConfig.refresh_every", "int >= 1", "2.5", "Pass"]),
        (dict(forecast_max_ratio=0.0), ValueError, ["CATConfig.forecast_max_ratio", "float > 0", "0.0", "None"]),
        (dict(forecast_max_ratio="1"), TypeError, ["CATConfig.forecast_max_ratio", "float > 0", "'1'", "Pass"]),
    ],
)
def test_config_errors_name_field_expected_received_fix(kwargs, error, words):
    with pytest.raises(error) as info:
        CATConfig(**kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)
