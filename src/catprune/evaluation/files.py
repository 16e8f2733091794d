"""File I/O of the evaluation: atomic JSON / text writes, PNG images in and out.

Every file the evaluation writes goes through a temporary file and ``os.replace``, so an interrupted run never
leaves a half-written ``batches.json`` or ``scores.json`` behind (a resumed run trusts what it finds).

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     write_json(Path(d) / "a.json", {"x": 1})
    ...     read_json(Path(d) / "a.json"), read_json(Path(d) / "missing.json", default={})
    ({'x': 1}, {})
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file next to it, then ``os.replace``)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    """Write ``data`` as indented JSON, atomically (values JSON cannot hold are written with ``str``)."""
    write_text(path, json.dumps(data, indent=1, default=str))


def read_json(path: Path, default=None):
    """The JSON content of ``path``, or ``default`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def save_png(image: torch.Tensor, path: Path) -> None:
    """Save one image (3, H, W) with values in [0, 1] as an 8-bit PNG.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_png(torch.full((3, 2, 2), 0.5), Path(d) / "x.png")
        ...     load_images([Path(d) / "x.png"])[0, 0, 0, 0].item()
        0.501960813999176
    """
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def load_images(paths: Sequence[Path]) -> torch.Tensor:
    """Load PNGs into a float tensor (N, 3, H, W) in [0, 1].

    Example:
        >>> load_images([]).shape
        torch.Size([0, 3, 0, 0])
    """
    from PIL import Image

    if not paths:
        return torch.zeros(0, 3, 0, 0)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)


__all__ = ["load_images", "read_json", "save_png", "write_json", "write_text"]
