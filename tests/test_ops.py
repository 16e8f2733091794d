"""The adapters' block-level pieces: the GELU projection as one GEMM (`gelu_linear`, `feed_forward`) and when it runs.

On a CPU the fused path never runs (``torch._addmm_activation`` computes the exact GELU there, not the tanh
approximation); its plumbing is checked with a stand-in for the fused op, its numbers on a CUDA machine."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward

from catprune.adapters import ops
from catprune.families import FAMILIES, load


def _fused_stand_in(calls):
    """A CPU stand-in for ``torch._addmm_activation`` with the CUDA semantics (tanh GELU), recording its calls."""

    def fused(bias, rows, weight_t, use_gelu=False):
        calls.append((bias, rows.shape, weight_t.shape, use_gelu))
        return F.gelu(torch.addmm(bias, rows, weight_t), approximate="tanh")

    return fused


def test_fuses_only_a_plain_biased_linear_with_tanh_gelu_on_cuda():
    x = torch.zeros(2, 4)
    linear = torch.nn.Linear(4, 8)
    assert not ops.fuses_gelu(linear, "tanh", x)  # a CPU input
    cuda_like = torch.empty(2, 4, device="meta")  # not CUDA either: the check reads the device
    assert not ops.fuses_gelu(linear, "tanh", cuda_like)

    class Wrapped(torch.nn.Linear):  # e.g. a LoRA layer: its forward adds more than x @ W^T + b
        pass

    if torch.cuda.is_available():
        xc = x.cuda().half()
        assert ops.fuses_gelu(linear.cuda(), "tanh", xc) and ops.fuses_gelu(linear.cuda(), "tanh", xc.bfloat16())
        assert not ops.fuses_gelu(linear.cuda(), "tanh", xc.float())  # float32: the fast tanh is too coarse
        assert not ops.fuses_gelu(linear.cuda(), "none", xc)  # exact GELU: cuBLASLt's epilogue is the tanh form
        assert not ops.fuses_gelu(torch.nn.Linear(4, 8, bias=False).cuda(), "tanh", xc)
        assert not ops.fuses_gelu(Wrapped(4, 8).cuda(), "tanh", xc)


def test_gelu_linear_fused_path_passes_bias_rows_and_transposed_weight(monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 10)
    x = torch.randn(2, 5, 6)
    calls = []
    monkeypatch.setattr(ops, "fuses_gelu", lambda *_: True)
    monkeypatch.setattr(torch, "_addmm_activation", _fused_stand_in(calls))
    out = ops.gelu_linear(linear, x, "tanh")
    assert out.shape == (2, 5, 10)
    torch.testing.assert_close(out, F.gelu(linear(x), approximate="tanh"), rtol=1e-5, atol=1e-6)
    assert len(calls) == 1
    bias, rows, weight_t, use_gelu = calls[0]
    assert bias is linear.bias and rows == (10, 6) and weight_t == (6, 10) and use_gelu is True


def test_feed_forward_fused_path_equals_the_module(monkeypatch):
    torch.manual_seed(0)
    ff = FeedForward(8, activation_fn="gelu-approximate").eval()
    x = torch.randn(2, 3, 8)
    calls = []
    monkeypatch.setattr(ops, "fuses_gelu", lambda *_: True)
    monkeypatch.setattr(torch, "_addmm_activation", _fused_stand_in(calls))
    torch.testing.assert_close(ops.feed_forward(ff, x), ff(x), rtol=1e-5, atol=1e-6)
    assert len(calls) == 1  # the up projection went through the fused op, the down projection did not


@pytest.mark.parametrize("activation", ["geglu", "gelu"])
def test_feed_forward_runs_other_activations_as_they_are(activation, monkeypatch):
    torch.manual_seed(0)
    ff = FeedForward(8, activation_fn=activation).eval()
    x = torch.randn(1, 3, 8)
    calls = []
    monkeypatch.setattr(torch, "_addmm_activation", _fused_stand_in(calls))
    assert torch.equal(ops.feed_forward(ff, x), ff(x))
    assert not calls  # GEGLU has no plain GELU layer; exact GELU on a CPU input is not fused


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_gelu_projection_on_cuda_is_closer_to_float64_than_gemm_then_gelu():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 1024).cuda().bfloat16()
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    assert ops.fuses_gelu(linear, "tanh", x) and not ops.fuses_gelu(linear, "tanh", x.float())
    exact = F.gelu(F.linear(x.double(), linear.weight.double(), linear.bias.double()), approximate="tanh")
    fused = ops.gelu_linear(linear, x, "tanh").double()
    unfused = F.gelu(linear(x), approximate="tanh").double()
    torch.testing.assert_close(fused, exact, rtol=2e-2, atol=2e-2)
    # one rounding fewer (measured on an H200: mean error 0.00067 against 0.00099 at SD3-medium's shapes)
    assert (fused - exact).abs().mean() < (unfused - exact).abs().mean()


def _cuda(name, value):
    """A tiny model's input on CUDA in bfloat16 (position ids keep their dtype)."""
    if isinstance(value, dict):
        return {k: _cuda(k, v) for k, v in value.items()}
    if not torch.is_tensor(value):
        return value
    return value.to("cuda", torch.bfloat16) if value.is_floating_point() and "ids" not in name else value.to("cuda")


def _denoise_on_cuda(tiny, model, inputs, steps=6):
    scheduler = tiny.scheduler()
    scheduler.set_timesteps(steps)
    x = inputs["hidden_states"].clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            kwargs = tiny.call_kwargs(model, {**inputs, "hidden_states": x}, t)
            kwargs["timestep"] = kwargs["timestep"].to("cuda", x.dtype)
            x = scheduler.step(tiny.velocity(model(**kwargs)[0], x), t, x).prev_sample
    return x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("record", FAMILIES, ids=lambda r: r.transformer_class)
def test_every_family_prunes_with_the_fused_gelu_on_cuda(record, monkeypatch):
    """In bfloat16 on CUDA every adapter's pruned step takes the fused GELU projection, and its images stay within
    bfloat16 noise of the same generation with the GEMM-then-GELU path."""
    import catprune
    from catprune import CATConfig

    tiny = load(record.tiny)()
    model = tiny.transformer().to("cuda", torch.bfloat16)
    inputs = {name: _cuda(name, value) for name, value in tiny.inputs(model, 2, 8, 12).items()}
    calls, real = [], torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    catprune.apply(model, CATConfig(keep_ratio=0.4, start_step=3))
    fused = _denoise_on_cuda(tiny, model, inputs).float()
    fused_calls = len(calls)
    monkeypatch.setattr(ops, "fuses_gelu", lambda *_: False)
    unfused = _denoise_on_cuda(tiny, model, inputs).float()
    catprune.remove(model)
    assert fused_calls > 0 and len(calls) == fused_calls  # the fused op ran in the pruned steps, and only there
    assert (fused - unfused).abs().mean() < 0.05 * unfused.abs().mean()
