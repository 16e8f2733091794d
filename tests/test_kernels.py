"""The Triton kernels of the K/V cache writes (`catprune.kernels`) against the torch functions they replace: the
scatters and the forecast's advance bit for bit, the extrapolation within rounding and exact where the ratio is 0.

Without a GPU the kernels run through Triton's interpreter in a subprocess (``TRITON_INTERPRET=1``: the variable
must be set before Triton compiles them); on a CUDA machine also natively in bfloat16, and through a whole forecast
generation against ``CATPRUNE_TRITON=0``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catprune import kernels
from catprune.algorithm import advance_kv_, extrapolate_, scatter_tokens_

HERE = Path(__file__).resolve().parent


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _six_steps(model, inputs: dict) -> torch.Tensor:
    """Six Euler-like steps of ``model`` on CUDA from ``inputs`` (batch 2): the final latents."""
    x = inputs["hidden_states"]
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0, 600.0, 500.0, 400.0):
            x = x - 0.1 * model(**dict(inputs, hidden_states=x), timestep=torch.full((2,), t, device="cuda"))[0]
    return x


def compare(device: str, dtype: torch.dtype, tolerance: float) -> None:
    """Kernels vs torch on random caches with a text tail, fresh rows as strided views of a packed projection."""
    torch.manual_seed(0)
    b, m, t, heads, hd, k = 2, 37, 5, 3, 8, 11
    full = torch.randn(2, b, m + t, heads, hd, device=device).to(dtype)
    prev = torch.randn(2, b, m, heads, hd, device=device).to(dtype)
    idx = torch.stack([torch.randperm(m, device=device)[:k] for _ in range(b)])  # (B, k)
    ratio = torch.rand(b, m, device=device) * 1.5
    ratio.scatter_(1, idx, 0.0)
    ratio[1, :4] = 0.0  # unselected tokens without a slope: their K1 exactly
    computed = torch.zeros(b, m, dtype=torch.uint8, device=device).scatter_(1, idx, 1)  # rows the kernel skips
    packed = torch.randn(b, k, 3, heads, hd, device=device).to(dtype)
    views = (packed[:, :, 0], packed[:, :, 1]), (packed[:, :, 1].contiguous(), packed[:, :, 2].contiguous())
    for fresh, skip in ((views[0], None), (views[1], None), (views[0], computed)):
        assert kernels.available(*(x[j, :, :m] for x in (full,) for j in range(2)), *fresh)
        kv_a, prev_a, out_a = full.clone(), prev.clone(), torch.full_like(full, float("nan"))
        kv_b, prev_b, out_b = full.clone(), prev.clone(), torch.zeros_like(full)
        out_a[:, :, m:] = 0.0  # the text tail, which the kernels leave alone; NaN wherever an image row is not written
        kernels.forecast_kv_(kv_a[:, :, :m], prev_a, out_a[:, :, :m], ratio, idx, fresh, skip)
        advance_kv_(kv_b[:, :, :m], prev_b, idx, fresh)
        extrapolate_(out_b[:, :, :m], kv_b[:, :, :m], prev_b, ratio)
        assert torch.equal(kv_a, kv_b) and torch.equal(prev_a, prev_b)  # K0 / K1 bit for bit, text tail untouched
        assert torch.equal(out_a[:, :, m:], out_b[:, :, m:])  # the kernel writes image rows only
        exact = (ratio == 0)[None, :, :, None, None].expand_as(out_a[:, :, :m])
        assert torch.equal(out_a[:, :, :m][exact], out_b[:, :, :m][exact])  # fresh rows and rows without a slope
        scale = out_b.float().abs().max()
        assert (out_a.float() - out_b.float()).abs().max() <= tolerance * scale
        kv_a, prev_a, kv_b, prev_b = full.clone(), prev.clone(), full.clone(), prev.clone()
        assert kernels.advance_kv_rows_(kv_a[:, :, :m], prev_a, idx, fresh).data_ptr() == kv_a.data_ptr()
        advance_kv_(kv_b[:, :, :m], prev_b, idx, fresh)  # a full-selection step's advance, without the forecast
        assert torch.equal(kv_a, kv_b) and torch.equal(prev_a, prev_b) and not torch.equal(prev_a, prev)
        dst_a, dst_b = full[0].clone(), full[0].clone()
        kernels.scatter_rows_(dst_a[:, :m], idx, fresh[0])
        scatter_tokens_(dst_b[:, :m], idx, fresh[0])
        assert torch.equal(dst_a, dst_b)
        text = (packed[:, :t, 2], packed[:, 1 : t + 1, 0])  # (B, T, H, hd) strided views
        for cache, tail in ((full, text), (full[:, :, :m], None)):  # with a text tail and without one
            kv_a, kv_b = cache.clone(), cache.clone()
            assert kernels.write_step_kv_(kv_a, idx, fresh, tail)
            for j in range(2):
                scatter_tokens_(kv_b[j, :, :m], idx, fresh[j])
                if tail is not None:
                    kv_b[j, :, m:].copy_(tail[j])
            assert torch.equal(kv_a, kv_b) and not torch.equal(kv_a, cache)


def compare_fp8(device: str, dtype: torch.dtype) -> None:
    """The 8-bit cache kernels vs torch: scales bit for bit and untouched rows untouched; on CUDA the quantised
    bytes bit for bit too (round to nearest even on both sides; Triton's interpreter rounds float32 -> float8 wrongly
    at the edge of a binade, so it is not held to them); each dequantised value within one unit in the last place
    of ``dtype`` (one rounding instead of torch's two)."""
    from catprune.algorithm import bits, dequantize_rows_, quantize_rows

    torch.manual_seed(1)
    b, m, t, heads, hd, k = 2, 37, 5, 3, 8, 11
    data, scale = quantize_rows(torch.randn(2, b, m, heads, hd, device=device) * 4, torch.float8_e4m3fn)
    idx = torch.stack([torch.randperm(m, device=device)[:k] for _ in range(b)])  # (B, k)
    packed = (torch.randn(b, k, 3, heads, hd, device=device) * 3).to(dtype)
    fresh = (packed[:, :, 0], packed[:, :, 2])  # strided views, as the projections hand them over
    data_a, scale_a, data_b, scale_b = data.clone(), scale.clone(), data.clone(), scale.clone()
    assert kernels.quantize_scatter_(data_a, scale_a, idx, fresh)
    for j in range(2):
        q, q_scale = quantize_rows(fresh[j], torch.float8_e4m3fn)
        scatter_tokens_(bits(data_b[j]), idx, bits(q))
        scatter_tokens_(scale_b[j], idx, q_scale)
    assert torch.equal(scale_a, scale_b)
    picked = torch.zeros(b, m, dtype=torch.bool, device=device).scatter_(1, idx, True)[None].expand(2, b, m)
    assert torch.equal(bits(data_a)[~picked], bits(data_b)[~picked])
    if device != "cpu":
        assert torch.equal(bits(data_a), bits(data_b))
    out_a = torch.zeros(2, b, m + t, heads, hd, device=device, dtype=dtype)
    out_b = out_a.clone()
    kernels.dequantize_kv_(out_a[:, :, :m], data_b, scale_b)
    dequantize_rows_(out_b[:, :, :m], data_b, scale_b)
    assert torch.equal(out_a[:, :, m:], out_b[:, :, m:])  # the text tail untouched
    diff = (out_a.float() - out_b.float()).abs()
    assert (diff <= torch.finfo(dtype).eps * out_b.float().abs()).all()
    assert not torch.equal(out_a[:, :, :m], torch.zeros_like(out_a[:, :, :m]))


def test_torch_path_on_a_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("CATPRUNE_TRITON", raising=False)
    x = torch.zeros(1, 3, 2, 4)
    assert not kernels.available(x)
    monkeypatch.setenv("CATPRUNE_TRITON", "0")
    assert not kernels.available(x)
    assert not kernels.available(torch.zeros(3, 2, 4))  # not (B, N, H, hd)


def test_a_failing_kernel_falls_back_to_torch_once_with_a_warning(monkeypatch):
    """A Triton that cannot compile for the GPU must not break generation: one warning, the torch result, and the
    torch path from then on (checked on CPU tensors with a stand-in kernel module that raises)."""
    from catprune.kernels import kv as module

    class Broken:
        def __getattr__(self, name):
            raise RuntimeError(f"no kernel {name} for this device")

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the row checks accept CPU tensors
    monkeypatch.setenv("CATPRUNE_TRITON", "1")
    monkeypatch.setattr(module, "_triton", lambda: Broken())
    monkeypatch.setattr(module, "_FAILED", [])
    kv, prev = torch.randn(2, 2, 5, 2, 4), torch.randn(2, 2, 5, 2, 4)
    idx, ratio = torch.tensor([[0, 3], [1, 2]]), torch.full((2, 5), 0.5).scatter_(1, torch.tensor([[0, 3], [1, 2]]), 0.0)
    fresh = (torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4))
    expected_kv, expected_prev, expected = kv.clone(), prev.clone(), torch.empty_like(kv)
    advance_kv_(expected_kv, expected_prev, idx, fresh)
    extrapolate_(expected, expected_kv, expected_prev, ratio)
    assert module.available(kv[0])
    out = torch.empty_like(kv)
    with pytest.warns(RuntimeWarning, match="a Triton kernel failed .*no kernel extrapolate_rows.*torch path"):
        module.forecast_kv_(kv, prev, out, ratio, idx, fresh)
    assert torch.equal(out, expected) and torch.equal(kv, expected_kv) and torch.equal(prev, expected_prev)
    assert not module.available(kv[0])  # no second try, no second warning
    dst = torch.zeros(2, 5, 2, 4)
    assert torch.equal(module.scatter_rows_(dst, idx, fresh[0]), scatter_tokens_(torch.zeros(2, 5, 2, 4), idx, fresh[0]))


