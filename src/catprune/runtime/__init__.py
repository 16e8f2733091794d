"""Per-generation runtime state (step counter, caches, staleness), the adapter contract it drives, and accounting.

Imports nothing from `catprune.adapters`: adapters implement the contract defined in `contract.py`.
"""

from .backends import StepRunner
from .contract import Adapter, BufferStore, CallInfo
from .engine import Runtime, StepKernels
from .generation import Generation
from .probe import PipelineProbe
from .stats import InspectView, PruneStats, StepRecord

__all__ = [
    "Adapter",
    "BufferStore",
    "CallInfo",
    "Generation",
    "InspectView",
    "PipelineProbe",
    "PruneStats",
    "Runtime",
    "StepKernels",
    "StepRecord",
    "StepRunner",
]
