"""Per-generation runtime state (step counter, caches, staleness), the adapter contract it drives, and accounting.

Imports nothing from `catprune.adapters`: adapters implement the contract defined in `contract.py`.
"""

from .backends import StepRunner
from .contract import Adapter, BufferStore, CallInfo, KVSlot
from .engine import Runtime, StepKernels
from .forecast import ContextForecast
from .generation import Generation
from .probe import PipelineProbe
from .stats import InspectView, PruneStats, StepRecord

__all__ = [
    "Adapter",
    "BufferStore",
    "CallInfo",
    "ContextForecast",
    "Generation",
    "InspectView",
    "KVSlot",
    "PipelineProbe",
    "PruneStats",
    "Runtime",
    "StepKernels",
    "StepRecord",
    "StepRunner",
]
