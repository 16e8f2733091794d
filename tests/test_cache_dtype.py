"""Low-precision cache storage (``CATConfig.cache_dtype``): the field, the contract over every model family (tiny
random models, CPU, fp32), the bytes it saves, batch invariance of the per-token fp8 scales, and the quantiser."""

import json

import pytest
import torch

import catprune
from catprune import Backend, CacheDtype, CATConfig
from catprune.adapters import BufferStore, adapter_for
from catprune.algorithm import dequantize_rows_, quantize_rows
from catprune.runtime import StepRunner

STEPS = 6
DTYPES = ["bf16", "fp16", "fp8"]
STORED = {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


# ---------------------------------------------------------------------------------------------------- the field
@pytest.mark.parametrize(
    "value, error, words",
    [
        ("int8", ValueError, ["CATConfig.cache_dtype", "'bf16', 'fp16', 'fp8'", "'int8'", "None"]),
        ("FP8", ValueError, ["CATConfig.cache_dtype", "'fp8'", "'FP8'"]),
        (torch.int8, ValueError, ["CATConfig.cache_dtype", "torch.float8_e4m3fn", "torch.int8"]),
        (8, TypeError, ["CATConfig.cache_dtype", "'bf16', 'fp16', 'fp8'", "8 (int)", "Pass"]),
        (True, TypeError, ["CATConfig.cache_dtype", "True (bool)"]),
    ],
)
def test_field_errors_name_field_expected_and_received(value, error, words):
    with pytest.raises(error) as info:
        CATConfig(cache_dtype=value)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_field_values_and_serialisation():
    assert CATConfig().cache_dtype is None and CATConfig().to_dict()["cache_dtype"] is None
    for value, parsed in [
        ("fp8", CacheDtype.FP8),
        (CacheDtype.BF16, CacheDtype.BF16),
        (torch.float16, CacheDtype.FP16),
        (torch.bfloat16, CacheDtype.BF16),
        (torch.float8_e4m3fn, CacheDtype.FP8),
    ]:
        config = CATConfig(cache_dtype=value)
        assert config.cache_dtype is parsed and config.to_dict()["cache_dtype"] == parsed.value
        assert CATConfig(**config.to_dict()) == config
    assert CacheDtype.FP8.torch_dtype is torch.float8_e4m3fn


def test_fp8_on_a_torch_without_float8_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError) as info:
        CATConfig(cache_dtype="fp8")
    assert "CATConfig.cache_dtype" in str(info.value) and "float8_e4m3fn" in str(info.value)
    assert CATConfig(cache_dtype="bf16").cache_dtype is CacheDtype.BF16


# ---------------------------------------------------------------------------------------------------- the quantiser
def test_quantiser_rows_are_independent_and_within_fp8_rounding():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4) * torch.logspace(-3, 3, 5)[None, :, None, None]  # rows of very different ranges
    x[1, 2] = 0.0
    q, scale = quantize_rows(x, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (2, 5, 1, 1) and scale.dtype == torch.float32
    back = dequantize_rows_(torch.empty_like(x), q, scale)
    absmax = x.abs().amax(dim=(-2, -1), keepdim=True)
    assert ((back - x).abs() <= absmax / 16).all()  # 3 mantissa bits: at most half a step, relative to the row
    assert torch.equal(back[1, 2], torch.zeros(3, 4))
    alone_q, alone_scale = quantize_rows(x[1:, 3:], torch.float8_e4m3fn)  # a row's code never sees other rows
    assert torch.equal(alone_q.view(torch.uint8), q[1:, 3:].view(torch.uint8))
    assert torch.equal(alone_scale, scale[1:, 3:])
    big = torch.full((1, 1, 1, 2), 1e6)
    assert torch.isfinite(quantize_rows(big, torch.float16)[0].float()).all()  # float16 saturates
    assert quantize_rows(x, torch.bfloat16)[1] is None


# ---------------------------------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("cache_dtype", DTYPES)
def test_pruning_off_is_bit_identical_and_remove_leaves_no_trace(case, cache_dtype):
    tiny, model, inputs = case
    attributes = set(model.__dict__)
    dense = tiny.denoise(model, inputs, STEPS)
    for config in (
        CATConfig(keep_ratio=1.0, cache_dtype=cache_dtype),
        CATConfig(start_step=20, cache_dtype=cache_dtype),
    ):
        catprune.apply(model, config)
        assert torch.equal(tiny.denoise(model, inputs, STEPS), dense)
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=3, cache_dtype=cache_dtype))
    tiny.denoise(model, inputs, STEPS)
    catprune.remove(model)
    assert torch.equal(tiny.denoise(model, inputs, STEPS), dense)
    assert set(model.__dict__) == attributes and all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("context", ["reuse", "extrapolate"])
