"""The scoring phase: per method and image, fidelity to the reference and the model's own quality measures, read
only from the generation cache (so scoring can be re-run, or extended with new metrics, without generating again).

Fidelity: PSNR and SSIM to the dense image of the same seed (`catprune.evaluation.metrics`). Adherence: the
model's scorer from `catprune.evaluation.registry` (shapes: colour at cell and shape). Models of natural images:
CLIP score and FID when their weights are cached locally. LPIPS is not computed (see `metrics.lpips_status`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import metrics
from .files import load_images, write_json
from .settings import EvalSettings, reference_name
from .store import MethodCache, load_generation

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


def _metric_statuses(settings: EvalSettings) -> dict[str, metrics.MetricStatus]:
    statuses = {"lpips": metrics.lpips_status()}
    if settings.eval_model.learned_metrics:
        statuses["clip_score"] = metrics.clip_status()
        statuses["fid"] = metrics.fid_status()
    else:
        reason = f"not used on the {settings.eval_model.name} model (procedural images)"
        statuses["clip_score"] = metrics.MetricStatus("clip_score", False, reason)
        statuses["fid"] = metrics.MetricStatus("fid", False, reason)
    return statuses


def _score_method(name, images, reference, ref_name, prompts, settings, statuses) -> dict:
    per_image: dict[str, list] = {}
    summary: dict[str, float | None] = {}
    if reference is not None:
        p = metrics.psnr(images, reference)
        s = metrics.ssim(images, reference)
        per_image["psnr"] = p.tolist()
        per_image["ssim"] = s.tolist()
        summary["psnr"] = metrics.finite_mean(p.tolist())
        summary["psnr_identical"] = int(torch.isinf(p).sum())
        summary["ssim"] = float(s.mean())
        if statuses["fid"].available and name != ref_name:
            summary["fid_to_reference"] = metrics.fid(reference.cpu(), images.cpu())
    scorer = settings.eval_model.adherence
    if scorer is not None:
        adherence = scorer(images, prompts)
        summary.update(adherence["summary"])
        per_image.update(adherence["per_image"])
    if statuses["clip_score"].available:
        cs = metrics.clip_score(images.cpu(), prompts)
        per_image["clip_score"] = cs.tolist()
        summary["clip_score"] = float(cs.mean())
    return {"summary": summary, "per_image": per_image}


def _complete(caches: list[MethodCache], n: int, ref_name: str, only, log: Log) -> dict[str, MethodCache]:
    by_name = {c.method.name: c for c in caches}
    complete = {name: c for name, c in by_name.items() if c.complete(n)}
    for name in sorted(set(by_name) - set(complete)):
        log(f"[eval] {name}: images incomplete, not scored (run the generation phase again to finish it)")
    if only is not None:
        complete = {k: v for k, v in complete.items() if k in set(only) | {ref_name}}
    return complete


def score(
    out_dir: str | os.PathLike, log: Log = _print, only: Sequence[str] | None = None, device: str | None = None
) -> dict:
    """Scoring phase: per method and image, fidelity to the reference (PSNR, SSIM) and, where the model has a
    scorer, adherence to the prompt; on models of natural images CLIP score and FID where their weights are
    available. Reads only the generation cache. Writes and returns ``scores.json``.

    Args:
        out_dir: the evaluation folder.
        log: where progress lines go.
        only: score only these methods (default: every method with complete images).
        device: where the metrics run (default: the generation's device if it is available here, else the CPU;
            the adherence checker is much faster on a GPU).

    Example:
        >>> import tempfile
        >>> from catprune.models.shapes import build_random_shapes_pipeline
        >>> from catprune.evaluation import EvalSettings, generate, parse_methods
        >>> pipe = build_random_shapes_pipeline(num_layers=1, attention_head_dim=8, num_attention_heads=2)
        >>> settings = EvalSettings(model="shapes", num_prompts=2, steps=4, batch_size=2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = generate(settings, parse_methods("dense:2", 4), d, pipe=pipe, log=lambda s: None)
        ...     scores = score(d, log=lambda s: None)
        >>> sorted(scores["methods"]), scores["methods"]["dense-4"]["per_image"]["psnr"][0]
        (['dense-2', 'dense-4'], inf)
    """
    out = Path(out_dir)
    settings, caches, skipped = load_generation(out)
    prompts = settings.prompts()
    n = len(prompts)
    if device is None:
        cuda_here = torch.device(settings.device).type != "cuda" or torch.cuda.is_available()
        device = settings.device if cuda_here else "cpu"
    ref_name = reference_name(settings)
    complete = _complete(caches, n, ref_name, only, log)
    reference = None
    if ref_name in complete:
        reference = load_images([complete[ref_name].image_path(i) for i in range(n)]).to(device)  # (n, 3, H, W)
    else:
        log(f"[eval] reference {ref_name} missing: fidelity metrics (PSNR, SSIM) skipped")
    statuses = _metric_statuses(settings)
    for status in statuses.values():
        if not status.available:
            log(f"[eval] {status.name}: {status.reason}")
    results: dict[str, dict] = {}
    for i, (name, cache) in enumerate(complete.items(), start=1):
        log(f"[eval] score {i}/{len(complete)} {name} ...")
        images = load_images([cache.image_path(j) for j in range(n)]).to(device)  # (n, 3, H, W)
        results[name] = _score_method(name, images, reference, ref_name, prompts, settings, statuses)
        summary = results[name]["summary"]
        log(f"[eval] score {i}/{len(complete)} {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in summary.items()))
    scores = {
        "reference": ref_name if reference is not None else None,
        "num_prompts": n,
        "metrics": {k: v.to_dict() for k, v in statuses.items()},
        "adherence_keys": list(settings.eval_model.adherence_keys),
        "skipped_methods": skipped,
        "methods": results,
    }
    write_json(out / "scores.json", scores)
    return scores


def _fmt(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


__all__ = ["score"]
