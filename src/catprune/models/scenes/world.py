"""The scenes world: emoji glyphs on gradient backgrounds, its caption grammar, random scenes and rendering.

The world is fixed so that quality numbers stay comparable across versions:

- 128x128 RGB. Background: a linear gradient between two random colours (each channel uniform in [0.2, 0.95])
  along a random direction (angle uniform in [0, 2 pi)); it runs from the first colour at the image corner that
  lies furthest against the direction to the second at the opposite corner. The background is never named.
- 1 to 3 objects (probability 1/3 each), distinct objects in distinct cells of the 3x3 grid of the shapes world
  (``top left, top, top right, left, center, right, bottom left, bottom, bottom right``).
- An object is a glyph of Noto Color Emoji from the shipped atlas (``OBJECT_NAMES``, 150 of them), drawn as a
  square of side 36 px +- 2 px (integer, uniform) centred in its cell, shifted by an integer jitter in [-3, 3] px
  along each axis, alpha-composited over the background (premultiplied colour). Glyphs never overlap.
- Caption: ``a {name} at the {cell}`` (``an`` before a name that starts with a vowel), objects joined by ``and``
  in the order they were drawn. The empty caption is the unconditional input of classifier-free guidance.

Object names are the Unicode character names, lower-cased (``unicodedata.name``); the shipped atlas only holds
names of 1 to 3 plain ASCII words that avoid the grammar's own words, so no normalisation is needed.

Everything is batched torch so that training can sample and render on the GPU; sampling draws from the
generator's device (a CPU generator gives the same scenes on every machine).

Example:
    >>> from catprune.models.scenes.world import random_captions, render_captions
    >>> captions = random_captions(2, seed=0)
    >>> images = render_captions(captions, seed=0)  # (2, 3, 128, 128), values in [0, 1]
    >>> tuple(images.shape)
    (2, 3, 128, 128)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..shapes.world import CELLS

PACKAGE_DIR = Path(__file__).resolve().parent
ATLAS_DIR = PACKAGE_DIR / "atlas"
IMAGE_SIZE = 128
MAX_OBJECTS = 3
GLYPH_SIDE = 36  # pixels
GLYPH_SIDE_SPREAD = 2  # the side is GLYPH_SIDE + an integer in [-2, 2]
JITTER = 3  # largest shift (pixels, integer) of a glyph from its cell centre along each axis
BACKGROUND_RANGE = (0.2, 0.95)
GRAMMAR_WORDS: tuple[str, ...] = ("a", "an", "and", "at", "the")
SIDES = tuple(range(GLYPH_SIDE - GLYPH_SIDE_SPREAD, GLYPH_SIDE + GLYPH_SIDE_SPREAD + 1))
_CANVAS = SIDES[-1]


@dataclass(frozen=True)
class Atlas:
    """The glyphs the world draws: ``rgba`` (N, 4, S, S) float in [0, 1] (straight alpha) and the metadata."""

    names: tuple[str, ...]
    code_points: tuple[str, ...]
    rgba: torch.Tensor
    meta: dict


def load_atlas(directory: str | Path | None = None) -> Atlas:
    """Read ``atlas.json`` and ``atlas.png`` (the shipped atlas by default; rebuilt by scripts/build_scenes_atlas.py).

    Raises:
        FileNotFoundError: a file is missing (the message names it).
        ValueError: a file is corrupt or the two do not agree (the message names the file).

    Example:
        >>> atlas = load_atlas()
        >>> len(atlas.names), tuple(atlas.rgba.shape[1:]), atlas.meta["licence"]
        (150, (4, 64, 64), 'OFL-1.1')
    """
    from PIL import Image

    directory = ATLAS_DIR if directory is None else Path(directory)
    json_path, png_path = directory / "atlas.json", directory / "atlas.png"
    fix = "Reinstall catprune, or rebuild the atlas with scripts/build_scenes_atlas.py."
    for path in (json_path, png_path):
        if not path.is_file():
            raise FileNotFoundError(f"missing scenes atlas file {path}. {fix}")
    try:
        meta = json.loads(json_path.read_text())
        names, code_points = tuple(meta["names"]), tuple(meta["code_points"])
        size, columns = int(meta["glyph_size"]), int(meta["columns"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"corrupt scenes atlas file {json_path}: {err!r}. {fix}") from err
    if len(names) != len(code_points) or len(set(names)) != len(names) or not names:
        raise ValueError(
            f"corrupt scenes atlas file {json_path}: names and code_points must be distinct, equal-length lists. {fix}"
        )
    try:
        with Image.open(png_path) as image:
            pixels = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0  # (rows*S, columns*S, 4)
    except Exception as err:  # Pillow raises several error types for truncated or garbled files
        raise ValueError(f"corrupt scenes atlas file {png_path}: {err!r}. {fix}") from err
    rows = -(-len(names) // columns)
    if pixels.shape[:2] != (rows * size, columns * size):
        raise ValueError(
            f"corrupt scenes atlas file {png_path}: expected {rows * size}x{columns * size} pixels for "
            f"{len(names)} glyphs of {size} px in {columns} columns ({json_path}), got {pixels.shape[0]}x"
            f"{pixels.shape[1]}. {fix}"
        )
    grid = torch.from_numpy(pixels).view(rows, size, columns, size, 4).permute(0, 2, 4, 1, 3)  # (R, C, 4, S, S)
    rgba = grid.reshape(rows * columns, 4, size, size)[: len(names)].contiguous()
    return Atlas(names=names, code_points=code_points, rgba=rgba, meta=meta)


@lru_cache(maxsize=1)
def shipped_atlas() -> Atlas:
    """The packaged atlas, read once."""
    return load_atlas()


def _object_names() -> tuple[str, ...]:
    path = ATLAS_DIR / "atlas.json"
    try:
        return tuple(json.loads(path.read_text())["names"])
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"missing scenes atlas file {path}. Reinstall catprune, or rebuild the atlas with "
            "scripts/build_scenes_atlas.py."
        ) from err
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"corrupt scenes atlas file {path}: {err!r}. Reinstall catprune.") from err


#: The object names, in atlas order (object index i = ``OBJECT_NAMES[i]``).
OBJECT_NAMES: tuple[str, ...] = _object_names()
NUM_OBJECTS = len(OBJECT_NAMES)
_NAME_INDEX = {name: i for i, name in enumerate(OBJECT_NAMES)}
_CELL_INDEX = {cell: i for i, cell in enumerate(CELLS)}

#: Every word the caption grammar can produce, in a fixed order (the tokenizer's vocabulary): the grammar words,
#: the cell words, then the words of the object names in order of first appearance.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        [*GRAMMAR_WORDS, *(w for cell in CELLS for w in cell.split()), *(w for n in OBJECT_NAMES for w in n.split())]
    )
)
_CELL_PATTERN = "|".join(sorted(CELLS, key=len, reverse=True))
_OBJECT_RE = re.compile(rf"^(?P<article>an?) (?P<name>[a-z ]+?) at the (?P<cell>{_CELL_PATTERN})$")


def article(name: str) -> str:
    """``an`` before a vowel, else ``a``.

    Example:
        >>> article("owl"), article("hamburger")
        ('an', 'a')
    """
    return "an" if name[:1] in "aeiou" else "a"


def caption_for(objects: Sequence[tuple[str, str]]) -> str:
    """The caption of ``(name, cell)`` pairs, in order.

    Example:
        >>> caption_for([("owl", "top left"), ("delivery truck", "center")])
        'an owl at the top left and a delivery truck at the center'
    """
    return " and ".join(f"{article(name)} {name} at the {cell}" for name, cell in objects)


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """``(name, cell)`` pairs of a caption of the grammar; ``ValueError`` (saying what is wrong) otherwise.

    Example:
        >>> parse_caption("an owl at the top left and a delivery truck at the center")
        [('owl', 'top left'), ('delivery truck', 'center')]
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__} ({caption!r}).")
    text = " ".join(caption.lower().split())
    if not text:
        return []
    objects = []
    for part in text.split(" and "):
        match = _OBJECT_RE.match(part)
        if match is None or match["name"] not in _NAME_INDEX or match["article"] != article(match["name"]):
            raise ValueError(
                f"caption {caption!r}: {part!r} is not 'a/an {{name}} at the {{cell}}' with a name from "
                "catprune.models.scenes.OBJECT_NAMES and a cell from catprune.models.shapes.CELLS. Write e.g. "
                "'an owl at the top left and a delivery truck at the center'."
            )
        objects.append((match["name"], match["cell"]))
    cells = [cell for _, cell in objects]
    if len(objects) > MAX_OBJECTS or len(set(cells)) != len(cells):
        raise ValueError(
            f"caption {caption!r}: the scenes world holds 1 to {MAX_OBJECTS} objects in distinct cells; got "
            f"{len(objects)} object(s) in cells {cells}."
        )
    return objects