def test_every_dtype_stores_low_precision_stays_close_and_fused_matches(case, context):
    """Each storage dtype really stores in that dtype (the result moves, by far less than pruning moves it), the
    fused step (what the CUDA-graph backends capture) equals the unfused one, and generations repeat exactly."""
    tiny, model, inputs = case
    dense = tiny.denoise(model, inputs, STEPS)
    catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=3, context=context))
    full = tiny.denoise(model, inputs, STEPS)
    pruning_error = (full - dense).abs().mean()
    for cache_dtype in DTYPES:
        config = CATConfig(keep_ratio=0.3, start_step=3, context=context, cache_dtype=cache_dtype)
        catprune.apply(model, config)
        low = tiny.denoise(model, inputs, STEPS)
        assert catprune.inspect(model).kv_cache_dtype == STORED[cache_dtype]
        assert torch.isfinite(low).all() and not torch.equal(low, full), cache_dtype
        assert (low - full).abs().mean() < 0.1 * pruning_error, (cache_dtype, (low - full).abs().mean(), pruning_error)
        catprune.apply(model, config, runner=StepRunner(Backend.EAGER, fuse=True))
        assert torch.equal(tiny.denoise(model, inputs, STEPS), low), cache_dtype
        assert torch.equal(tiny.denoise(model, inputs, STEPS), low), cache_dtype  # buffers reset between generations


def test_fp8_with_schedule_and_refresh_steps_fused_matches_unfused(case):
    """Refresh steps refill the low-precision caches (and roll K0 with its scales) through the capture hooks."""
    tiny, model, inputs = case
    config = CATConfig(keep_ratio=0.3, start_step=2, keep_ratio_end=0.6, refresh_every=2, cache_dtype="fp8")
    catprune.apply(model, config)
    unfused = tiny.denoise(model, inputs, STEPS)
    assert [r.kind for r in catprune.inspect(model).steps].count("refresh") == 2
    catprune.apply(model, config, runner=StepRunner(Backend.EAGER, fuse=True))
    assert torch.equal(tiny.denoise(model, inputs, STEPS), unfused)


def test_batch_of_two_equals_each_sample_alone_under_fp8(case):
    tiny, model, inputs = case
    for context in ("reuse", "extrapolate"):
        catprune.apply(
            model, CATConfig(keep_ratio=0.3, start_step=3, cfg="per_row", context=context, cache_dtype="fp8")
        )
        both = tiny.denoise(model, inputs, STEPS)
        for i in range(2):
            alone = tiny.denoise(model, tiny.row(inputs, i), STEPS)
            assert torch.allclose(both[i : i + 1], alone, atol=1e-4), (context, (both[i] - alone[0]).abs().max())


@pytest.mark.parametrize("context", ["reuse", "extrapolate"])
def test_cache_bytes_shrink_by_the_storage_width(case, context):
    """K/V bytes as stored: image rows only (no text tail), 2 bytes per value for bf16 / fp16, 1 for fp8 plus one
    float32 scale per token row, twice that when forecasting (K0); nothing else is held between steps (the blocks'
    keys/values are rebuilt in temporaries of each step), so the other caches are the full-precision ones, less
    the forecast's working buffer when forecasting."""
    tiny, model, inputs = case
    views = {}
    for cache_dtype in (None, *DTYPES):
        catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=3, context=context, cache_dtype=cache_dtype))
        tiny.denoise(model, inputs, STEPS)
        views[cache_dtype] = catprune.inspect(model)
    copies = 2 if context == "extrapolate" else 1
    m = views[None].grid[0] * views[None].grid[1]
    full = views[None].kv_cache_shapes  # (2, B, M [+ T], H, hd)
    values = sum(2 * s[1] * m * s[3] * s[4] for s in full)  # image K/V values over all blocks
    scales = sum(2 * s[1] * m for s in full)
    k1_full = sum(2 * s[1] * s[2] * s[3] * s[4] for s in full)  # compute dtype: with the text tail
    assert views[None].kv_cache_bytes == (k1_full + (copies - 1) * values) * 4  # K0: image rows only
    assert views["bf16"].kv_cache_bytes == views["fp16"].kv_cache_bytes == copies * values * 2
    assert views["fp8"].kv_cache_bytes == copies * (values + 4 * scales)
    fp8_values = views["fp8"].kv_cache_bytes - copies * 4 * scales  # without the scales: 1/2 of bf16, 1/4 of fp32
    assert 2 * fp8_values == views["bf16"].kv_cache_bytes and 4 * fp8_values == copies * values * 4
    assert all(s[2] == m for s in views["fp8"].kv_cache_shapes)
    work = (
        max(2 * s[1] * s[2] * s[3] * s[4] for s in full) * 4
    )  # the forecast's: the largest block, text tail included
    others = {d: v.cache_bytes - v.kv_cache_bytes for d, v in views.items()}
    for cache_dtype in DTYPES:
        assert others[cache_dtype] - others[None] == (-work if context == "extrapolate" else 0), cache_dtype


