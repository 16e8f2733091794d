"""The output directory of a batch run: which items are finished, and the checks and ``run.json`` written before
the first image (see `catprune.batch.runner` for the files it holds)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from .io import atomic_write_json, clean_stale_temporaries, ensure_writable_dir, image_ok, read_json
from .plan import Batch
from .prompts import Item

if TYPE_CHECKING:
    from .runner import BatchOptions

FORMAT = "catprune-batch/1"


def expected_fields(item: Item, batch: Batch) -> dict:
    """The sidecar fields that identify an item's image."""
    return {
        "id": item.id,
        "prompt": item.prompt,
        "seed": item.seed,
        "negative_prompt": item.negative_prompt,
        "num_inference_steps": batch.steps,
        "guidance_scale": batch.guidance_scale,
    }


def item_done(out: Path, item: Item, batch: Batch, run_fingerprint: str) -> bool:
    """Whether ``item`` is finished in ``out``: sidecar parses and matches the item and the run, image decodes."""
    sidecar = read_json(out / f"{item.id}.json")
    if sidecar is None or sidecar.get("fingerprint") != run_fingerprint:
        return False
    if any(sidecar.get(key) != value for key, value in expected_fields(item, batch).items()):
        return False
    size = (sidecar.get("width"), sidecar.get("height"))
    return image_ok(out / f"{item.id}.png", size if None not in size else None)


def _describe_mismatch(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    parts = [f"{k}: directory {old.get(k)!r}, this run {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(parts) or "unknown difference"


def _remove_previous_outputs(out: Path, keep_fingerprint: str) -> int:
    """With ``overwrite``: delete the images and sidecars another run left (recognised by their sidecar)."""
    removed = 0
    for sidecar in out.glob("*.json"):
        if sidecar.name in ("run.json", "manifest.json"):
            continue
        data = read_json(sidecar)
        if data is None or data.get("format") != FORMAT or data.get("fingerprint") == keep_fingerprint:
            continue
        for path in (sidecar.with_suffix(".png"), sidecar):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        removed += 1
    return removed


def prepare_directory(options: BatchOptions) -> Path:
    """Rank 0, before any image: check the directory is writable and holds this run (or nothing), remove stale
    temporary files, write ``run.json``."""
    out = ensure_writable_dir(options.out)
    settings, fp = options.settings(), options.fingerprint()
    run_file = out / "run.json"
    previous = read_json(run_file) if run_file.exists() else None
    if run_file.exists() and previous is None and not options.overwrite:
        raise ValueError(
            f"--out: expected {run_file} to be a catprune run file, got an unreadable file. Remove it, choose "
            "another --out, or pass --overwrite."
        )
    if previous is not None and previous.get("fingerprint") != fp:
        if not options.overwrite:
            raise ValueError(
                f"--out: expected a directory of this run's settings or a new one, got {str(out)!r} with other "
                f"settings ({_describe_mismatch(previous.get('settings') or {}, settings)}). Re-run with the "
                "directory's settings to resume, choose another --out, or pass --overwrite to replace its images."
            )
    clean_stale_temporaries(out)
    if options.overwrite:
        _remove_previous_outputs(out, fp)
    if previous is None or previous.get("fingerprint") != fp:
        atomic_write_json(
            run_file,
            {
                "format": FORMAT,
                "fingerprint": fp,
                "settings": settings,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
    return out


__all__ = ["FORMAT", "expected_fields", "item_done", "prepare_directory"]
