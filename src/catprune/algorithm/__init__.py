"""Pure-torch CAT Pruning algorithm: scoring, clustering, selection, gather/scatter. Never imports diffusers."""

from .forecast import advance_kv_, advance_times_, extrapolate_, forecast_ratio_
from .kmeans import cluster_features, grid_positions, kmeans, kmeans_init_uniforms
from .quant import bits, dequantize_rows_, is_scaled, quantize_rows
from .selection import (
    cluster_quotas,
    cluster_scores,
    drift_priority,
    ras_priority,
    select_tokens,
    token_change,
    topk_tokens,
    update_age,
    update_rate,
    update_staleness,
)
from .tokens import as_words, copy_tokens_, gather_tokens, scatter_tokens_, token_mask

__all__ = [
    "advance_kv_",
    "advance_times_",
    "bits",
    "dequantize_rows_",
    "is_scaled",
    "quantize_rows",
    "extrapolate_",
    "forecast_ratio_",
    "cluster_features",
    "cluster_quotas",
    "cluster_scores",
    "as_words",
    "copy_tokens_",
    "gather_tokens",
    "grid_positions",
    "kmeans",
    "kmeans_init_uniforms",
    "scatter_tokens_",
    "select_tokens",
    "ras_priority",
    "drift_priority",
    "token_change",
    "topk_tokens",
    "token_mask",
    "update_age",
    "update_rate",
    "update_staleness",
]
