"""Fused GPU kernels (Triton) for the per-step K/V cache work of a pruned step; every kernel has a pure-torch
equivalent in `catprune.algorithm`, which is what runs on a CPU, without Triton, or with ``CATPRUNE_TRITON=0``.

Nothing here imports Triton until a CUDA tensor asks for a kernel (`available`), so ``import catprune`` stays light.
"""

from .kv import (
    advance_kv_rows_,
    available,
    dequantize_kv_,
    forecast_kv_,
    quantize_scatter_,
    scatter_rows_,
    write_step_kv_,
)

__all__ = [
    "advance_kv_rows_",
    "available",
    "dequantize_kv_",
    "forecast_kv_",
    "quantize_scatter_",
    "scatter_rows_",
    "write_step_kv_",
]
