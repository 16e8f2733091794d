"""The procedural shapes world: caption grammar, random scenes and anti-aliased rendering.

The world is fixed so that quality numbers stay comparable across versions:

- 128x128 RGB images on a soft vertical gradient between two random light tones (every channel in [0.80, 1.00]).
- 1 or 2 objects, each in a different cell of a 3x3 grid, centred on the cell centre jittered by at most 4% of the
  image side (uniform in a disc of radius 0.04).
- shape in {circle, square, triangle (pointing up)}, size in {small, large} (radius 0.11 or 0.19 of the side; a
  square has half-side 0.85 r, a triangle height 1.7 r and base 2.2 r; every shape is centred on its bounding box).
- 8 named colours; captions ``a {size} {colour} {shape} at the {cell}``, two objects joined by `` and ``. The second
  object is drawn on top of the first.

Everything is batched torch so that training can render data on the fly on the GPU; the random choices are drawn on
the CPU from a ``torch.Generator`` so that a seed gives the same scenes on every device.

Example:
    >>> from catprune.models.shapes.world import random_captions, render_captions
    >>> captions = random_captions(4, seed=0)
    >>> images = render_captions(captions, seed=0)  # (4, 3, 128, 128), values in [0, 1]
    >>> tuple(images.shape)
    (4, 3, 128, 128)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

IMAGE_SIZE = 128
MAX_OBJECTS = 2
JITTER = 0.04  # largest distance of an object centre from its cell centre, as a fraction of the image side

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.11, "large": 0.19}  # radius as a fraction of the image side
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.6, 0.2, 0.75),
    "orange": (1.0, 0.55, 0.05),
    "black": (0.05, 0.05, 0.05),
    "cyan": (0.1, 0.85, 0.9),
}
# Cells in reading order; cell index = 3 * row + column.
CELLS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
SQUARE_HALF_SIDE = 0.85  # times r
TRIANGLE_HEIGHT = 1.7  # times r
TRIANGLE_BASE = 2.2  # times r
BACKGROUND_RANGE = (0.80, 1.00)

_SIZE_NAMES = tuple(SIZES)
_COLOUR_NAMES = tuple(COLOURS)
_OBJECT_RE = re.compile(
    r"^a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) at the (?P<cell>top left|top right|bottom left|bottom right|\w+)$"
)

#: Every word the caption grammar can produce, in a fixed order (the tokenizer's vocabulary).
VOCABULARY: tuple[str, ...] = (
    "a",
    "and",
    "at",
    "the",
    *_SIZE_NAMES,
    *_COLOUR_NAMES,
    *SHAPES,
    "top",
    "bottom",
    "left",
    "right",
    "center",
)


@dataclass(frozen=True)
class ShapeObject:
    """One object of a caption: ``ShapeObject("circle", "small", "red", "top left")``."""

    shape: str
    size: str
    colour: str
    cell: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.cell}"


def cell_centre(cell: str) -> tuple[float, float]:
    """Centre ``(x, y)`` of a named cell as fractions of the image side (y points down).

    Example:
        >>> cell_centre("top left")
        (0.16666666666666666, 0.16666666666666666)
    """
    index = CELLS.index(cell)
    row, col = divmod(index, 3)
    return (col + 0.5) / 3.0, (row + 0.5) / 3.0


def caption_for(objects: Sequence[ShapeObject]) -> str:
    """The caption of a scene: ``a {size} {colour} {shape} at the {cell}`` joined by `` and ``.

    Example:
        >>> caption_for([ShapeObject("circle", "small", "red", "top left")])
        'a small red circle at the top left'
    """
    return " and ".join(obj.phrase() for obj in objects)


def parse_caption(caption: str) -> list[ShapeObject]:
    """Parse a caption of the world grammar into its objects.

    Raises:
        ValueError: if ``caption`` does not follow the grammar, or names the same cell twice.

    Example:
        >>> parse_caption("a large blue square at the center and a small cyan triangle at the bottom right")[1]
        ShapeObject(shape='triangle', size='small', colour='cyan', cell='bottom right')
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}.")
    text = " ".join(caption.strip().lower().split())
    parts = text.split(" and ") if text else []
    objects = []
    for part in parts:
        match = _OBJECT_RE.match(part)
        ok = match is not None
        if ok:
            size, colour, shape, cell = match.group("size", "colour", "shape", "cell")
            ok = size in SIZES and colour in COLOURS and shape in SHAPES and cell in CELLS
        if not ok:
            raise ValueError(
                f"caption {caption!r} does not follow the shapes grammar: the part {part!r} is not of the form "
                f"'a {{size}} {{colour}} {{shape}} at the {{cell}}' with size in {list(SIZES)}, colour in "
                f"{list(COLOURS)}, shape in {list(SHAPES)} and cell in {list(CELLS)}. Join two objects with ' and '."
            )
        objects.append(ShapeObject(shape=shape, size=size, colour=colour, cell=cell))
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(
            f"caption {caption!r} names {len(objects)} objects; the shapes world has 1 to {MAX_OBJECTS} objects per "
            "image. Write one or two object phrases joined by ' and '."
        )
    cells = [obj.cell for obj in objects]
    if len(set(cells)) != len(cells):
        raise ValueError(
            f"caption {caption!r} puts two objects in the same cell ({cells}); every object needs its own cell."
        )
    return objects