@dataclass
class SceneBatch:
    """A batch of B scenes with up to ``MAX_OBJECTS`` (K) object slots, all tensors on one device.

    ``obj``, ``cell``, ``side``, ``dy``, ``dx``: (B, K) long (object index, cell index, glyph side in pixels,
    jitter in pixels); ``present``: (B, K) bool (slots in use come first); ``colour0``, ``colour1``: (B, 3) float
    background colours; ``angle``: (B,) float, the gradient's direction in radians (0 = left to right, pi/2 = top to
    bottom).
    """

    obj: torch.Tensor
    cell: torch.Tensor
    present: torch.Tensor
    side: torch.Tensor
    dy: torch.Tensor
    dx: torch.Tensor
    colour0: torch.Tensor
    colour1: torch.Tensor
    angle: torch.Tensor

    def __len__(self) -> int:
        return self.obj.shape[0]

    def to(self, device) -> SceneBatch:
        return SceneBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def where(self, mask: torch.Tensor, other: SceneBatch) -> SceneBatch:
        """Scenes of ``other`` where ``mask`` (B,) is True, else these."""
        out = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            m = mask.view(-1, *([1] * (mine.dim() - 1)))
            out[f.name] = torch.where(m, theirs, mine)
        return SceneBatch(**out)

    @property
    def objects(self) -> list[list[tuple[str, str]]]:
        """``(name, cell)`` pairs of each scene, in caption order."""
        obj, cell, present = self.obj.tolist(), self.cell.tolist(), self.present.tolist()
        return [
            [(OBJECT_NAMES[o], CELLS[c]) for o, c, p in zip(os_, cs, ps, strict=True) if p]
            for os_, cs, ps in zip(obj, cell, present, strict=True)
        ]

    @property
    def captions(self) -> list[str]:
        return [caption_for(objects) for objects in self.objects]

    def keys(self) -> torch.Tensor:
        """(B,) int64 key of each scene's set of (object, cell) pairs, independent of the caption order.

        Two scenes have the same key iff they show the same objects in the same cells (layout and background
        aside); training uses it to keep the held-out combinations out.
        """
        base = 9 * NUM_OBJECTS + 1
        code = torch.where(self.present, self.cell * NUM_OBJECTS + self.obj + 1, torch.zeros_like(self.obj))  # (B, K)
        code = code.sort(dim=1, descending=True).values
        weights = torch.tensor([base**k for k in range(code.shape[1])], device=code.device, dtype=torch.long)
        return (code * weights).sum(dim=1)


