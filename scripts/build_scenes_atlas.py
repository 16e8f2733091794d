#!/usr/bin/env python3
"""Rebuild the glyph atlas of the embedded scenes model from the Debian package ``fonts-noto-color-emoji``.

The atlas is what the scenes world draws: one RGBA image per object, cropped to a square around the glyph's
visible pixels (so every object's larger side spans the whole square) and resized to ``--size`` pixels. It ships
inside the package (``catprune/models/scenes/atlas/``), so nothing reads the font at run time:

- ``atlas.png``: the glyphs in a grid of ``columns`` columns, object ``i`` at row ``i // columns``, column
  ``i % columns`` (straight, not premultiplied, alpha);
- ``atlas.json``: the object names, code points, glyph size, grid columns, the font's name, version and licence;
- ``OFL.txt``: the font's licence (SIL Open Font License 1.1), copied from the Debian package.

Object name = ``unicodedata.name(char).lower()``. Every name is 1 to 3 lower-case ASCII words; no name uses a word of
the caption grammar (``a an and at the top bottom left right center``), so captions parse without ambiguity. The
list below was chosen by hand from animals, food, plants, vehicles and objects (no flags, people, faces, hands,
skin tones, ZWJ sequences or text-like symbols), avoiding near duplicates (``cow`` but not ``cow face``).

Glyphs are drawn with Pillow at size 109 (the font's only bitmap strike), ``embedded_color=True``.

Example:
    sudo apt-get install fonts-noto-color-emoji
    python scripts/build_scenes_atlas.py            # rewrites src/catprune/models/scenes/atlas/
"""

from __future__ import annotations

import argparse
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
LICENCE = Path("/usr/share/doc/fonts-noto-color-emoji/copyright")
OUT = Path(__file__).resolve().parents[1] / "src" / "catprune" / "models" / "scenes" / "atlas"
GRAMMAR_WORDS = {"a", "an", "and", "at", "the", "top", "bottom", "left", "right", "center"}

# fmt: off
CODE_POINTS = (
    # animals (50)
    0x1F404, 0x1F405, 0x1F406, 0x1F407, 0x1F408, 0x1F409, 0x1F40A, 0x1F40B, 0x1F40C, 0x1F40D,
    0x1F40E, 0x1F410, 0x1F411, 0x1F412, 0x1F413, 0x1F415, 0x1F416, 0x1F418, 0x1F419, 0x1F41A,
    0x1F41D, 0x1F41E, 0x1F41F, 0x1F421, 0x1F422, 0x1F424, 0x1F427, 0x1F428, 0x1F42A, 0x1F42C,
    0x1F43F, 0x1F980, 0x1F982, 0x1F983, 0x1F985, 0x1F986, 0x1F987, 0x1F988, 0x1F989, 0x1F98B,
    0x1F98C, 0x1F98D, 0x1F98F, 0x1F991, 0x1F994, 0x1F998, 0x1F99A, 0x1F99B, 0x1F99C, 0x1F9A9,
    # food (40)
    0x1F32D, 0x1F32E, 0x1F336, 0x1F344, 0x1F345, 0x1F346, 0x1F347, 0x1F349, 0x1F34B, 0x1F34C,
    0x1F34D, 0x1F34E, 0x1F350, 0x1F351, 0x1F352, 0x1F353, 0x1F354, 0x1F356, 0x1F35F, 0x1F363,
    0x1F369, 0x1F36A, 0x1F36D, 0x1F370, 0x1F37F, 0x1F382, 0x1F950, 0x1F951, 0x1F955, 0x1F956,
    0x1F95A, 0x1F95D, 0x1F95E, 0x1F965, 0x1F966, 0x1F968, 0x1F96A, 0x1F9C0, 0x1F9C1, 0x1F9C7,
    # plants (10)
    0x1F335, 0x1F334, 0x1F332, 0x1F337, 0x1F339, 0x1F33B, 0x1F341, 0x1F340, 0x1F33A, 0x1FAB4,
    # vehicles (20)
    0x1F680, 0x1F681, 0x1F682, 0x1F68C, 0x1F691, 0x1F692, 0x1F693, 0x1F695, 0x1F697, 0x1F69A,
    0x1F69C, 0x1F6A2, 0x1F6B2, 0x1F6F5, 0x1F6F8, 0x02708, 0x026F5, 0x1F6F6, 0x1F3CE, 0x1F6F9,
    # objects (30)
    0x1F388, 0x1F381, 0x1F3B8, 0x1F3BA, 0x1F3BB, 0x1F451, 0x1F453, 0x1F45F, 0x1F4A1, 0x1F4A3,
    0x1F4BB, 0x1F4F7, 0x1F4FA, 0x1F511, 0x1F514, 0x1F52D, 0x1F528, 0x1F56F, 0x1F9F8, 0x1FA81,
    0x1F3C6, 0x026BD, 0x1F3B2, 0x023F0, 0x02693, 0x1F9ED, 0x1F9F2, 0x1FA91, 0x1F4DA, 0x1F3A8,
)
# fmt: on
NAME_RE = re.compile(r"[a-z]+( [a-z]+){0,2}")


