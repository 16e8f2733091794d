"""Procedural prompt adherence for the shapes world (the embedded default model's quality measure).

For every object named in a caption, two questions:

- **colour_at_cell**: is there a connected region of the object's colour (RGB distance < 0.25) with at least 20 of
  its pixels inside the named cell?
- **shape**: does that region's shape match? The region is compared with ideal circle, square and triangle
  templates (fitted over radius and position, anchored on the region's bounding box so that objects clipped by the
  image border still fit), and the best intersection-over-union decides; it must also reach 0.5. A
  bounding-box fill ratio would not do: it fails on the many large objects clipped by the image border.

Two objects of the same colour are separated by the perpendicular bisector of their cell centres, and pixels of the
caption's other colours are left out of the fit (neither inside nor outside), so an object partly covered by the
other one still fits its template. On rendered ground truth both rates are above 0.99 (see tests/test_adherence.py).

Example:
    >>> from catprune.models.shapes.world import render_captions
    >>> captions = ["a large red circle at the top left and a small blue square at the center"]
    >>> report = check_adherence(render_captions(captions, seed=0), captions)
    >>> report.colour_at_cell, report.shape
    (1.0, 1.0)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..models.shapes.world import (
    CELLS,
    COLOURS,
    SHAPES,
    SQUARE_HALF_SIDE,
    TRIANGLE_BASE,
    TRIANGLE_HEIGHT,
    ShapeObject,
    cell_centre,
    parse_caption,
    random_captions,
    shape_distance,
)

COLOUR_TOLERANCE = 0.25  # RGB distance under which a pixel has the named colour
MIN_PIXELS = 20  # pixels of the region that must lie inside the named cell
MIN_SHAPE_IOU = 0.5  # the best template must overlap the region at least this well

#: Seed and size of the shapes model's held-out caption set (never seen in training). This seed is the one
#: held-out seed of the evaluation: `EvalSettings.prompt_seed` and ``catprune eval --prompt-seed`` default to it.
HELD_OUT_CAPTION_SEED = 20_000
HELD_OUT_NUM_CAPTIONS = 200

#: A fixed set of 16 captions for the fast CPU check of the shipped model: every colour, shape, size and cell
#: appears, 8 captions with one object and 8 with two.
QUICK_CHECK_CAPTIONS: tuple[str, ...] = (
    "a large red circle at the center",
    "a small green square at the top left",
    "a large blue triangle at the bottom right",
    "a large yellow square at the top",
    "a small purple circle at the left",
    "a large orange triangle at the right",
    "a large black circle at the bottom left",
    "a small cyan square at the top right",
    "a large red square at the top left and a small blue circle at the bottom right",
    "a small green triangle at the center and a large orange circle at the top right",
    "a large purple square at the bottom and a small yellow triangle at the top",
    "a large cyan circle at the left and a large black square at the right",
    "a small orange square at the bottom left and a large green circle at the center",
    "a large blue circle at the top and a small red triangle at the bottom",
    "a small black triangle at the right and a large cyan triangle at the left",
    "a large yellow circle at the bottom right and a small purple square at the top left",
)

_HALF_EXTENT = {  # half width, half height of each template's bounding box, in units of r
    "circle": (1.0, 1.0),
    "square": (SQUARE_HALF_SIDE, SQUARE_HALF_SIDE),
    "triangle": (0.5 * TRIANGLE_BASE, 0.5 * TRIANGLE_HEIGHT),
}
_RADII = torch.exp(torch.linspace(math.log(0.05), math.log(0.30), 16))  # coarse radius grid, ratio ~1.13


@dataclass
class ObjectResult:
    """The verdict for one object of one caption."""

    image_index: int
    object: ShapeObject
    pixels_in_cell: int
    colour_at_cell: bool
    predicted_shape: str | None
    shape_iou: float
    shape: bool


@dataclass
class AdherenceReport:
    """Per-object verdicts and the two rates (fractions of all objects of all captions)."""

    objects: list[ObjectResult] = field(default_factory=list)

    @property
    def num_objects(self) -> int:
        return len(self.objects)

    @property
    def colour_at_cell(self) -> float:
        return sum(o.colour_at_cell for o in self.objects) / max(1, len(self.objects))

    @property
    def shape(self) -> float:
        return sum(o.shape for o in self.objects) / max(1, len(self.objects))

    def summary(self) -> dict[str, float]:
        """``{"colour_at_cell": ..., "shape": ..., "num_objects": ...}``."""
        return {"colour_at_cell": self.colour_at_cell, "shape": self.shape, "num_objects": self.num_objects}


def to_image_tensor(images) -> torch.Tensor:
    """Convert images to a float tensor (B, 3, H, W) in [0, 1].

    Accepts a tensor (B, 3, H, W) or (3, H, W) in [0, 1], a numpy array (B, H, W, 3) or (H, W, 3) (float in [0, 1]
    or uint8), a PIL image or a list of PIL images.

    Example:
        >>> to_image_tensor(np.zeros((2, 8, 8, 3), dtype=np.uint8)).shape
        torch.Size([2, 3, 8, 8])
    """
    if isinstance(images, torch.Tensor):
        x = images.detach().float()
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be a tensor (B, 3, H, W) or (3, H, W), got shape {tuple(images.shape)}.")
        return x
    if isinstance(images, np.ndarray):
        x = images
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be an array (B, H, W, 3) or (H, W, 3), got shape {images.shape}.")
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    if not isinstance(images, (list, tuple)):
        images = [images]
    arrays = []
    for image in images:
        if not hasattr(image, "convert"):
            raise TypeError(
                "images must be a tensor, a numpy array, a PIL image or a list of PIL images, "
                f"got a list holding {type(image).__name__}."
            )
        arrays.append(np.asarray(image.convert("RGB")))
    return to_image_tensor(np.stack(arrays))


def connected_components(mask: torch.Tensor, max_iterations: int = 1024) -> torch.Tensor:
    """8-connected component labels of boolean masks (N, H, W); 0 is background, other labels are arbitrary ints.

    Example:
        >>> m = torch.tensor([[[1, 1, 0, 0, 1]]], dtype=torch.bool)
        >>> labels = connected_components(m)
        >>> int(labels[0, 0, 0]) == int(labels[0, 0, 1]) != int(labels[0, 0, 4])
        True
    """
    n, h, w = mask.shape
    index = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, h, w)
    labels = torch.where(mask, index, torch.zeros((), device=mask.device))  # (N, H, W)
    maskf = mask.float()
    for _ in range(max_iterations):
        # Max-label propagation: every pixel of a component converges to the component's largest index.
        grown = F.max_pool2d(labels.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * maskf  # (N, H, W)
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def _cell_bounds(cell: str, h: int, w: int) -> tuple[int, int, int, int]:
    """Pixel rows [y0, y1) and columns [x0, x1) whose centres lie inside a named cell."""
    row, col = divmod(CELLS.index(cell), 3)
    y0, y1 = math.ceil(row * h / 3 - 0.5), math.ceil((row + 1) * h / 3 - 0.5)
    x0, x1 = math.ceil(col * w / 3 - 0.5), math.ceil((col + 1) * w / 3 - 0.5)
    return y0, y1, x0, x1


def _grow(seed: torch.Tensor, mask: torch.Tensor, max_iterations: int = 1024) -> torch.Tensor:
    """Geodesic dilation: the 8-connected parts of ``mask`` (N, H, W) that touch ``seed`` (N, H, W)."""
    grown, maskf = seed.float(), mask.float()
    for _ in range(max_iterations):
        nxt = F.max_pool2d(grown.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * maskf  # (N, H, W)
        if torch.equal(nxt, grown):
            break
        grown = nxt
    return grown > 0


def find_regions(mask: torch.Tensor, cells: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each mask (N, H, W) and its named cell: the largest connected region inside the cell, grown to its
    full extent in the mask (it may reach out of the cell). Returns (regions (N, H, W) bool, pixels in cell (N,)).

    Example:
        >>> m = torch.zeros(1, 9, 9, dtype=torch.bool); m[0, 1:5, 1:4] = True
        >>> regions, counts = find_regions(m, ["top left"])
        >>> int(counts[0]), int(regions[0].sum())
        (4, 12)
    """
    n, h, w = mask.shape
    ch, cw = math.ceil(h / 3) + 1, math.ceil(w / 3) + 1
    crops = torch.zeros(n, ch, cw, dtype=torch.bool, device=mask.device)  # (N, ch, cw), zero-padded cell crops
    bounds = [_cell_bounds(cell, h, w) for cell in cells]
    for i, (y0, y1, x0, x1) in enumerate(bounds):
        crops[i, : y1 - y0, : x1 - x0] = mask[i, y0:y1, x0:x1]
    labels = connected_components(crops)  # (N, ch, cw), connectivity inside the cell only
    counts = torch.zeros(n, ch * cw + 1, device=mask.device)
    flat = labels.view(n, -1)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=counts.dtype))
    counts[:, 0] = 0
    best_count, best_label = counts.max(dim=1)  # (N,), (N,)
    seed_crops = (labels == best_label.view(n, 1, 1)) & (best_count.view(n, 1, 1) > 0)  # (N, ch, cw)
    seed = torch.zeros_like(mask)
    for i, (y0, y1, x0, x1) in enumerate(bounds):
        seed[i, y0:y1, x0:x1] = seed_crops[i, : y1 - y0, : x1 - x0]
    return _grow(seed, mask), best_count.long()