@pytest.mark.skipif(not _has_triton(), reason="Triton is not installed (a CPU-only torch build)")
def test_kernels_through_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CATPRUNE_TRITON": "1"}
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import torch, test_kernels as t; "
        "t.compare('cpu', torch.float32, 1e-6); t.compare('cpu', torch.float16, 4e-3); "
        "t.compare_fp8('cpu', torch.bfloat16); t.compare_fp8('cpu', torch.float32); print('compared')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and "compared" in out.stdout, out.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available() or not _has_triton(), reason="needs CUDA and Triton")
def test_kernels_on_cuda():
    compare("cuda", torch.bfloat16, 1e-2)
    compare("cuda", torch.float32, 1e-6)
    compare_fp8("cuda", torch.bfloat16)
    compare_fp8("cuda", torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available() or not _has_triton(), reason="needs CUDA and Triton")
def test_forecast_generation_with_and_without_the_kernels(monkeypatch):
    import catprune
    from catprune import CATConfig
    from catprune.models.testing import tiny_sd3_inputs, tiny_sd3_transformer

    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("CATPRUNE_TRITON", flag)
        model = tiny_sd3_transformer().to("cuda")
        inputs = {n: v.to("cuda") if torch.is_tensor(v) else v for n, v in tiny_sd3_inputs(model, 2, 16, 16).items()}
        for context, cache in (("reuse", None), ("extrapolate", None), ("reuse", "fp8")):
            catprune.apply(model, CATConfig(keep_ratio=0.4, start_step=3, context=context, cache_dtype=cache))
            x = _six_steps(model, inputs)
            outs.append(x)
            catprune.remove(model)
    triton_reuse, triton_forecast, triton_fp8, torch_reuse, torch_forecast, torch_fp8 = outs
    assert torch.equal(triton_reuse, torch_reuse)
    assert torch.allclose(triton_forecast, torch_forecast, atol=1e-4, rtol=1e-4)
    assert torch.allclose(triton_fp8, torch_fp8, atol=1e-4, rtol=1e-4)  # float32 model: one rounding vs two


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("context", ["reuse", "extrapolate"])
def test_graph_backend_matches_eager_on_cuda(context):
    """The CUDA-graph backend (full-selection reference / capture steps, graphs captured after a warm-up that must
    not advance the forecast's state, the kernels inside the graph) against the eager backend (hooked capture,
    torch path for nothing: the same kernels on CUDA), over two generations on the same buffers."""
    import catprune
    from catprune import CATConfig
    from catprune.models.testing import tiny_sd3_inputs, tiny_sd3_transformer

    model = tiny_sd3_transformer().to("cuda")
    inputs = {n: v.to("cuda") if torch.is_tensor(v) else v for n, v in tiny_sd3_inputs(model, 2, 16, 16).items()}
    outs = {}
    for backend in ("eager", "cudagraph"):
        catprune.apply(model, CATConfig(keep_ratio=0.4, start_step=3, context=context, backend=backend))
        for generation in range(2):
            x = _six_steps(model, inputs)
            outs[backend, generation] = x
        catprune.remove(model)
    scale = outs["eager", 0].abs().mean()
    assert torch.equal(outs["eager", 0], outs["eager", 1]) and torch.equal(outs["cudagraph", 0], outs["cudagraph", 1])
    assert torch.allclose(outs["cudagraph", 0], outs["eager", 0], atol=1e-4 * scale + 1e-5, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("selection", ["cat", "drift"])
def test_apply_remove_cycles_leave_no_gpu_memory_behind(selection):
    """``remove`` releases every graph, cache and buffer: after a first cycle (which may allocate process-wide
    library state once, e.g. a cuBLAS workspace for the graphs' stream), further apply / generate / remove cycles
    leave the allocated GPU memory exactly where it was."""
    import gc

    import catprune
    from catprune import CATConfig
    from catprune.models.testing import tiny_sd3_inputs, tiny_sd3_transformer

    model = tiny_sd3_transformer().to("cuda")
    inputs = {n: v.to("cuda") if torch.is_tensor(v) else v for n, v in tiny_sd3_inputs(model, 2, 16, 16).items()}

    def cycle():
        catprune.apply(model, CATConfig(keep_ratio=0.4, start_step=3, backend="cudagraph", selection=selection))
        x = _six_steps(model, inputs)
        catprune.remove(model)
        del x
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    first = cycle()
    assert [cycle() for _ in range(3)] == [first] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["eager", "cudagraph"])
def test_text_lane_on_its_own_stream_changes_no_bit(backend, monkeypatch):
    """SD3's pruned step with the text stream on a second CUDA stream (`Lanes`) against one stream: the same
    kernels on the same data, so equal bit for bit, in every one of three generations (a missing wait or a tensor
    freed too early across the streams shows as a difference that varies between runs)."""
    import catprune
    from catprune import CATConfig
    from catprune.adapters.sd3 import SD3Adapter
    from catprune.models.testing import tiny_sd3_inputs, tiny_sd3_transformer

    model = tiny_sd3_transformer(num_layers=3).to("cuda")
    inputs = {n: v.to("cuda") if torch.is_tensor(v) else v for n, v in tiny_sd3_inputs(model, 2, 32, 32).items()}
    outs = {}
    for two in (False, True):
        monkeypatch.setattr(SD3Adapter, "two_lanes", two)
        catprune.apply(model, CATConfig(keep_ratio=0.3, start_step=2, backend=backend))
        for generation in range(3):
            x = _six_steps(model, inputs)
            outs[two, generation] = x
        catprune.remove(model)
    assert all(torch.equal(outs[True, g], outs[False, 0]) for g in range(3))
    assert all(torch.equal(outs[False, g], outs[False, 0]) for g in range(3))
