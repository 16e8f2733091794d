"""``CATConfig.final_dense_steps``: the last steps run dense, the schedule spans the pruned steps before them, exact
MACs, the batch contract, and a clear error where the step count cannot be read (a bare transformer)."""

import pytest
import torch

import catprune
from catprune import CATConfig
from catprune.models.shapes import build_random_shapes_pipeline
from catprune.models.testing import tiny_sd3_transformer

TINY = dict(num_layers=2, attention_head_dim=8, num_attention_heads=2)
PROMPTS = ["a small red circle at the top left", "a large blue square at the center"]
STEPS = 8


@pytest.fixture(scope="module")
def pipe():
    pipe = build_random_shapes_pipeline(seed=0, **TINY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompts=PROMPTS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = pipe(prompts, num_inference_steps=STEPS, generator=generator, output_type="pt", guidance_scale=4.0)
    return out.images


def test_last_steps_are_dense_and_the_schedule_ends_before_them(pipe):
    catprune.remove(pipe)
    dense = run(pipe)
    plain = CATConfig(keep_ratio=0.25, keep_ratio_end=0.75, start_step=2)
    catprune.apply(pipe, plain)
    pruned = run(pipe)
    catprune.apply(pipe, CATConfig(keep_ratio=0.25, keep_ratio_end=0.75, start_step=2, final_dense_steps=2))
    final = run(pipe)
    records = catprune.inspect(pipe).steps
    assert [r.kind for r in records] == ["dense", "capture"] + ["pruned"] * 4 + ["dense"] * 2
    m = records[0].tokens
    assert [r.computed for r in records[-2:]] == [m, m] and all(r.selected is None for r in records[-2:])
    pruned_k = [r.computed for r in records if r.kind == "pruned"]  # 0.25 -> 0.75 over the 4 pruned steps
    assert pruned_k[0] == plain.tokens_kept(m, 0.0) and pruned_k[-1] == plain.tokens_kept(m, 1.0)
    stats = catprune.stats(pipe)
    assert stats.macs == sum(r.macs for r in records) and stats.macs_ratio > 0.5
    assert not torch.equal(final, pruned) and not torch.equal(final, dense)
    # the dense last steps bring the image closer to the dense one than pruning up to the end does
    assert (final - dense).abs().mean() < (pruned - dense).abs().mean()
    catprune.remove(pipe)
    assert torch.equal(run(pipe), dense)


def test_every_step_after_the_warm_up_dense_is_bit_identical(pipe):
    catprune.remove(pipe)
    dense = run(pipe)
    catprune.apply(pipe, CATConfig(keep_ratio=0.3, start_step=3, final_dense_steps=STEPS - 3))  # capture, then dense
    assert torch.equal(run(pipe), dense)
    catprune.apply(pipe, CATConfig(keep_ratio=0.3, start_step=3, final_dense_steps=STEPS))
    assert torch.equal(run(pipe), dense)
    assert catprune.stats(pipe).macs_ratio == 1.0
    catprune.remove(pipe)


def test_batch_equals_each_sample_alone(pipe):
    catprune.apply(pipe, CATConfig(keep_ratio=0.3, start_step=2, final_dense_steps=2))
    size = pipe.transformer.config.sample_size
    latents = torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=STEPS, output_type="pt", guidance_scale=4.0)
    batch = pipe(PROMPTS, latents=latents, **kwargs).images
    for i in range(2):
        alone = pipe([PROMPTS[i]], latents=latents[i : i + 1], **kwargs).images
        assert torch.allclose(batch[i : i + 1], alone, atol=1e-5), (batch[i] - alone[0]).abs().max()
    catprune.remove(pipe)


def test_bare_transformer_is_refused_with_the_fix_and_state_survives():
    model = tiny_sd3_transformer()
    catprune.apply(model, CATConfig(keep_ratio=0.5, start_step=2, final_dense_steps=1))
    x = torch.randn(1, 4, 8, 8)
    kwargs = dict(
        hidden_states=x,
        encoder_hidden_states=torch.randn(1, 6, model.config.joint_attention_dim),
        pooled_projections=torch.randn(1, model.config.pooled_projection_dim),
        timestep=torch.tensor([500.0]),
    )
    with pytest.raises(ValueError) as info:
        model(**kwargs)
    words = ["CATConfig.final_dense_steps", "bare transformer", "catprune.apply(pipe", "final_dense_steps=0"]
    assert all(w in str(info.value) for w in words), str(info.value)
    catprune.apply(model, CATConfig(keep_ratio=0.5, start_step=2))  # the same model still works after the error
    assert torch.isfinite(model(**kwargs)[0]).all()
    catprune.remove(model)


@pytest.mark.parametrize(
    "value, error, words",
    [
        (-1, ValueError, ["CATConfig.final_dense_steps", "int >= 0", "-1", "Use 0"]),
        (1.5, TypeError, ["CATConfig.final_dense_steps", "int >= 0", "1.5", "Pass"]),
        (True, TypeError, ["CATConfig.final_dense_steps", "int >= 0", "True"]),
    ],
)
def test_config_errors(value, error, words):
    with pytest.raises(error) as info:
        CATConfig(final_dense_steps=value)
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(context="extrapolate", keep_ratio_end=0.6), dict(refresh_every=2), dict(cache_dtype="bf16")],
    ids=["reuse", "forecast-schedule", "refresh", "bf16-cache"],
)
def test_fused_step_logic_with_final_dense_steps_matches_unfused(pipe, options):
    """The CUDA-graph code path run eagerly (one fused function per step) equals the unfused eager path with final
    dense steps, and the full-selection capture of the graph backends stays within float rounding of it."""
    from catprune import Backend
    from catprune.runtime import StepRunner

    config = CATConfig(keep_ratio=0.3, start_step=2, final_dense_steps=2, **options)
    catprune.apply(pipe, config)
    unfused = run(pipe)
    phases = [r.kind for r in catprune.inspect(pipe).steps]
    catprune.apply(pipe, config, runner=StepRunner(Backend.EAGER, fuse=True))
    assert torch.equal(run(pipe), unfused)
    assert [r.kind for r in catprune.inspect(pipe).steps] == phases and phases[-2:] == ["dense", "dense"]
    catprune.apply(pipe, config, runner=StepRunner(Backend.EAGER, fuse=True, full_capture=True))
    assert torch.allclose(run(pipe), unfused, atol=1e-4)
    catprune.remove(pipe)