# ---------------------------------------------------------------------------------------------------- the step
def test_static_step_over_preallocated_storage_and_fresh_values_unrounded(case):
    """A pruned step writes into the storage allocated at capture (same addresses, step after step: what a CUDA
    graph needs), the static function equals the eager one, and with every token selected the step is the dense
    forward: the computed tokens attend with their fresh values, never the rounded ones."""
    tiny, model, inputs = case
    adapter = adapter_for(model)
    kwargs = tiny.call_kwargs(model, inputs, 500.0)
    info = adapter.inspect_call((), kwargs)
    caches = [BufferStore(storage=torch.float8_e4m3fn) for _ in range(adapter.num_caches())]
    idx = torch.tensor([[0, 5, 7, 11, 20], [1, 2, 3, 17, 23]])
    with torch.no_grad():
        with adapter.capture(caches, info):
            dense = model(**kwargs)[0]
        stored = {name: t.data_ptr() for c in caches for name, t in c.tensors.items()}
        assert all(t.dtype in (torch.float8_e4m3fn, torch.float32) for c in caches for t in c.tensors.values())
        eager = adapter.pruned_forward(caches, idx, info)
        static = adapter.pruned_fn(caches, info)(idx=idx, **adapter.fast_inputs(info))
        assert torch.equal(static, eager)
        assert {name: t.data_ptr() for c in caches for name, t in c.tensors.items()} == stored
        every = torch.arange(info.num_tokens).flip(0).expand(2, -1)
        tokens = adapter.pruned_forward(caches, every, info)  # (B, M, P) in idx order
    full = torch.empty_like(tokens).scatter_(1, every[..., None].expand_as(tokens), tokens)
    assert torch.allclose(adapter.build_output(full, info)[0], dense, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- the bench
def test_bench_cache_dtype_cases_report_cache_bytes(tmp_path, capsys):
    from catprune.cli.main import main

    path = tmp_path / "bench.json"
    args = ["bench", "--preset", "sd3-tiny", "--sizes", "64x64", "--steps", "5", "--start-step", "3", "--repeats", "1"]
    rc = main([*args, "--dtype", "fp32", "--cache-dtype", "none,fp8", "--context", "reuse", "--json", str(path)])
    assert rc == 0
    results = json.loads(path.read_text())["results"]
    assert [(r["case"]["cache_dtype"], r["case"]["context"]) for r in results] == [(None, "reuse"), ("fp8", "reuse")]
    none, fp8 = results
    assert 0 < fp8["kv_cache_mem_gb"] < 0.3 * none["kv_cache_mem_gb"]  # float32 -> 1 byte + a scale per row
    assert none["kv_cache_mem_gb"] <= none["cache_mem_gb"] and fp8["kv_cache_mem_gb"] < fp8["cache_mem_gb"]
    out = capsys.readouterr().out
    for r in results:
        kv, total = r["kv_cache_mem_gb"], r["cache_mem_gb"]
        name = r["case"]["cache_dtype"] or "none"
        assert f"cache_dtype={name} context=reuse: K/V {kv:.3f} GiB, all caches {total:.3f} GiB" in out
    with pytest.raises(SystemExit) as info:
        main([*args, "--cache-dtype", "int8"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--cache-dtype" in err and "none, bf16, fp16, fp8" in err and "'int8'" in err
