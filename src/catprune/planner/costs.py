"""The planner's cost side: which measured model a transformer is, its token grid, MACs, and the step-time model.

A pruned step realises less than its MACs ratio (fixed costs: the text stream, attention over all keys, gathers and
scatters, kernel launches), so cost is counted in measured step times where the shipped tables have the model,
device kind and backend, and in analytic MACs otherwise.
"""

from __future__ import annotations

import importlib
import math
import statistics
from dataclasses import dataclass

import torch

from ..adapters import CallInfo, adapter_for
from ..config import CATConfig
from ..families import FAMILIES
from ..models import model_configs
from .tables import StepTimeRow

#: text tokens of one call when the model is not a known preset (CLIP + T5 for SD3, T5 for PixArt / Flux)
TEXT_TOKENS = {"sd3": 333, "pixart": 300, "flux": 512}
#: the embedded pixel-space models: table name -> (pipeline class, module with default_config())
EMBEDDED = {
    "shapes": ("ShapesPipeline", "catprune.models.shapes"),
    "scenes": ("ScenesPipeline", "catprune.models.scenes"),
}


def _embedded_config(name: str) -> dict:
    return importlib.import_module(EMBEDDED[name][1]).default_config()


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)
    return a == b


def family_of(model: torch.nn.Module) -> str:
    """The `catprune.families` name of ``model`` (TypeError from the adapter registry when unsupported)."""
    adapter = adapter_for(model)
    names = {c.__name__ for c in type(model).__mro__}
    for record in FAMILIES:
        if record.transformer_class in names:
            return record.name
    return type(adapter).__name__


def model_key(model: torch.nn.Module, pipe=None) -> str | None:
    """The name the tables use for ``model``: an embedded model (``"shapes"``, ``"scenes"``), a preset of
    `catprune.models.model_configs` whose config matches the model's, or None.

    Example:
        >>> from catprune.models.testing import tiny_sd3_transformer
        >>> model_key(tiny_sd3_transformer()) is None
        True
    """
    config = dict(getattr(model, "config", {}) or {})
    classes = {c.__name__ for c in type(model).__mro__}
    for name, (pipeline_class, _) in EMBEDDED.items():
        if pipe is not None and type(pipe).__name__ == pipeline_class:
            return name
    candidates = [(name, "SD3Transformer2DModel", _embedded_config(name)["transformer"]) for name in EMBEDDED]
    candidates += [(name, e["class"], e["config"]) for name, e in model_configs().items() if "config" in e]
    for name, cls, preset in candidates:
        if cls in classes and all(_same(config.get(k), v) for k, v in preset.items()):
            return name
    return None


def pixels_per_token(model: torch.nn.Module, pipe, family: str, key: str | None) -> int:
    """Image pixels per token side: the VAE's downsampling times the patch size (Flux packs 2x2 latents)."""
    if key in EMBEDDED:
        return int(model.config.patch_size)  # pixel space
    vae = getattr(pipe, "vae_scale_factor", None) or 8
    patch = 2 if family == "flux" else int(getattr(model.config, "patch_size", 2))
    return int(vae) * patch


