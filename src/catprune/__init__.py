"""catprune: Cluster-Aware Token Pruning (CAT Pruning) for diffusion transformers in Hugging Face diffusers.

Example:
    >>> import catprune
    >>> cfg = catprune.CATConfig(keep_ratio=0.3, start_step=8)
    >>> cfg.tokens_kept(4096)
    1229
"""

from .api import Observer, applied, apply, get_config, inspect, is_applied, observe, remove, reset, stats, step_kernels
from .config import Backend, CacheDtype, CATConfig, CFGMode, Context, Selection
from .models import load_pipeline
from .planner import Plan, plan
from .runtime import InspectView, PruneStats, StepRecord

__version__ = "0.1.0"

# --- shapes exports (owned by the embedded-model work; keep between these markers) ---
# --- end shapes exports ---

__all__ = [
    "Backend",
    "CacheDtype",
    "Context",
    "CATConfig",
    "CFGMode",
    "Selection",
    "InspectView",
    "Observer",
    "Plan",
    "PruneStats",
    "StepRecord",
    "__version__",
    "applied",
    "apply",
    "get_config",
    "inspect",
    "is_applied",
    "load_pipeline",
    "observe",
    "plan",
    "remove",
    "reset",
    "stats",
    "step_kernels",
]
