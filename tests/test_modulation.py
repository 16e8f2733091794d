"""Modulation rows computed several steps at once (`StepRunner.modulation_chunk`, catprune.runtime.modulation),
checked on a CPU through the fused eager runner on tiny stock pipelines: the same generation as modulation
computed inside every step, in chunks of the scheduler's timesteps, checked against the timesteps the transformer
receives, and a batch equal to its rows alone."""

import warnings

import pytest
import torch

import catprune
from catprune import Backend, CATConfig
from catprune.bench import _embeddings, build_pipeline
from catprune.runtime import StepRunner
from catprune.runtime.probe import PipelineProbe

STEPS = 7
PRESETS = ["sd3-tiny", "flux-tiny"]


@pytest.fixture(params=PRESETS)
def pipeline(request):
    pipe, entry = build_pipeline(request.param, "cpu", torch.float32)
    return pipe, entry


def _generate(pipe, embeds, chunk, config=None, **call):
    runner = StepRunner(Backend.EAGER, fuse=True, full_capture=True, modulation_chunk=chunk)
    catprune.apply(pipe, config or CATConfig(keep_ratio=0.5, start_step=3), runner=runner)
    try:
        generator = torch.Generator("cpu").manual_seed(0)
        kwargs = dict(height=64, width=64, num_inference_steps=STEPS, output_type="latent", generator=generator)
        out = pipe(**embeds, **{**kwargs, **call}).images
        view = catprune.inspect(pipe)
    finally:
        catprune.remove(pipe)
    return out, view


def _count_rows(monkeypatch):
    """Record N of every `Adapter.modulation_rows` call."""
    calls = []

    def wrap(original):
        def rows(self, **inputs):
            out = original(self, **inputs)
            calls.append(out.shape[0])
            return out

        return rows

    from catprune.adapters.common import DiffusersAdapter

    monkeypatch.setattr(DiffusersAdapter, "modulation_rows", wrap(DiffusersAdapter.modulation_rows))
    return calls


def _rows_per_step(entry):
    return 2 if entry["class"].startswith("SD3") else 1  # CFG doubles SD3's batch; Flux runs none


def _adapter_class(entry):
    if entry["class"].startswith("SD3"):
        from catprune.adapters.sd3 import SD3Adapter

        return SD3Adapter
    from catprune.adapters.flux import FluxAdapter

    return FluxAdapter


def _close(a, b):
    scale = b.abs().mean()
    return torch.allclose(a, b, atol=1e-4 * scale + 1e-5, rtol=1e-4)


def test_rows_in_chunks_match_rows_in_every_step(pipeline, monkeypatch):
    pipe, entry = pipeline
    embeds = _embeddings(pipe, entry, 1, "cpu", torch.float32)
    inside, view_inside = _generate(pipe, embeds, 0)
    calls = _count_rows(monkeypatch)
    chunked, view = _generate(pipe, embeds, 3)
    rows = _rows_per_step(entry)
    # step 0 (no scheduler index yet) alone, then steps 1-3 and 4-6 in one call each
    assert calls == [rows, 3 * rows, 3 * rows]
    assert [r.phase for r in view.steps] == [r.phase for r in view_inside.steps]
    assert view.cache_bytes > view_inside.cache_bytes  # the rows are held between steps and counted
    assert _close(chunked, inside), (chunked - inside).abs().max()


def test_a_batch_equals_its_rows_alone(pipeline):
    pipe, entry = pipeline
    embeds = _embeddings(pipe, entry, 2, "cpu", torch.float32)
    config = CATConfig(keep_ratio=0.5, start_step=3, cfg="per_row")
    seeds = [torch.Generator("cpu").manual_seed(i) for i in range(2)]
    both, _ = _generate(pipe, embeds, 4, config, generator=seeds)
    for i in range(2):
        alone_embeds = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v) for k, v in embeds.items()}
        alone, _ = _generate(pipe, alone_embeds, 4, config, generator=[torch.Generator("cpu").manual_seed(i)])
        assert _close(both[i : i + 1], alone), (both[i] - alone[0]).abs().max()


def test_timesteps_not_the_schedulers_fall_back_to_every_step(pipeline, monkeypatch):
    """An adapter mapping that does not give the transformer's timestep is caught by the one check per generation:
    every step computes its own row and the generation is unchanged."""
    pipe, entry = pipeline
    embeds = _embeddings(pipe, entry, 1, "cpu", torch.float32)
    inside, _ = _generate(pipe, embeds, 0)
    adapter_cls = _adapter_class(entry)
    original = adapter_cls.scheduled_timesteps
    monkeypatch.setattr(adapter_cls, "scheduled_timesteps", lambda self, t, info: original(self, t, info) + 1.0)
    calls = _count_rows(monkeypatch)
    out, _ = _generate(pipe, embeds, 3)
    rows = _rows_per_step(entry)
    assert calls == [rows] * STEPS
    assert _close(out, inside), (out - inside).abs().max()


def test_a_later_step_off_the_schedule_is_reported(pipeline, monkeypatch):
    """A pipeline whose later timesteps leave the scheduler's (here: the schedule the runtime reads differs from
    step 3 on) is reported one chunk later, and every later step computes its own row."""
    pipe, entry = pipeline
    embeds = _embeddings(pipe, entry, 1, "cpu", torch.float32)
    original = PipelineProbe.timesteps

    def shifted(self):
        t = original(self).clone()
        t[3:] += 1.0
        return t

    monkeypatch.setattr(PipelineProbe, "timesteps", shifted)
    calls = _count_rows(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _generate(pipe, embeds, 3)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("steps 2-3" in m and "modulation_chunk=1" in m for m in messages), messages
    rows = _rows_per_step(entry)
    assert calls == [rows, 3 * rows, 3 * rows, rows, rows]
