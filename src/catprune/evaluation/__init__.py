"""Evaluation: quality against speed for CAT Pruning, dense with fewer steps, ablations, baselines and peers.

``catprune eval`` (see docs/evaluation.md) is built from these modules:

- `settings`: `EvalSettings`, what an evaluation generates;
- `registry`: per-model plug-ins (pipeline loader, held-out prompts, adherence scorer);
- `methods`: what is compared (dense, fewer steps, CAT, ablations, baselines, peers) and the presets;
- `harness`: the generation phase (timed, interleaved, resumable);
- `introspect`: what the harness reads from the catprune runtime (token selections, MACs), in one place;
- `store`: the on-disk generation cache; `files`: atomic JSON writes, PNG I/O;
- `scoring`: the scoring phase; `metrics`: PSNR, SSIM, optional learned metrics;
- `compare`: the result rows and the comparisons of CAT with its alternatives;
- `figures`: Pareto plots, image grids, selection heat maps; `report`: results.json, results.csv, report.html;
- `adherence`: the shapes model's prompt-adherence checker; `peers`: other libraries' accelerators;
- `machine`: the environment report and the CUDA synchronisation helper.
"""

from .files import load_images
from .harness import generate
from .machine import cuda_sync, environment
from .methods import Method, default_methods, parse_methods, quick_methods
from .metrics import psnr, ssim
from .report import write_report
from .scoring import score
from .settings import EvalSettings
from .store import load_generation

__all__ = [
    "EvalSettings",
    "Method",
    "cuda_sync",
    "default_methods",
    "environment",
    "generate",
    "load_generation",
    "load_images",
    "parse_methods",
    "psnr",
    "quick_methods",
    "score",
    "ssim",
    "write_report",
]
