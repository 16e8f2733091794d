"""`Selection.DRIFT`: the k tokens whose reused output is predicted to drift most, rate x (age + 1)."""

import pytest
import torch

import catprune
from catprune import CATConfig
from catprune.algorithm import drift_priority, topk_tokens, update_age, update_rate
from catprune.models.testing import TinySD3
from helpers import assert_batch_equals_single_and_non_square

START, STEPS, KEEP = 3, 9, 0.25


def _tokens(out: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) SD3 output -> (B, M, P) per 2x2 patch in raster order (channel order is irrelevant to norms)."""
    b, c, h, w = out.shape
    return out.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), -1)


def _run(model, inputs, steps=STEPS):
    """A denoising loop that keeps every step's output tokens; returns them and the observed selections."""
    family = TinySD3()
    scheduler = family.scheduler()
    scheduler.set_timesteps(steps)
    x, outputs, records = inputs["hidden_states"].clone(), [], []
    with torch.no_grad(), catprune.observe(model, records.append):
        for t in scheduler.timesteps:
            out = model(**family.call_kwargs(model, {**inputs, "hidden_states": x}, t))[0]
            outputs.append(_tokens(out))
            x = scheduler.step(out, t, x).prev_sample
    return outputs, records


def test_drift_selects_the_largest_predicted_drift_of_the_observed_outputs():
    """An independent replay of the rule from the outputs the model returned: the first pruned step takes the
    largest changes between the reference and capture steps; afterwards every computed token's rate is its change
    since its previous computation over the steps between, and the next step takes the k largest rate x (age + 1)."""
    family = TinySD3()
    model = family.transformer()
    inputs = family.inputs(model, batch=2, height=8, width=12)  # 24 tokens per row, k = 6
    catprune.apply(model, CATConfig(keep_ratio=KEEP, start_step=START, selection="drift"))
    outputs, records = _run(model, inputs)
    k = records[START].computed

    def top(priority):
        return torch.argsort(-priority, dim=1, stable=True)[:, :k].sort(dim=1).values

    last = outputs[START - 1].clone()
    rate = (outputs[START - 1] - outputs[START - 2]).norm(dim=-1)  # (B, M)
    age = torch.zeros_like(rate)
    checked = 0
    for step in range(START, STEPS):
        assert records[step].phase == "pruned"
        expected = top(rate * (age + 1))
        assert torch.equal(records[step].selected, expected), f"step {step}"
        checked += 1
        rows = torch.arange(2).unsqueeze(1)
        fresh = outputs[step][rows, expected]  # (B, k, P)
        rate[rows, expected] = (fresh - last[rows, expected]).norm(dim=-1) / (age[rows, expected] + 1)
        last[rows, expected] = fresh
        age += 1
        age[rows, expected] = 0
    assert checked == STEPS - START
    # every token left out keeps the output of its last computation
    assert torch.equal(outputs[-1], last)


def test_drift_batch_equals_its_samples_and_removal_restores_dense():
    family = TinySD3()
    model = family.transformer()
    inputs = family.inputs(model, batch=3, height=8, width=12)
    dense = family.denoise(model, inputs, STEPS)
    config = CATConfig(keep_ratio=KEEP, start_step=START, selection="drift", context="extrapolate", refresh_every=3)
    catprune.apply(model, config)
    batch = family.denoise(model, inputs, STEPS)
    assert not torch.equal(batch, dense)
    for i in range(3):
        assert torch.allclose(family.denoise(model, family.row(inputs, i), STEPS), batch[i : i + 1], atol=1e-4)
    catprune.remove(model)
    assert torch.equal(family.denoise(model, inputs, STEPS), dense)


def test_drift_with_every_token_kept_is_dense():
    family = TinySD3()
    model = family.transformer()
    inputs = family.inputs(model, batch=2, height=8, width=12)
    dense = family.denoise(model, inputs, STEPS)
    catprune.apply(model, CATConfig(keep_ratio=1.0, start_step=START, selection="drift"))
    assert torch.equal(family.denoise(model, inputs, STEPS), dense)


def test_update_rate_divides_by_the_steps_between_computations():
    rate = torch.full((1, 4), 7.0)
    age = torch.tensor([[0, 2, 5, 1]])  # before this step's update
    idx = torch.tensor([[1, 2]])
    old = torch.zeros(1, 2, 2)
    new = torch.tensor([[[3.0, 4.0], [0.0, 6.0]]])  # changes 5 and 6
    out = update_rate(rate, idx, old, new, age)
    assert torch.allclose(out, torch.tensor([[7.0, 5.0 / 3.0, 1.0, 7.0]]))  # gaps 3 and 6; the others untouched
    assert rate.tolist() == [[7.0] * 4]  # a new tensor


@pytest.mark.parametrize("m,k", [(12, 3), (20, 7)])
def test_drift_priority_brings_every_moving_token_back(m, k):
    """With fixed positive rates a token left out gains (its rate) every step, so none starves: every token is
    recomputed within ceil(max rate / min rate) * ceil(m / k) + 1 steps."""
    g = torch.Generator().manual_seed(m)
    rate = torch.rand(1, m, generator=g) * 9 + 1  # rates in [1, 10)
    age = torch.zeros(1, m, dtype=torch.long)
    seen = torch.zeros(1, m, dtype=torch.bool)
    bound = 10 * -(-m // k) + 1
    for _ in range(bound):
        idx = topk_tokens(drift_priority(rate, age), k)
        seen[0, idx[0]] = True
        age = update_age(age, idx)
    assert seen.all()


def test_batch_helper_runs_drift_through_a_pipeline():
    """The stock-pipeline path (CFG rows share one selection, scored on the conditional row)."""
    pytest.importorskip("diffusers")
    from test_sd3 import _embeds, _generate, _tiny_sd3_pipeline

    pipe = catprune.apply(_tiny_sd3_pipeline(), CATConfig(keep_ratio=0.3, start_step=3, selection="drift"))
    assert_batch_equals_single_and_non_square(pipe, _generate, _embeds(2, seed=4), _embeds(2), rows=4)
