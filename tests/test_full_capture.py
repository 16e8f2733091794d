"""The capture step as a full-selection pruned step (`StepRunner.full_capture`, the default of the compile and
graph backends), checked on a CPU through the fused eager runner over every model family: the same caches and the
same step as the hooked dense forward up to float rounding, the same generation after it, and the paths that keep
the hooked forward."""

import functools

import pytest
import torch

import catprune
from catprune import Backend, CATConfig
from catprune.runtime import StepRunner
from catprune.runtime.lowprec import KVWriter

STEPS = 6


def _run(tiny, model, inputs, config, full_capture):
    runner = StepRunner(Backend.EAGER, fuse=True, full_capture=full_capture)
    catprune.apply(model, config, runner=runner)
    out = tiny.denoise(model, inputs, STEPS)
    view = catprune.inspect(model)
    return out, view


def test_full_selection_capture_matches_the_hooked_forward(case):
    tiny, model, inputs = case
    config = CATConfig(keep_ratio=0.5, start_step=3)
    hooked, view_hooked = _run(tiny, model, inputs, config, full_capture=False)
    full, view_full = _run(tiny, model, inputs, config, full_capture=True)
    assert [r.phase for r in view_full.steps] == [r.phase for r in view_hooked.steps]
    assert [r.phase for r in view_full.steps][:3] == ["dense", "dense", "capture"]
    assert [r.macs for r in view_full.steps] == [r.macs for r in view_hooked.steps]
    assert view_full.cache_bytes == view_hooked.cache_bytes
    scale = hooked.abs().mean()
    assert torch.allclose(full, hooked, atol=1e-4 * scale + 1e-5, rtol=1e-4), (full - hooked).abs().max()


def test_full_capture_keeps_the_batch_contract(case):
    tiny, model, inputs = case
    config = CATConfig(keep_ratio=0.3, start_step=2, cfg="per_row")
    both, _ = _run(tiny, model, inputs, config, full_capture=True)
    for i in range(2):
        alone, _ = _run(tiny, model, tiny.row(inputs, i), config, full_capture=True)
        assert torch.allclose(both[i : i + 1], alone, atol=1e-4), (both[i] - alone[0]).abs().max()


def test_forecast_reference_and_capture_as_full_selection_steps(case):
    """With the forecast both cache-filling steps (the reference step, which gives K0, and the capture) run as
    full-selection steps: the generation matches the hooked one up to float rounding, a second generation on the
    same buffers repeats the first, and a batch equals its rows alone."""
    tiny, model, inputs = case
    config = CATConfig(keep_ratio=0.4, start_step=3, context="extrapolate", forecast_max_ratio=1.0)
    hooked, _ = _run(tiny, model, inputs, config, full_capture=False)
    full, view = _run(tiny, model, inputs, config, full_capture=True)
    assert [r.phase for r in view.steps] == ["dense", "dense", "capture", "pruned", "pruned", "pruned"]
    assert torch.isfinite(full).all()
    scale = hooked.abs().mean()
    assert torch.allclose(full, hooked, atol=1e-4 * scale + 1e-5, rtol=1e-4), (full - hooked).abs().max()
    again = tiny.denoise(model, inputs, STEPS)  # the same runner and buffers: K0 / K1 hold the last generation's
    assert torch.equal(again, full)
    for i in range(2):
        alone, _ = _run(tiny, model, tiny.row(inputs, i), config, full_capture=True)
        assert torch.allclose(full[i : i + 1], alone, atol=1e-4), (full[i] - alone[0]).abs().max()


@pytest.mark.parametrize("context", ["reuse", "extrapolate"])
@pytest.mark.parametrize("cache_dtype", ["bf16", "fp8"])
def test_low_precision_caches_filled_by_the_full_selection_step(case, cache_dtype, context, monkeypatch):
    """A low-precision cache is quantised by the full-selection capture step itself (no hooked forward): the same
    phases and cache bytes as the hooked capture, the generation equal to it up to the rounding of the storage
    (the two captures' K/V differ by float rounding before they are rounded to 8 or 16 bits), a second
    generation on the same buffers repeats the first, and a batch equals its rows alone."""
    tiny, model, inputs = case
    config = CATConfig(keep_ratio=0.4, start_step=3, context=context, cache_dtype=cache_dtype, cfg="per_row")
    writes = []  # the capture hooks' quantised writes
    write = KVWriter.write_
    monkeypatch.setattr(KVWriter, "write_", lambda self, j, values: writes.append(j) or write(self, j, values))
    hooked, view_hooked = _run(tiny, model, inputs, config, full_capture=False)
    assert writes
    writes.clear()
    full, view = _run(tiny, model, inputs, config, full_capture=True)
    assert not writes  # no hooked forward ran
    assert [r.phase for r in view.steps] == [r.phase for r in view_hooked.steps]
    assert view.cache_bytes == view_hooked.cache_bytes
    assert view.kv_cache_dtype == view_hooked.kv_cache_dtype != torch.float32
    assert torch.isfinite(full).all()
    scale = hooked.abs().mean()
    assert torch.allclose(full, hooked, atol=0.05 * scale, rtol=0.05), (full - hooked).abs().max() / scale
    again = tiny.denoise(model, inputs, STEPS)
    assert torch.equal(again, full)
    for i in range(2):
        alone, _ = _run(tiny, model, tiny.row(inputs, i), config, full_capture=True)
        assert torch.allclose(full[i : i + 1], alone, atol=1e-4), (full[i] - alone[0]).abs().max()


@pytest.mark.parametrize("context", ["reuse", "extrapolate"])
def test_dense_steps_run_as_full_selection_steps(case, context, monkeypatch):
    """With `full_capture` every dense step of a pruning generation without the forecast (those before the capture
    too) is the full-selection step: the model's own forward never runs. With the forecast only the reference and
    capture steps are (the earlier dense steps leave its K0 / K1 and times alone)."""
    tiny, model, inputs = case
    forwards, forward = [], type(model).forward

    @functools.wraps(forward)
    def counting(self, *args, **kwargs):
        forwards.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting)
    config = CATConfig(keep_ratio=0.4, start_step=4, context=context, forecast_max_ratio=1.0)
    _, view = _run(tiny, model, inputs, config, full_capture=True)
    assert [r.phase for r in view.steps] == ["dense"] * 3 + ["capture", "pruned", "pruned"]
    assert len(forwards) == (0 if context == "reuse" else 2)  # extrapolate: steps 0 and 1, before the reference


def test_runner_defaults_and_bad_argument():
    assert StepRunner("compile").full_capture and StepRunner("compile+cudagraph").full_capture
    assert not StepRunner("eager").full_capture and not StepRunner("eager", fuse=True).full_capture
    with pytest.raises(TypeError, match="StepRunner: full_capture: expected True, False or None, got str"):
        StepRunner("eager", full_capture="yes")
    assert StepRunner("compile").modulation_chunk == 8 and StepRunner("eager", fuse=True).modulation_chunk == 0
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="StepRunner: modulation_chunk: expected an int >= 0 or None, got"):
            StepRunner("eager", modulation_chunk=bad)