def _template_iou(
    shape: str,
    cx: torch.Tensor,
    cy: torch.Tensor,
    r: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
) -> torch.Tensor:
    """IoU (C,) of C templates (centres cx, cy and radii r, each (C,)) with ``target`` (h, w), over ``valid`` pixels.

    ``xs`` (w,) and ``ys`` (h,) are the pixel-centre coordinates of the window, as fractions of the image side.
    """
    h, w = target.shape
    xs, ys = xs.view(1, 1, w), ys.view(1, h, 1)
    inside = shape_distance(shape, xs - cx.view(-1, 1, 1), ys - cy.view(-1, 1, 1), r.view(-1, 1, 1)) > 0
    inside &= valid  # (C, H, W)
    inter = (inside & target).sum(dim=(1, 2))  # (C,)
    union = inside.sum(dim=(1, 2)) + target.sum() - inter  # (C,)
    return inter / union.clamp_min(1)


def _fit_shape(region: torch.Tensor, valid: torch.Tensor) -> tuple[str, float]:
    """Best-fitting template for one region (H, W) bool, counting only ``valid`` pixels. Returns (shape, IoU).

    A coarse search at half resolution over radii and centres anchored on the region's bounding box (the centre of
    the box, or one side of it when the other may be clipped by the border or covered by another object), then two
    rounds of local refinement at full resolution.
    """
    h, w = region.shape
    device = region.device
    rows = region.any(dim=1).nonzero().squeeze(1)
    cols = region.any(dim=0).nonzero().squeeze(1)
    top, bottom = rows.min().item() / h, (rows.max().item() + 1) / h
    left, right = cols.min().item() / w, (cols.max().item() + 1) / w
    target = region & valid  # (H, W)
    xs = (torch.arange(w, device=device) + 0.5) / w  # (W,) pixel centres
    ys = (torch.arange(h, device=device) + 0.5) / h  # (H,)
    # Half resolution for the coarse search: a pixel is set when most of its 2x2 block is.
    small_target = F.avg_pool2d(target.float()[None, None], 2)[0, 0] > 0.5  # (H/2, W/2)
    small_valid = F.avg_pool2d(valid.float()[None, None], 2)[0, 0] > 0.5  # (H/2, W/2)
    sh, sw = small_target.shape
    small_xs = (torch.arange(sw, device=device) + 0.5) / sw  # (W/2,)
    small_ys = (torch.arange(sh, device=device) + 0.5) / sh  # (H/2,)
    radii = _RADII.to(device)
    grid = torch.tensor([-1.0, 0.0, 1.0], device=device)
    offx, offy, offr = (t.reshape(-1) for t in torch.meshgrid(grid, grid, grid, indexing="ij"))  # (27,) each

    best_shape, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        half_w, half_h = _HALF_EXTENT[shape]
        cx = torch.stack([torch.full_like(radii, (left + right) / 2), left + half_w * radii, right - half_w * radii])
        cy = torch.stack([torch.full_like(radii, (top + bottom) / 2), top + half_h * radii, bottom - half_h * radii])
        cx = cx.view(3, 1, -1).expand(3, 3, -1).reshape(-1)  # (9R,)
        cy = cy.view(1, 3, -1).expand(3, 3, -1).reshape(-1)  # (9R,)
        r = radii.view(1, 1, -1).expand(3, 3, -1).reshape(-1)  # (9R,)
        if small_target.any():
            k = int(_template_iou(shape, cx, cy, r, small_target, small_valid, small_xs, small_ys).argmax())
        else:  # a tiny region: search at full resolution
            k = int(_template_iou(shape, cx, cy, r, target, valid, xs, ys).argmax())
        cx0, cy0, r0 = cx[k : k + 1], cy[k : k + 1], r[k : k + 1]
        score = float(_template_iou(shape, cx0, cy0, r0, target, valid, xs, ys)[0])
        for pixels in (1.0, 0.5):  # refinement: +-1 then +-0.5 pixel, radius +-4% then +-2%
            cand_x = cx0 + offx * pixels / w
            cand_y = cy0 + offy * pixels / h
            cand_r = r0 * (1 + offr * 0.04 * pixels)
            scores = _template_iou(shape, cand_x, cand_y, cand_r, target, valid, xs, ys)
            k = int(scores.argmax())
            if float(scores[k]) > score:
                cx0, cy0, r0, score = cand_x[k : k + 1], cand_y[k : k + 1], cand_r[k : k + 1], float(scores[k])
        if score > best_iou:
            best_shape, best_iou = shape, score
    return best_shape, best_iou


