"""Identity checker for the scenes world: which object of the vocabulary is in each cell that a caption names.

How it works (no learned weights, deterministic, fast on a CPU):

1. **Background.** The scenes background is a linear gradient, i.e. an affine function of the pixel position in
   each channel. It is fitted per image by least squares on all pixels, then refitted four times on the 55% of
   pixels that the current fit explains best (objects cover at most about a quarter of the image), so glyphs do not
   bias it.
2. **Crop.** For each object of the caption, a 44x44 crop centred on the named cell's centre: it holds a glyph of
   side up to 38 px at any jitter up to 3 px (pixels outside the image take the fitted background).
3. **Template matching.** Every atlas glyph, at sides 34, 36 and 38 px and at every position inside the crop, is
   composited over the fitted background and compared with the crop by the sum of squared differences. All
   positions of all glyphs come out of one ``conv2d`` (the squared error expands into correlations of
   background/crop maps with alpha/colour maps). The object with the smallest error over sides and positions is the
   answer; ``top1`` is the fraction of objects whose answer is the caption's name.

On rendered ground truth (the world's own renderer, random sides, jitters and backgrounds) top-1 is 1.000; the test
asserts >= 0.98. Shuffling captions against images gives about 1/150.

Example:
    >>> from catprune.models.scenes import render_captions
    >>> captions = ["an owl at the top left and a taxi at the center"]
    >>> check_identity(render_captions(captions, seed=0), captions).top1
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..models.scenes.world import (
    IMAGE_SIZE,
    OBJECT_NAMES,
    SIDES,
    cell_centre,
    glyph_bank,
    parse_caption,
    random_captions,
)
from ..models.shapes.world import CELLS

#: Seed and size of the 200 held-out evaluation captions of the scenes model (never seen in training).
HELD_OUT_CAPTION_SEED = 30_000
HELD_OUT_NUM_CAPTIONS = 200
#: Captions used to pick the training run's weights and default guidance (not the held-out ones).
VALIDATION_CAPTION_SEED = 31_000
#: Eight fixed captions for the fast CPU check of the shipped model (also kept out of training).
QUICK_CHECK_CAPTIONS: tuple[str, ...] = (
    "an owl at the center",
    "a taxi at the top left",
    "a red apple at the bottom right and a penguin at the top",
    "a guitar at the left and a sunflower at the right",
    "a hamburger at the bottom left and an elephant at the top right",
    "a rocket at the top and a cactus at the bottom and a crab at the center",
    "a teddy bear at the right and a watermelon at the bottom",
    "a delivery truck at the bottom and an octopus at the top left and a crown at the right",
)
CROP = 44  # side of the crop around a cell centre: a 38 px glyph at any jitter up to 3 px fits
TEMPLATE_SIDES = (34, 36, 38)
_FIT_KEEP = 0.55
_FIT_ROUNDS = 4


@dataclass
class IdentityResult:
    """One object of one caption: the named object and cell, and what the checker found there."""

    image: int
    name: str
    cell: str
    found: str
    error: float  # mean squared error per pixel and channel of the best template
    correct: bool


@dataclass
class IdentityReport:
    """Per-object results; ``top1`` is the fraction of objects whose named cell shows the named object."""

    objects: list[IdentityResult] = field(default_factory=list)

    @property
    def top1(self) -> float:
        return float(np.mean([o.correct for o in self.objects])) if self.objects else float("nan")

    def summary(self) -> dict:
        return {"identity_top1": round(self.top1, 4), "objects": len(self.objects)}


def as_image_batch(images) -> torch.Tensor:
    """PIL images, a numpy array (B, H, W, 3) or a tensor (B, 3, H, W), values in [0, 1] (or uint8), to a float
    tensor (B, 3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return x / 255.0 if images.dtype == torch.uint8 else x
    if isinstance(images, np.ndarray):
        arr = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
        arr = arr[None] if arr.ndim == 3 else arr
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    raise TypeError(
        f"images: expected a list of PIL images, a numpy array (B, H, W, 3) or a tensor (B, 3, H, W), got "
        f"{type(images).__name__}."
    )


def fit_background(images: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Robust per-channel affine fit of the backgrounds of ``images`` (B, 3, H, W); returns the fitted planes on a
    grid extended by ``pad`` pixels each side: (B, 3, H + 2 pad, W + 2 pad).

    Example:
        >>> from catprune.models.scenes.world import render_background, sample_scenes
        >>> bg = render_background(sample_scenes(2, generator=0))
        >>> bool((fit_background(bg) - bg).abs().max() < 1e-3)
        True
    """
    b, c, h, w = images.shape
    dev = images.device
    ys = (torch.arange(h, device=dev, dtype=torch.float32) - (h - 1) / 2) / h
    xs = (torch.arange(w, device=dev, dtype=torch.float32) - (w - 1) / 2) / w
    basis = torch.stack([torch.ones(h, w, device=dev), xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)])
    basis = basis.view(3, -1)  # (3, P)
    target = images.float().reshape(b, c, -1)  # (B, C, P)
    weight = torch.ones(b, h * w, device=dev)  # (B, P)
    eye = 1e-6 * torch.eye(3, device=dev)
    for round_ in range(_FIT_ROUNDS + 1):
        gram = torch.einsum("bp,ip,jp->bij", weight, basis, basis) + eye  # (B, 3, 3)
        rhs = torch.einsum("bp,ip,bcp->bci", weight, basis, target)  # (B, C, 3)
        coef = torch.linalg.solve(gram.unsqueeze(1), rhs.unsqueeze(-1)).squeeze(-1)  # (B, C, 3)
        if round_ == _FIT_ROUNDS:
            break
        residual = (target - coef @ basis).abs().sum(dim=1)  # (B, P)
        limit = residual.quantile(_FIT_KEEP, dim=1, keepdim=True)
        weight = (residual <= limit).float()
    ys = (torch.arange(-pad, h + pad, device=dev, dtype=torch.float32) - (h - 1) / 2) / h
    xs = (torch.arange(-pad, w + pad, device=dev, dtype=torch.float32) - (w - 1) / 2) / w
    hp, wp = h + 2 * pad, w + 2 * pad
    grid = torch.stack([torch.ones(hp, wp, device=dev), xs.view(1, wp).expand(hp, wp), ys.view(hp, 1).expand(hp, wp)])
    return (coef @ grid.view(3, -1)).view(b, c, hp, wp)


@lru_cache(maxsize=4)
def _filters(device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per template side: conv weights (N, 12, s, s) and the constant sum of squared premultiplied colour (N,)."""
    bank = glyph_bank(device)  # (len(SIDES), N, 4, 38, 38) premultiplied
    weights, constants = [], []
    for s in TEMPLATE_SIDES:
        glyphs = bank[SIDES.index(s), :, :, :s, :s]  # (N, 4, s, s)
        p, a = glyphs[:, :3], glyphs[:, 3:]
        # input channels: [bg^2 (3), bg (3), d*bg (3), d (3)] where d = crop - bg
        weight = torch.cat([(a * a).expand(-1, 3, -1, -1), -2 * a * p, (2 * a).expand(-1, 3, -1, -1), -2 * p], dim=1)
        weights.append(weight.contiguous())
        constants.append((p * p).sum(dim=(1, 2, 3)))
    return weights, constants


def _crops(images: torch.Tensor, background: torch.Tensor, cells: torch.Tensor, rows: torch.Tensor, pad: int):
    """Crops (M, 3, CROP, CROP) of the images and of the backgrounds around the cells' centres."""
    padded = background.clone()
    padded[:, :, pad : pad + IMAGE_SIZE, pad : pad + IMAGE_SIZE] = images
    cy, cx = cell_centre(cells)
    y0 = torch.floor(cy - CROP / 2 + 0.5).long() + pad
    x0 = torch.floor(cx - CROP / 2 + 0.5).long() + pad
    offsets = torch.arange(CROP, device=images.device)
    yy = (y0.view(-1, 1) + offsets).view(-1, 1, CROP, 1).expand(-1, 3, CROP, CROP)
    xx = (x0.view(-1, 1) + offsets).view(-1, 1, 1, CROP).expand(-1, 3, CROP, CROP)
    flat_y = yy * padded.shape[-1] + xx  # (M, 3, CROP, CROP) index into H*W

    def take(t: torch.Tensor) -> torch.Tensor:
        src = t[rows].reshape(len(rows), 3, -1)  # (M, 3, Hp*Wp)
        return src.gather(2, flat_y.reshape(len(rows), 3, -1)).view(len(rows), 3, CROP, CROP)

    return take(padded), take(background)


@contextmanager
def _full_precision():
    """TF32 off (the squared-error expansion subtracts large terms; TF32 rounding could flip close calls)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@torch.no_grad()
@_full_precision()
def identify(images, cells: Sequence[int] | torch.Tensor, rows: Sequence[int] | torch.Tensor, batch_size: int = 64):
    """For each (row, cell): index of the atlas object that best explains that cell of ``images[row]`` and the mean
    squared error of its best fit. Returns ``(objects (M,) long, errors (M,) float)``."""
    x = as_image_batch(images)
    if tuple(x.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"images: expected {IMAGE_SIZE}x{IMAGE_SIZE} RGB images (the scenes world), got shape {tuple(x.shape)}."
        )
    device = x.device
    cells = torch.as_tensor(cells, dtype=torch.long, device=device)
    rows = torch.as_tensor(rows, dtype=torch.long, device=device)
    pad = CROP // 2
    background = fit_background(x, pad=pad)  # (B, 3, Hp, Wp)
    weights, constants = _filters(str(device))
    best_obj, best_err = [], []
    for start in range(0, len(rows), batch_size):
        crop, bg = _crops(x, background, cells[start : start + batch_size], rows[start : start + batch_size], pad)
        d = crop - bg
        features = torch.cat([bg * bg, bg, d * bg, d], dim=1)  # (m, 12, CROP, CROP)
        base = (d * d).sum(dim=(1, 2, 3))  # (m,)
        err = None
        for weight, const in zip(weights, constants, strict=True):
            sse = F.conv2d(features, weight).flatten(2).amin(dim=2) + const  # (m, N)
            err = sse if err is None else torch.minimum(err, sse)
        err = (err + base.view(-1, 1)) / (3 * CROP * CROP)
        value, index = err.min(dim=1)
        best_obj.append(index)
        best_err.append(value)
    if not best_obj:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(best_obj).cpu(), torch.cat(best_err).cpu()


def check_identity(images, captions: Sequence[str], batch_size: int = 64) -> IdentityReport:
    """Score images against their captions: for every object of every caption, is the named object found in the
    named cell (top-1 among all ``OBJECT_NAMES``)?

    Args:
        images: B images (PIL list, numpy (B, H, W, 3) or tensor (B, 3, H, W) in [0, 1]), 128x128.
        captions: B captions of the scenes grammar (the empty caption contributes no object).
        batch_size: crops per ``conv2d`` call (memory only).

    Example:
        >>> from catprune.models.scenes import render_captions
        >>> report = check_identity(render_captions(["a cat at the top", "a dog at the left"], seed=1),
        ...                         ["a cat at the top", "a dog at the left"])
        >>> report.top1, len(report.objects)
        (1.0, 2)
    """
    x = as_image_batch(images)
    if len(captions) != x.shape[0]:
        raise ValueError(
            f"check_identity: got {x.shape[0]} images but {len(captions)} captions; pass one caption per image."
        )
    pairs = [(i, name, cell) for i, caption in enumerate(captions) for name, cell in parse_caption(caption)]
    if not pairs:
        return IdentityReport()
    objects, errors = identify(
        x, [CELLS.index(cell) for _, _, cell in pairs], [i for i, _, _ in pairs], batch_size=batch_size
    )
    report = IdentityReport()
    for (i, name, cell), o, e in zip(pairs, objects.tolist(), errors.tolist(), strict=True):
        found = OBJECT_NAMES[o]
        report.objects.append(IdentityResult(i, name, cell, found, float(e), found == name))
    return report


def held_out_captions() -> list[str]:
    """The 200 held-out evaluation captions (``random_captions(200, seed=30000)``)."""
    return random_captions(HELD_OUT_NUM_CAPTIONS, seed=HELD_OUT_CAPTION_SEED)


__all__ = [
    "HELD_OUT_CAPTION_SEED",
    "HELD_OUT_NUM_CAPTIONS",
    "QUICK_CHECK_CAPTIONS",
    "VALIDATION_CAPTION_SEED",
    "IdentityReport",
    "IdentityResult",
    "as_image_batch",
    "check_identity",
    "fit_background",
    "held_out_captions",
    "identify",
]