def _generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(0 if generator is None else int(generator))


def sample_layout(objects: torch.Tensor, cells: torch.Tensor, present: torch.Tensor, generator) -> SceneBatch:
    """Random sizes, jitters and backgrounds for given objects / cells / present (B, K), on the generator's device."""
    g = _generator(generator)
    b, k = objects.shape
    dev = g.device
    lo, hi = BACKGROUND_RANGE
    side = torch.randint(SIDES[0], SIDES[-1] + 1, (b, k), generator=g, device=dev)
    dy = torch.randint(-JITTER, JITTER + 1, (b, k), generator=g, device=dev)
    dx = torch.randint(-JITTER, JITTER + 1, (b, k), generator=g, device=dev)
    colour0 = lo + (hi - lo) * torch.rand(b, 3, generator=g, device=dev)
    colour1 = lo + (hi - lo) * torch.rand(b, 3, generator=g, device=dev)
    angle = 2 * math.pi * torch.rand(b, generator=g, device=dev)
    return SceneBatch(
        obj=objects.to(dev), cell=cells.to(dev), present=present.to(dev), side=side, dy=dy, dx=dx,
        colour0=colour0, colour1=colour1, angle=angle,
    )  # fmt: skip


def sample_scenes(n: int, generator: torch.Generator | int | None = None) -> SceneBatch:
    """``n`` random scenes: 1 to 3 distinct objects in distinct cells, random layout and background.

    Example:
        >>> scenes = sample_scenes(4, generator=0)
        >>> len(scenes), scenes.present.sum(dim=1).min().item() >= 1
        (4, True)
    """
    g = _generator(generator)
    dev = g.device
    count = torch.randint(1, MAX_OBJECTS + 1, (n,), generator=g, device=dev)  # (B,)
    cells = torch.rand(n, 9, generator=g, device=dev).argsort(dim=1)[:, :MAX_OBJECTS]  # (B, K) distinct
    objects = torch.rand(n, NUM_OBJECTS, generator=g, device=dev).argsort(dim=1)[:, :MAX_OBJECTS]  # (B, K) distinct
    present = torch.arange(MAX_OBJECTS, device=dev).view(1, -1) < count.view(-1, 1)  # (B, K)
    return sample_layout(objects, cells, present, g)


