"""Evaluation: quality against speed for CAT Pruning, dense with fewer steps, ablations, baselines and peers.

``catprune eval`` (see docs/evaluation.md) is built from these parts: `methods` (what is compared), `harness`
(generation with an on-disk cache, then scoring), `metrics` (PSNR, SSIM, optional learned metrics), `report`
(results.json, results.csv, report.html) and `adherence` (the shapes model's prompt-adherence checker).
"""

from .harness import EvalSettings, generate, load_generation, score
from .methods import Method, default_methods, parse_methods, quick_methods
from .metrics import psnr, ssim
from .report import write_report

__all__ = [
    "EvalSettings",
    "Method",
    "default_methods",
    "generate",
    "load_generation",
    "parse_methods",
    "psnr",
    "quick_methods",
    "score",
    "ssim",
    "write_report",
]
