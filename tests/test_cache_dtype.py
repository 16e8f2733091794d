"""Low-precision cache storage (``CATConfig.cache_dtype``): the field, the contract over every model family (tiny
random models, CPU, fp32), the bytes it saves, batch invariance of the per-token fp8 scales, and the quantiser."""

import pytest
import torch

from catprune import CacheDtype, CATConfig
from catprune.algorithm import dequantize_rows_, quantize_rows


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