@dataclass
class SceneBatch:
    """A batch of scenes as tensors (``B`` scenes, ``K = 2`` object slots), plus their captions.

    Attributes:
        present: (B, K) bool, whether the slot holds an object (slot 0 always does).
        shape, size, colour, cell: (B, K) long indices into ``SHAPES``, ``SIZES``, ``COLOURS`` and ``CELLS``.
        offset: (B, K, 2) float, centre jitter (dx, dy) as fractions of the image side.
        background: (B, 2, 3) float, the top and bottom tones of the background gradient.
        captions: list of B captions, or None when the scenes were sampled without them (on-device training).
    """

    present: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor
    colour: torch.Tensor
    cell: torch.Tensor
    offset: torch.Tensor
    background: torch.Tensor
    captions: list[str] | None = None

    _FIELDS = ("present", "shape", "size", "colour", "cell", "offset", "background")

    def __len__(self) -> int:
        return self.present.shape[0]

    def objects(self, index: int) -> list[ShapeObject]:
        """The objects of scene ``index``, in drawing order."""
        return _objects_from_lists(
            self.present[index].tolist(),
            self.shape[index].tolist(),
            self.size[index].tolist(),
            self.colour[index].tolist(),
            self.cell[index].tolist(),
        )

    def keys(self) -> torch.Tensor:
        """(B,) long: one integer per distinct caption (same objects in the same order <=> same key).

        Example:
            >>> a = scenes_from_captions(["a small red circle at the top"], generator=0)
            >>> b = scenes_from_captions(["a small red circle at the top"], generator=1)
            >>> bool(a.keys() == b.keys())
            True
        """
        code = ((self.shape * len(SIZES) + self.size) * len(COLOURS) + self.colour) * len(CELLS) + self.cell  # (B, K)
        span = len(SHAPES) * len(SIZES) * len(COLOURS) * len(CELLS)
        second = torch.where(self.present[:, 1], code[:, 1] + 1, torch.zeros_like(code[:, 1]))  # (B,)
        return code[:, 0] + span * second

    def where(self, mask: torch.Tensor, other: SceneBatch) -> SceneBatch:
        """Scenes taken from ``other`` where ``mask`` (B,) is True, else from ``self`` (captions are dropped)."""
        fields = {}
        for name in self._FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            m = mask.view(-1, *([1] * (mine.ndim - 1)))
            fields[name] = torch.where(m, theirs, mine)
        return SceneBatch(**fields, captions=None)

    def to(self, device) -> SceneBatch:
        return SceneBatch(**{n: getattr(self, n).to(device) for n in self._FIELDS}, captions=self.captions)


def _objects_from_lists(present, shape, size, colour, cell) -> list[ShapeObject]:
    return [
        ShapeObject(
            shape=SHAPES[shape[k]], size=_SIZE_NAMES[size[k]], colour=_COLOUR_NAMES[colour[k]], cell=CELLS[cell[k]]
        )
        for k in range(MAX_OBJECTS)
        if present[k]
    ]


