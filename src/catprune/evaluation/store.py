"""The resumable generation store: per method, its images, per-batch timings and MACs, and selection counts.

Layout of an evaluation folder (named after the settings, see `EvalSettings.folder_name`)::

    settings.json                     the settings that produced the images, and the machine (environment)
    prompts.txt                       the prompts, one per line
    generation/<method>/method.json   the method and the image settings (together they key the cache)
    generation/<method>/status.json   {"skipped": false}, or {"skipped": true, "reason": ...}
    generation/<method>/batches.json  per batch: images, wall-clock seconds, MACs, peer statistics
    generation/<method>/images/00017.png      image of prompt 17 (seed = settings.seed + 17)
    generation/<method>/tokens.npz    catprune methods: per image, how many steps computed each token
    scores.json                       per method, per image: PSNR, SSIM, adherence, ... (`catprune.evaluation.scoring`)
    results.json, results.csv, report.html, plots/, grids/, heatmaps/   (see `catprune.evaluation.report`)

A method's folder is reused only while ``method.json`` matches the method and the image settings exactly; a batch
counts as done when ``batches.json`` lists it and all its images exist.

Example:
    >>> import tempfile
    >>> from catprune.evaluation.methods import Method
    >>> with tempfile.TemporaryDirectory() as d:
    ...     cache = open_cache(Path(d), Method.dense(4, 4), {"seed": 0}, force=False)
    ...     cache.record_batch(0, [0, 1], {"seconds": 1.0, "macs": 8})
    ...     cache.done_starts(), timing_summary(cache)["macs_per_image"]
    (set(), 4.0)
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import read_json, write_json
from .methods import Method, method_from_dict
from .settings import EvalSettings


@dataclass
class MethodCache:
    """The on-disk generation cache of one method."""

    root: Path
    method: Method

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def image_path(self, index: int) -> Path:
        return self.images_dir / f"{index:05d}.png"

    def batches(self) -> list[dict]:
        return read_json(self.root / "batches.json", default=[]) or []

    def record_batch(self, start: int, indices: list[int], record: dict) -> None:
        """Add (or replace) the batch starting at ``start`` in ``batches.json``."""
        batches = [b for b in self.batches() if b["start"] != start]
        batches.append({"start": start, "indices": indices, **record})
        write_json(self.root / "batches.json", sorted(batches, key=lambda b: b["start"]))

    def tokens(self) -> dict | None:
        path = self.root / "tokens.npz"
        if not path.is_file():
            return None
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    def save_tokens(self, counts: np.ndarray, grid: tuple[int, int]) -> None:
        """Store the per-image token counts (N, M) and the token grid (h, w)."""
        np.savez_compressed(self.root / "tokens.npz", counts=counts, grid=np.array(grid))

    def done_starts(self) -> set[int]:
        return {b["start"] for b in self.batches() if all(self.image_path(i).is_file() for i in b["indices"])}

    def status(self) -> dict | None:
        return read_json(self.root / "status.json")

    def set_status(self, skipped: bool, reason: str = "") -> None:
        write_json(self.root / "status.json", {"skipped": True, "reason": reason} if skipped else {"skipped": False})

    def complete(self, n: int) -> bool:
        """Whether the images of all ``n`` prompts exist."""
        return all(self.image_path(i).is_file() for i in range(n))


def open_cache(root: Path, method: Method, image_key: dict, force: bool) -> MethodCache:
    """The cache of ``method`` under ``root/generation``, emptied when its method or image settings changed (or
    ``force``)."""
    cache = MethodCache(root / "generation" / method.name, method)
    stored = read_json(cache.root / "method.json")
    expected = {"method": method.to_dict(), "settings": image_key}
    if force or stored != expected:
        if cache.root.exists():
            shutil.rmtree(cache.root)
        cache.images_dir.mkdir(parents=True, exist_ok=True)
        write_json(cache.root / "method.json", expected)
    return cache


def load_counts(cache: MethodCache, n: int) -> dict:
    """The stored token counts of a method as ``{"counts": (n, M) array or None, "grid": (h, w) or None}``."""
    data = cache.tokens()
    if data is None or data["counts"].shape[0] != n:
        return {"counts": None, "grid": None}
    return {"counts": data["counts"], "grid": tuple(int(g) for g in data["grid"])}


def load_generation(out_dir: str | os.PathLike) -> tuple[EvalSettings, list[MethodCache], dict[str, str]]:
    """Read an evaluation folder: (settings, the methods' caches, {skipped method: reason})."""
    out = Path(out_dir)
    stored = read_json(out / "settings.json")
    if stored is None:
        raise ValueError(
            f"score: out_dir: expected an evaluation folder with settings.json (written by the generation phase), "
            f"got {str(out)!r}. Run `catprune eval --phase generate` first."
        )
    settings = EvalSettings(**stored["settings"])
    caches, skipped = [], {}
    root = out / "generation"
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        meta = read_json(folder / "method.json")
        if meta is None:
            continue
        cache = MethodCache(folder, method_from_dict(meta["method"]))
        status = cache.status() or {}
        if status.get("skipped"):
            skipped[cache.method.name] = status.get("reason", "")
        else:
            caches.append(cache)
    return settings, caches, skipped


def timing_summary(cache: MethodCache) -> dict:
    """Wall-clock and MACs per image of a method, from its cached batches."""
    batches = cache.batches()
    images = sum(len(b["indices"]) for b in batches)
    seconds = sum(b["seconds"] for b in batches)
    macs = [b.get("macs") for b in batches]
    out = {
        "images": images,
        "seconds_per_image": seconds / images if images else None,
        "macs_per_image": sum(macs) / images if images and all(m is not None for m in macs) else None,
        "macs_estimated": any(b.get("macs_estimated") for b in batches),
        "dense_macs_per_call": next(
            (b.get("dense_macs_per_call") for b in batches if b.get("dense_macs_per_call")), None
        ),
    }
    per_batch = [b["seconds"] / len(b["indices"]) for b in batches if b["indices"]]
    if len(per_batch) > 1:
        mean = sum(per_batch) / len(per_batch)
        var = sum((x - mean) ** 2 for x in per_batch) / (len(per_batch) - 1)
        out["seconds_per_image_batch_std"] = math.sqrt(var)
    peers = [b["peer"] for b in batches if b.get("peer")]
    if peers:
        out["cached_steps_per_call"] = sum(len(p["cached_steps"]) for p in peers) / len(peers)
    return out


__all__ = ["MethodCache", "load_counts", "load_generation", "open_cache", "timing_summary"]
