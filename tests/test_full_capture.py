"""The capture step as a full-selection pruned step (`StepRunner.full_capture`, the default of the compile and
graph backends), checked on a CPU through the fused eager runner over every model family: the same caches and the
same step as the hooked dense forward up to float rounding, the same generation after it, and the paths that keep
the hooked forward."""

import pytest
import torch

import catprune
from catprune import Backend, CATConfig
from catprune.runtime import StepRunner

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


def test_hooked_capture_where_the_full_selection_cannot_stand_in(case):
    """A low-precision cache (the hooks quantise) keeps the hooked forward: the result equals the runner without
    full capture bit for bit."""
    tiny, model, inputs = case
    config = CATConfig(keep_ratio=0.5, start_step=3, cache_dtype="bf16")
    without, _ = _run(tiny, model, inputs, config, full_capture=False)
    with_, _ = _run(tiny, model, inputs, config, full_capture=True)
    assert torch.equal(with_, without), config


def test_runner_defaults_and_bad_argument():
    assert StepRunner("compile").full_capture and StepRunner("compile+cudagraph").full_capture
    assert not StepRunner("eager").full_capture and not StepRunner("eager", fuse=True).full_capture
    with pytest.raises(TypeError, match="StepRunner: full_capture: expected True, False or None, got str"):
        StepRunner("eager", full_capture="yes")