def _as_generator(seed_or_generator: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    generator = torch.Generator(device="cpu")
    generator.manual_seed(0 if seed_or_generator is None else int(seed_or_generator))
    return generator


def _sample_layout(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random jitter offsets (B, K, 2) in a disc of radius JITTER and background tones (B, 2, 3)."""
    device = generator.device
    radius = JITTER * torch.rand(batch_size, MAX_OBJECTS, generator=generator, device=device).sqrt()  # (B, K)
    angle = 2 * math.pi * torch.rand(batch_size, MAX_OBJECTS, generator=generator, device=device)  # (B, K)
    offset = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=-1)  # (B, K, 2), uniform in the disc
    low, high = BACKGROUND_RANGE
    background = low + (high - low) * torch.rand(batch_size, 2, 3, generator=generator, device=device)  # (B, 2, 3)
    return offset, background


def sample_scenes(
    batch_size: int,
    generator: int | torch.Generator | None = None,
    exclude_captions: Iterable[str] | None = None,
    captions: bool = True,
) -> SceneBatch:
    """Draw ``batch_size`` random scenes on the generator's device (a seed means a CPU generator).

    Each scene has 1 or 2 objects (probability 1/2 each) in distinct cells; shape, size and colour are uniform.
    Scenes whose caption is in ``exclude_captions`` are redrawn until none is (used to hold evaluation captions out
    of training). ``captions=False`` skips building the caption strings (no host synchronisation on a GPU).

    Example:
        >>> scenes = sample_scenes(3, generator=0)
        >>> len(scenes), tuple(scenes.shape.shape)
        (3, (3, 2))
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    generator = _as_generator(generator)
    device = generator.device
    b = batch_size
    present = torch.ones(b, MAX_OBJECTS, dtype=torch.bool, device=device)
    present[:, 1] = torch.rand(b, generator=generator, device=device) < 0.5  # (B,)
    shape = torch.randint(len(SHAPES), (b, MAX_OBJECTS), generator=generator, device=device)  # (B, K)
    size = torch.randint(len(SIZES), (b, MAX_OBJECTS), generator=generator, device=device)  # (B, K)
    colour = torch.randint(len(COLOURS), (b, MAX_OBJECTS), generator=generator, device=device)  # (B, K)
    order = torch.rand(b, len(CELLS), generator=generator, device=device).argsort(dim=1)  # (B, 9)
    cell = order[:, :MAX_OBJECTS]  # (B, K), distinct cells
    offset, background = _sample_layout(b, generator)
    scenes = SceneBatch(present, shape, size, colour, cell, offset, background)
    if exclude_captions is not None:
        excluded = scenes_from_captions(list(exclude_captions), generator=0).keys().to(device)
        while True:
            bad = torch.isin(scenes.keys(), excluded)  # (B,)
            if not bool(bad.any()):
                break
            scenes = scenes.where(bad, sample_scenes(b, generator, captions=False))
    if captions:
        lists = [getattr(scenes, n).tolist() for n in ("present", "shape", "size", "colour", "cell")]
        scenes.captions = [caption_for(_objects_from_lists(*(col[i] for col in lists))) for i in range(b)]
    return scenes


def scenes_from_captions(captions: Sequence[str], generator: int | torch.Generator | None = None) -> SceneBatch:
    """Scenes for given captions, with random jitter and background (seeded, on the CPU).

    Example:
        >>> scenes_from_captions(["a small red circle at the top left"], generator=0).cell.tolist()
        [[0, 0]]
    """
    generator = _as_generator(generator)
    parsed = [parse_caption(c) for c in captions]
    b = len(parsed)
    present = torch.zeros(b, MAX_OBJECTS, dtype=torch.bool)
    shape = torch.zeros(b, MAX_OBJECTS, dtype=torch.long)
    size = torch.zeros(b, MAX_OBJECTS, dtype=torch.long)
    colour = torch.zeros(b, MAX_OBJECTS, dtype=torch.long)
    cell = torch.zeros(b, MAX_OBJECTS, dtype=torch.long)
    for i, objects in enumerate(parsed):
        for k, obj in enumerate(objects):
            present[i, k] = True
            shape[i, k] = SHAPES.index(obj.shape)
            size[i, k] = _SIZE_NAMES.index(obj.size)
            colour[i, k] = _COLOUR_NAMES.index(obj.colour)
            cell[i, k] = CELLS.index(obj.cell)
    offset, background = _sample_layout(b, generator)
    offset, background = offset.cpu(), background.cpu()
    return SceneBatch(
        present, shape, size, colour, cell, offset, background, captions=[caption_for(p) for p in parsed]
    )


def random_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` random captions of the world, reproducible from ``seed``.

    Example:
        >>> random_captions(2, seed=1) == random_captions(2, seed=1)
        True
    """
    return sample_scenes(n, generator=seed).captions


def shape_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (fractions of the image side, positive inside) from a shape centred at the origin.

    ``dx``, ``dy`` (pixel offsets from the shape centre, y down) and ``r`` broadcast together. Exact for the circle,
    and inside the square and the triangle; outside those it is a max/min of half-planes, which is all that a
    one-pixel anti-aliasing ramp or an inside test needs.

    Example:
        >>> round(float(shape_distance("square", torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.1))), 6)
        0.085
    """
    if shape == "circle":
        return r - torch.sqrt(dx * dx + dy * dy)
    if shape == "square":
        return SQUARE_HALF_SIDE * r - torch.maximum(dx.abs(), dy.abs())
    if shape == "triangle":
        height = TRIANGLE_HEIGHT * r
        half_base = 0.5 * TRIANGLE_BASE * r
        norm = torch.sqrt(height * height + half_base * half_base)
        from_apex = dy + 0.5 * height  # distance below the apex
        left = (dx * height + from_apex * half_base) / norm
        right = (-dx * height + from_apex * half_base) / norm
        return torch.minimum(torch.minimum(left, right), 0.5 * height - dy)
    raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}.")


def shape_coverage(
    shape: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, size: int = IMAGE_SIZE
) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of one shape per row.

    Args:
        shape: (N,) long index into ``SHAPES``.
        centre: (N, 2) float (x, y) as fractions of the image side.
        radius: (N,) float r as a fraction of the image side.
        size: image side in pixels.

    Returns:
        (N, size, size) float coverage: 1 inside, 0 outside, a one-pixel linear ramp across the edge.

    Example:
        >>> cov = shape_coverage(torch.tensor([0]), torch.tensor([[0.5, 0.5]]), torch.tensor([0.19]))
        >>> float(cov[0, 64, 64]), float(cov[0, 0, 0])
        (1.0, 0.0)
    """
    coords = (torch.arange(size, device=centre.device, dtype=torch.float32) + 0.5) / size  # (S,) pixel centres
    dx = coords.view(1, 1, size) - centre[:, 0].view(-1, 1, 1)  # (N, 1, S)
    dy = coords.view(1, size, 1) - centre[:, 1].view(-1, 1, 1)  # (N, S, 1)
    r = radius.view(-1, 1, 1)  # (N, 1, 1)
    distance = torch.stack([shape_distance(name, dx, dy, r) for name in SHAPES], dim=1)  # (N, 3, S, S)
    distance = distance.gather(1, shape.view(-1, 1, 1, 1).expand(-1, 1, size, size)).squeeze(1)  # (N, S, S)
    return (distance * size + 0.5).clamp(0.0, 1.0)


_TABLE_CACHE: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Colour, radius and cell-centre tables on ``device``, built once (a host-to-device copy per training step
    would make the host wait for the GPU)."""
    if device not in _TABLE_CACHE:
        _TABLE_CACHE[device] = (
            torch.tensor(list(COLOURS.values()), device=device),
            torch.tensor(list(SIZES.values()), device=device),
            torch.tensor([cell_centre(c) for c in CELLS], device=device),
        )
    return _TABLE_CACHE[device]


def render_scenes(scenes: SceneBatch, size: int = IMAGE_SIZE, device: torch.device | str = "cpu") -> torch.Tensor:
    """Render a batch of scenes to images (B, 3, size, size) with values in [0, 1].

    Example:
        >>> images = render_scenes(sample_scenes(2, generator=0))
        >>> bool(images.min() >= 0) and bool(images.max() <= 1)
        True
    """
    device = torch.device(device)
    b = len(scenes)
    ramp = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size  # (S,)
    background = scenes.background.to(device)  # (B, 2, 3)
    top, bottom = background[:, 0], background[:, 1]  # (B, 3)
    image = top.view(b, 3, 1, 1) + (bottom - top).view(b, 3, 1, 1) * ramp.view(1, 1, size, 1)  # (B, 3, S, 1)
    image = image.expand(b, 3, size, size).contiguous()  # (B, 3, S, S)

    palette, radii, cell_xy = _tables(device)  # (C, 3), (2,), (9, 2)
    for k in range(MAX_OBJECTS):
        centre = cell_xy[scenes.cell[:, k].to(device)] + scenes.offset[:, k].to(device)  # (B, 2)
        alpha = shape_coverage(scenes.shape[:, k].to(device), centre, radii[scenes.size[:, k].to(device)], size)
        alpha = alpha * scenes.present[:, k].to(device).view(b, 1, 1)  # (B, S, S)
        colour = palette[scenes.colour[:, k].to(device)].view(b, 3, 1, 1)  # (B, 3, 1, 1)
        image = image + alpha.unsqueeze(1) * (colour - image)  # (B, 3, S, S), "over" compositing
    return image


def render_captions(
    captions: Sequence[str], seed: int | torch.Generator | None = 0, size: int = IMAGE_SIZE, device="cpu"
) -> torch.Tensor:
    """Render ground-truth images (B, 3, size, size) in [0, 1] for captions (random jitter/background from ``seed``).

    Example:
        >>> render_captions(["a large black square at the center"]).shape
        torch.Size([1, 3, 128, 128])
    """
    return render_scenes(scenes_from_captions(captions, seed), size=size, device=device)