def object_name(code_point: int) -> str:
    name = unicodedata.name(chr(code_point)).lower()
    if not NAME_RE.fullmatch(name) or set(name.split()) & GRAMMAR_WORDS:
        raise ValueError(f"U+{code_point:04X} {name!r}: names must be 1-3 plain words and avoid {GRAMMAR_WORDS}")
    return name


def render_glyph(font: ImageFont.FreeTypeFont, code_point: int, size: int) -> Image.Image:
    """The glyph on a transparent square around its visible pixels, resized to ``size`` (Lanczos, premultiplied)."""
    canvas = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((20, 20), chr(code_point), font=font, embedded_color=True)
    rgba = np.asarray(canvas).astype(np.float64) / 255.0  # (200, 200, 4)
    ys, xs = np.nonzero(rgba[..., 3] > 0.02)
    if len(ys) == 0:
        raise ValueError(f"U+{code_point:04X} renders empty with {FONT}")
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(bottom - top, right - left)
    cy, cx = (top + bottom) / 2, (left + right) / 2
    y0, x0 = int(round(cy - side / 2)), int(round(cx - side / 2))
    square = np.zeros((side, side, 4))
    src = rgba[max(y0, 0) : y0 + side, max(x0, 0) : x0 + side]
    square[max(-y0, 0) : max(-y0, 0) + src.shape[0], max(-x0, 0) : max(-x0, 0) + src.shape[1]] = src
    # Resize premultiplied colour so that transparent pixels do not bleed their (black) colour into the edges.
    premult = np.concatenate([square[..., :3] * square[..., 3:], square[..., 3:]], axis=-1)
    channels = [
        np.asarray(Image.fromarray(premult[..., c].astype(np.float32), mode="F").resize((size, size), Image.LANCZOS))
        for c in range(4)
    ]
    small = np.clip(np.stack(channels, axis=-1), 0.0, 1.0)  # (size, size, 4)
    alpha = small[..., 3:]
    colour = np.where(alpha > 1e-4, small[..., :3] / np.maximum(alpha, 1e-4), 0.0).clip(0.0, 1.0)
    return Image.fromarray(np.round(np.concatenate([colour, alpha], axis=-1) * 255).astype(np.uint8), mode="RGBA")


def font_info() -> dict:
    from fontTools.ttLib import TTFont

    names = {r.nameID: r.toUnicode() for r in TTFont(str(FONT))["name"].names if r.platformID == 3}
    return {
        "font": names.get(4, "Noto Color Emoji"),
        "font_version": names.get(5, ""),
        "font_copyright": names.get(0, ""),
        "font_file": str(FONT),
        "licence": "OFL-1.1",
        "licence_text": "OFL.txt",
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--size", type=int, default=64, help="glyph side in the atlas, pixels")
    p.add_argument("--columns", type=int, default=15)
    args = p.parse_args(argv)
    if len(set(CODE_POINTS)) != len(CODE_POINTS):
        raise ValueError("CODE_POINTS has duplicates")
    names = [object_name(cp) for cp in CODE_POINTS]
    if len(set(names)) != len(names):
        raise ValueError("object names must be distinct")
    font = ImageFont.truetype(str(FONT), 109)
    rows = -(-len(CODE_POINTS) // args.columns)
    atlas = Image.new("RGBA", (args.columns * args.size, rows * args.size), (0, 0, 0, 0))
    for i, cp in enumerate(CODE_POINTS):
        atlas.paste(
            render_glyph(font, cp, args.size), ((i % args.columns) * args.size, (i // args.columns) * args.size)
        )
    args.out.mkdir(parents=True, exist_ok=True)
    atlas.save(args.out / "atlas.png", optimize=True)
    meta = {
        "glyph_size": args.size,
        "columns": args.columns,
        "count": len(CODE_POINTS),
        "names": names,
        "code_points": [f"U+{cp:04X}" for cp in CODE_POINTS],
        **font_info(),
        "built_by": "scripts/build_scenes_atlas.py",
    }
    (args.out / "atlas.json").write_text(json.dumps(meta, indent=1) + "\n")
    licence = LICENCE.read_text()
    start = licence.find("SIL OPEN FONT LICENSE Version 1.1")
    text = "\n".join(line[1:] if line.startswith(" ") else line for line in licence[start:].splitlines())
    text = text.replace("\n.\n", "\n\n")
    (args.out / "OFL.txt").write_text(f"Noto Color Emoji: {meta['font_copyright']}\n\n{text.strip()}\n")
    print(f"wrote {len(names)} glyphs ({args.size} px) to {args.out}")


if __name__ == "__main__":
    main()