def check_adherence(
    images,
    captions: Sequence[str],
    colour_tolerance: float = COLOUR_TOLERANCE,
    min_pixels: int = MIN_PIXELS,
) -> AdherenceReport:
    """Score images against their shapes-world captions (colour_at_cell and shape, per object).

    Args:
        images: images in [0, 1]; see ``to_image_tensor`` for accepted types. Any square or rectangular size.
        captions: one caption of the shapes grammar per image.
        colour_tolerance: RGB distance under which a pixel has the named colour.
        min_pixels: pixels of the region that must lie inside the named cell.

    Returns:
        An ``AdherenceReport``; ``report.colour_at_cell`` and ``report.shape`` are fractions of all objects.

    Example:
        >>> from catprune.models.shapes.world import render_captions
        >>> check_adherence(render_captions(["a small red circle at the top"]), ["a small black circle at the top"]).shape
        0.0
    """
    x = to_image_tensor(images)  # (B, 3, H, W)
    if isinstance(captions, str):
        captions = [captions]
    if len(captions) != x.shape[0]:
        raise ValueError(
            f"check_adherence needs one caption per image: got {x.shape[0]} images and {len(captions)} captions."
        )
    _, _, h, w = x.shape
    device = x.device
    palette = {name: torch.tensor(rgb, device=device).view(3, 1, 1) for name, rgb in COLOURS.items()}
    yy = ((torch.arange(h, device=device) + 0.5) / h).view(h, 1)
    xx = ((torch.arange(w, device=device) + 0.5) / w).view(1, w)

    # One row per object: its colour mask (possibly split from a same-colour twin) and its ignored pixels.
    masks, ignores, cells, owners = [], [], [], []
    for i, caption in enumerate(captions):
        objects = parse_caption(caption)
        image = x[i]  # (3, H, W)
        near = {
            name: (image - palette[name]).norm(dim=0) < colour_tolerance for name in {o.colour for o in objects}
        }  # name -> (H, W) bool
        for obj in objects:
            mask = near[obj.colour].clone()
            ignore = torch.zeros(h, w, dtype=torch.bool, device=device)
            for other in objects:
                if other is obj:
                    continue
                if other.colour == obj.colour:
                    # Same colour: keep the pixels closer to this object's cell centre than to the other's.
                    (ax, ay), (bx, by) = cell_centre(obj.cell), cell_centre(other.cell)
                    mine = (xx - ax) ** 2 + (yy - ay) ** 2 < (xx - bx) ** 2 + (yy - by) ** 2  # (H, W)
                    ignore |= ~mine
                    mask &= mine
                else:
                    ignore |= near[other.colour]  # possible occluder: neither inside nor outside
            masks.append(mask)
            ignores.append(ignore & ~mask)
            cells.append(obj.cell)
            owners.append((i, obj))

    report = AdherenceReport()
    if not masks:
        return report
    with _single_cpu_thread(device):
        regions, counts = find_regions(torch.stack(masks), cells)  # (N, H, W), (N,)
        for n, (i, obj) in enumerate(owners):
            pixels = int(counts[n])
            colour_ok = pixels >= min_pixels
            predicted, score = None, 0.0
            if colour_ok:
                predicted, score = _fit_shape(regions[n], ~ignores[n])
            shape_ok = colour_ok and predicted == obj.shape and score >= MIN_SHAPE_IOU
            report.objects.append(ObjectResult(i, obj, pixels, colour_ok, predicted, score, shape_ok))
    return report