def scenes_from_captions(captions: Sequence[str], generator: torch.Generator | int | None = None) -> SceneBatch:
    """Scenes showing the captions' objects, with random layouts and backgrounds from ``generator``.

    Example:
        >>> scenes_from_captions(["an owl at the top left"], generator=0).captions
        ['an owl at the top left']
    """
    parsed = [parse_caption(c) for c in captions]
    b = len(parsed)
    objects = torch.zeros(b, MAX_OBJECTS, dtype=torch.long)
    cells = torch.zeros(b, MAX_OBJECTS, dtype=torch.long)
    present = torch.zeros(b, MAX_OBJECTS, dtype=torch.bool)
    for i, pairs in enumerate(parsed):
        for j, (name, cell) in enumerate(pairs):
            objects[i, j], cells[i, j], present[i, j] = _NAME_INDEX[name], _CELL_INDEX[cell], True
    return sample_layout(objects, cells, present, generator)


def random_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` random captions (a fixed seeded list: the same on every machine).

    Example:
        >>> random_captions(1, seed=3) == random_captions(1, seed=3)
        True
    """
    return sample_scenes(n, torch.Generator().manual_seed(seed)).captions


def cell_centre(cell: int | torch.Tensor) -> tuple:
    """(row, column) pixel coordinates of a cell's centre in a 128x128 image (cell = 3 * row + column)."""
    row, col = cell // 3, cell % 3
    return (row + 0.5) * IMAGE_SIZE / 3, (col + 0.5) * IMAGE_SIZE / 3


def glyph_origin(cell: torch.Tensor, side: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor):
    """Top-left pixel (y0, x0) of a glyph of ``side`` px centred in ``cell`` and shifted by (dy, dx)."""
    cy, cx = cell_centre(cell)
    y0 = torch.floor(cy - side / 2 + 0.5).long() + dy
    x0 = torch.floor(cx - side / 2 + 0.5).long() + dx
    return y0, x0


_BANKS: dict[tuple[str, torch.device], torch.Tensor] = {}


def glyph_bank(device: torch.device | str = "cpu", atlas: Atlas | None = None) -> torch.Tensor:
    """Premultiplied glyphs at every side in ``SIDES``, each at the top left of a 38x38 canvas:
    (len(SIDES), N, 4, 38, 38) float32 on ``device`` (cached for the shipped atlas)."""
    device = torch.device(device)
    key = ("shipped" if atlas is None else str(id(atlas)), device)
    if key in _BANKS:
        return _BANKS[key]
    rgba = (atlas or shipped_atlas()).rgba.to(device)  # (N, 4, S, S)
    premult = torch.cat([rgba[:, :3] * rgba[:, 3:], rgba[:, 3:]], dim=1)
    bank = torch.zeros(len(SIDES), rgba.shape[0], 4, _CANVAS, _CANVAS, device=device)
    for i, s in enumerate(SIDES):
        small = F.interpolate(premult, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        bank[i, :, :, :s, :s] = small.clamp(0, 1)
    bank[:, :, :3] = torch.minimum(bank[:, :, :3], bank[:, :, 3:])  # premultiplied colour never exceeds alpha
    if atlas is None:
        _BANKS[key] = bank
    return bank


def render_background(scenes: SceneBatch, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The gradient backgrounds (B, 3, size, size) in [0, 1]."""
    device = scenes.angle.device
    pos = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2  # (S,)
    cos, sin = torch.cos(scenes.angle).view(-1, 1, 1), torch.sin(scenes.angle).view(-1, 1, 1)  # (B, 1, 1)
    proj = pos.view(1, 1, -1) * cos + pos.view(1, -1, 1) * sin  # (B, S, S)
    extent = (size - 1) / 2 * (cos.abs() + sin.abs())  # (B, 1, 1): |proj| at the furthest corner
    t = (0.5 + proj / (2 * extent)).unsqueeze(1)  # (B, 1, S, S) in [0, 1]
    c0, c1 = scenes.colour0.view(-1, 3, 1, 1), scenes.colour1.view(-1, 3, 1, 1)
    return c0 + (c1 - c0) * t


def render_scenes(scenes: SceneBatch, device: torch.device | str | None = None) -> torch.Tensor:
    """Render scenes to RGB images (B, 3, 128, 128) in [0, 1] on ``device`` (default: the scenes' device).

    Example:
        >>> images = render_scenes(sample_scenes(2, generator=0))
        >>> tuple(images.shape), bool(images.min() >= 0), bool(images.max() <= 1)
        ((2, 3, 128, 128), True, True)
    """
    device = torch.device(device) if device is not None else scenes.obj.device
    scenes = scenes.to(device)
    bank = glyph_bank(device)  # (S, N, 4, C, C)
    n_sides, n_obj = bank.shape[0], bank.shape[1]
    flat = torch.cat([bank.permute(0, 1, 3, 4, 2).reshape(-1, 4), bank.new_zeros(1, 4)])  # (S*N*C*C + 1, 4)
    blank = flat.shape[0] - 1
    image = render_background(scenes).permute(0, 2, 3, 1)  # (B, H, W, 3)
    b = len(scenes)
    pos = torch.arange(IMAGE_SIZE, device=device)
    y0, x0 = glyph_origin(scenes.cell, scenes.side, scenes.dy, scenes.dx)  # (B, K) each
    size_index = scenes.side - SIDES[0]  # (B, K)
    for k in range(scenes.obj.shape[1]):
        yy = pos.view(1, -1) - y0[:, k : k + 1]  # (B, H)
        xx = pos.view(1, -1) - x0[:, k : k + 1]  # (B, W)
        side = scenes.side[:, k : k + 1]
        in_y = (yy >= 0) & (yy < side)  # (B, H)
        in_x = (xx >= 0) & (xx < side)  # (B, W)
        valid = in_y.unsqueeze(2) & in_x.unsqueeze(1) & scenes.present[:, k].view(b, 1, 1)  # (B, H, W)
        base = ((size_index[:, k] * n_obj + scenes.obj[:, k]) * _CANVAS * _CANVAS).view(b, 1, 1)
        index = base + yy.clamp(0, _CANVAS - 1).unsqueeze(2) * _CANVAS + xx.clamp(0, _CANVAS - 1).unsqueeze(1)
        index = torch.where(valid, index, torch.full_like(index, blank))  # (B, H, W)
        glyph = flat[index]  # (B, H, W, 4) premultiplied
        image = image * (1 - glyph[..., 3:]) + glyph[..., :3]
    del n_sides
    return image.permute(0, 3, 1, 2).clamp(0, 1).contiguous()


def render_captions(captions: Sequence[str], seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Ground-truth images (B, 3, 128, 128) of captions, layouts and backgrounds drawn from ``seed``.

    Example:
        >>> tuple(render_captions(["a cat at the center"]).shape)
        (1, 3, 128, 128)
    """
    return render_scenes(scenes_from_captions(captions, torch.Generator().manual_seed(seed)), device=device)
