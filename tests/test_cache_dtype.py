"""Low-precision cache storage (``CATConfig.cache_dtype``): the field, the contract over every model family (tiny
random models, CPU, fp32), the bytes it saves, batch invariance of the per-token fp8 scales, and the quantiser."""

import pytest
import torch

from catprune import CacheDtype, CATConfig


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