def token_grid(model, pipe, family: str, key: str | None, height, width) -> tuple[tuple[int, int], tuple[int, int]]:
    """((h, w) token grid, (height, width) in pixels) of one image; the model's default size when not given."""
    ppt = pixels_per_token(model, pipe, family, key)
    if height is None or width is None:
        sample = getattr(model.config, "sample_size", None)
        if sample is None:  # Flux has no sample_size: its pipelines default to 1024 px
            default = 1024
        else:
            default = int(sample) * (1 if key in EMBEDDED else 8)  # sample_size counts latent pixels
        height, width = height or default, width or default
    return (max(1, height // ppt), max(1, width // ppt)), (int(height), int(width))


def text_tokens(family: str, key: str | None) -> int:
    if key in EMBEDDED:
        return int(_embedded_config(key)["text_encoder"]["max_length"])
    entry = model_configs().get(key or "", {})
    return int(entry.get("text_tokens", TEXT_TOKENS.get(family, 300)))


class MacsModel:
    """MACs of one pruned step over one dense step, from the family adapter's analytic cost model on the model."""

    def __init__(self, model: torch.nn.Module, grid: tuple[int, int], tokens: int):
        self.adapter = adapter_for(model)
        self.info = CallInfo({}, 1, grid, tokens, torch.zeros(()), torch.device("cpu"), torch.float32)
        self.dense = self.adapter.macs(self.info, self.info.num_tokens)

    def pruned_ratio(self, keep_ratio: float) -> float:
        """MACs of a pruned step at ``keep_ratio`` over a dense step."""
        k = CATConfig(keep_ratio=keep_ratio).tokens_kept(self.info.num_tokens)
        return self.adapter.macs(self.info, k) / self.dense


@dataclass(frozen=True)
class TimeModel:
    """Time of one pruned step over one dense step, as a function of the pruned step's MACs ratio.

    From measured rows: interpolated linearly in the MACs ratio between rows, and beyond them the nearest row's
    fixed overhead (time ratio minus MACs ratio) is kept. Without rows: the MACs ratio itself (the ideal).
    `for_context` keeps the rows measured with one ``CATConfig.context`` when there are any.

    Example:
        >>> row = dict(model="m", device="cuda", backend="cudagraph", height=8, width=8, batch=1, keep_ratio=0.3,
        ...            dense_ms=10.0, pruned_macs_ratio=0.3, source="bench")
        >>> tm = TimeModel((StepTimeRow(pruned_ms=5.0, **row), StepTimeRow(pruned_ms=6.0, context="extrapolate", **row)))
        >>> tm.for_context("extrapolate").step_ratio(0.3), tm.for_context("reuse").step_ratio(0.3)
        (0.6, 0.5)
    """

    rows: tuple[StepTimeRow, ...] = ()

    @property
    def measured(self) -> bool:
        return bool(self.rows)

    @property
    def contexts(self) -> tuple[str, ...]:
        """The ``CATConfig.context`` values the rows were measured with."""
        return tuple(sorted({r.context for r in self.rows}))

    def for_context(self, context: str) -> TimeModel:
        """The model from the rows measured with ``context``; all rows when none were (a pruned step's MACs do not
        depend on the context; the forecast reads and writes one more K/V copy per block)."""
        own = tuple(r for r in self.rows if r.context == context)
        return TimeModel(own) if own else self

    @property
    def source(self) -> str:
        if not self.rows:
            return "analytic MACs (no measured step times for this model, device and backend)"
        r = self.rows[0]
        where = f"{r.card or r.device}, {r.backend}, {r.width}x{r.height}, context {'/'.join(self.contexts)}"
        return f"measured step times of {r.model} ({where}): {'; '.join(sorted({x.source for x in self.rows}))}"

    def source_for(self, context: str | None) -> str:
        """`source`, saying when the pruned-step times of ``context`` were not measured and another's stand in."""
        if context is None or not self.rows or context in self.contexts:
            return self.source
        return f"{self.source} (pruned steps of context {context!r} not timed: the {'/'.join(self.contexts)} times)"

    def _points(self) -> list[tuple[float, float]]:
        by_macs: dict[float, list[float]] = {}
        for r in self.rows:
            by_macs.setdefault(round(r.pruned_macs_ratio, 4), []).append(r.pruned_ms / r.dense_ms)
        return sorted((m, statistics.median(v)) for m, v in by_macs.items())  # median of repeated cases

    def capture_ratio(self) -> float:
        """Time of a cache-filling full step (the capture; with the forecast also the reference step) over a dense
        step: the median of the rows that recorded it, else 1 (a dense step).

        Example:
            >>> row = dict(model="m", device="cuda", backend="b", height=8, width=8, batch=1, keep_ratio=0.3,
            ...            dense_ms=40.0, pruned_ms=16.0, pruned_macs_ratio=0.35, source="bench")
            >>> TimeModel((StepTimeRow(capture_ms=56.0, **row),)).capture_ratio(), TimeModel().capture_ratio()
            (1.4, 1.0)
        """
        ratios = [r.capture_ms / r.dense_ms for r in self.rows if r.capture_ms is not None]
        return statistics.median(ratios) if ratios else 1.0

    def step_ratio(self, macs_ratio: float) -> float:
        """Pruned-step time over dense-step time at a pruned-step MACs ratio ``macs_ratio``."""
        if macs_ratio >= 1.0:
            return 1.0
        points = self._points()
        if not points:
            return macs_ratio
        for (m0, t0), (m1, t1) in zip(points, points[1:], strict=False):
            if m0 <= macs_ratio <= m1:  # between two measured keep ratios: linear in the MACs ratio
                return t0 + (t1 - t0) * (macs_ratio - m0) / (m1 - m0)
        m, t = points[0] if macs_ratio < points[0][0] else points[-1]
        return max(macs_ratio + (t - m), 1e-3)  # beyond them: the nearest row's fixed overhead


def select_rows(rows, key: str | None, device: str, backend: str, size: tuple[int, int], batch: int = 1):
    """The step-time rows of ``key`` on ``device`` with ``backend`` at the measured resolution nearest to ``size``
    (and the batch nearest to ``batch``)."""
    rows = [r for r in rows if key is not None and r.model == key and r.device == device and r.backend == backend]
    if not rows:
        return ()
    pixels = size[0] * size[1]
    best = min(rows, key=lambda r: (abs(math.log(r.height * r.width / pixels)), abs(r.batch - batch)))
    return tuple(r for r in rows if (r.height, r.width, r.batch) == (best.height, best.width, best.batch))