@contextlib.contextmanager
def _single_cpu_thread(device: torch.device):
    """Run the checker's many small CPU ops on one thread (restored afterwards).

    Why: the ops are far too small to gain from intra-op threads, and when another process keeps a core busy the
    thread pool's synchronisation made the checker ~25x slower (measured on a shared 2-core machine).
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class QualityResult:
    """The quality-bar measurement of a shapes pipeline."""

    colour_at_cell: float
    shape: float
    num_captions: int
    num_objects: int
    num_inference_steps: int
    guidance_scale: float
    report: AdherenceReport

    def summary(self) -> dict[str, float]:
        return {
            "colour_at_cell": self.colour_at_cell,
            "shape": self.shape,
            "num_captions": self.num_captions,
            "num_objects": self.num_objects,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
        }


def measure_shapes_quality(
    pipe,
    captions: Sequence[str] | None = None,
    num_captions: int = HELD_OUT_NUM_CAPTIONS,
    caption_seed: int = HELD_OUT_CAPTION_SEED,
    num_inference_steps: int = 28,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 50,
    show_progress: bool = False,
) -> QualityResult:
    """Generate one image per caption (dense, seeded) and score adherence: the quality bar of the shapes model.

    Image ``j`` uses a generator seeded ``seed + j`` on the pipeline's device, so results do not depend on
    ``batch_size``. With ``captions=None`` the held-out set ``random_captions(num_captions, caption_seed)`` is used.

    Example:
        >>> from catprune.models.shapes import build_random_shapes_pipeline
        >>> pipe = build_random_shapes_pipeline(num_layers=1, attention_head_dim=8, num_attention_heads=2)
        >>> result = measure_shapes_quality(pipe, captions=["a small red circle at the top"], num_inference_steps=2)
        >>> 0.0 <= result.colour_at_cell <= 1.0
        True
    """
    if captions is None:
        captions = random_captions(num_captions, seed=caption_seed)
    captions = list(captions)
    if guidance_scale is None:
        guidance_scale = pipe.default_guidance_scale
    device = pipe._execution_device
    images = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        generators = [torch.Generator(device=device).manual_seed(seed + start + j) for j in range(len(chunk))]
        pipe.set_progress_bar_config(disable=not show_progress)
        out = pipe(
            chunk,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pt",
        )
        images.append(out.images.float())
    report = check_adherence(torch.cat(images), captions)
    return QualityResult(
        colour_at_cell=report.colour_at_cell,
        shape=report.shape,
        num_captions=len(captions),
        num_objects=report.num_objects,
        num_inference_steps=num_inference_steps,
        guidance_scale=float(guidance_scale),
        report=report,
    )
