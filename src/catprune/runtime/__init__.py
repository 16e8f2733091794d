"""Per-generation runtime state (step counter, caches, staleness) and its accounting."""

from .engine import Runtime
from .stats import PruneStats, StepRecord

__all__ = ["PruneStats", "Runtime", "StepRecord"]
