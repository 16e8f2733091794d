"""The report's figures: Pareto plots (speed-up against quality), image grids (methods side by side, same seeds)
and selection heat maps (how many steps computed each token).

Plots and heat maps need matplotlib (``pip install 'catprune[eval]'``); without it they return nothing and the
report says so. Image grids need only Pillow. Labels are sized to be read at the figure's natural size.

Example:
    >>> strip = label_strip(["dense-28", "cat-a0.3-t8"], cell=132)
    >>> strip.size[0], strip.size[1] >= 36
    (264, True)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .files import load_images
from .methods import GROUPS, Kind
from .store import MethodCache

GROUP_COLOURS = {
    "reference": "#000000",
    "fewer steps": "#7f7f7f",
    "CAT": "#d62728",
    "ablation": "#1f77b4",
    "baseline": "#2ca02c",
    "peer": "#9467bd",
}
LABEL_FONT_PX = 18  # largest font of the image grids' column labels (shrunk only where a name would not fit)
PLOT_FONT = {"label": 12, "annotation": 9, "legend": 10, "title": 13, "heatmap_title": 11}


def matplotlib_pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _pareto_one(plt, points, x_key, x_label, y_key, y_label, path: Path) -> None:
    """One scatter plot. Dense runs are labelled with their names along their curve; the other runs with numbers
    whose key (number: name) stands beside the plot, so that runs at nearly the same point stay readable."""
    others = sorted([r for r in points if r["group"] not in ("fewer steps", "reference")], key=lambda r: -r[x_key])
    fig, ax = plt.subplots(figsize=(12 if others else 9, 6), dpi=110)
    fewer = sorted([r for r in points if r["group"] in ("fewer steps", "reference")], key=lambda r: r[x_key])
    if len(fewer) > 1:
        ax.plot([r[x_key] for r in fewer], [r[y_key] for r in fewer], "-", color="#bbbbbb", zorder=1)
    for group in GROUPS:
        pts = [r for r in points if r["group"] == group]
        if pts:
            xs, ys = [r[x_key] for r in pts], [r[y_key] for r in pts]
            ax.scatter(xs, ys, c=GROUP_COLOURS[group], label=group, s=48, zorder=2)
    for r in fewer:
        ax.annotate(r["name"], (r[x_key], r[y_key]), fontsize=PLOT_FONT["annotation"], xytext=(5, -12),
                    textcoords="offset points", color="#555555")  # fmt: skip
    for i, r in enumerate(others, start=1):
        ax.annotate(str(i), (r[x_key], r[y_key]), fontsize=PLOT_FONT["annotation"], xytext=(4, 3 + 6 * (i % 2)),
                    textcoords="offset points", color=GROUP_COLOURS[r["group"]])  # fmt: skip
    if others:
        key = "\n".join(f"{i}: {r['name']}" for i, r in enumerate(others, start=1))
        fig.text(0.655, 0.95, key, fontsize=PLOT_FONT["annotation"], va="top", family="monospace")
    ax.set_xlabel(x_label, fontsize=PLOT_FONT["label"])
    ax.set_ylabel(y_label, fontsize=PLOT_FONT["label"])
    ax.tick_params(labelsize=PLOT_FONT["annotation"] + 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=PLOT_FONT["legend"])
    x_name = x_label.split(" (")[0].split(" vs")[0]  # the axis without the stand-in model's details
    ax.set_title(f"{y_label.split(' (')[0]} against {x_name}", fontsize=PLOT_FONT["title"])
    fig.tight_layout(rect=(0, 0, 0.65 if others else 1, 1))
    fig.savefig(path)
    plt.close(fig)


def pareto_plots(rows: list[dict], folder: Path, gpu_label: str | None = None) -> dict[str, str]:
    """Speed-up (wall-clock and MACs; with ``gpu_label``, also the modelled GPU time of `gpu_time`) against
    PSNR-to-dense and against adherence. Returns {title: relative path}; empty if matplotlib is missing."""
    plt = matplotlib_pyplot()
    if plt is None:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    ok = [r for r in rows if r.get("status") == "ok"]
    for y_key, y_label in (("psnr", "PSNR to dense (dB)"), ("adherence", "adherence (mean of the model's rates)")):
        axes = [("wall_speedup", "wall-clock speed-up vs dense"), ("macs_speedup", "MACs speed-up vs dense")]
        if gpu_label is not None:
            axes.append(("gpu_speedup", f"{gpu_label} vs dense"))
        for x_key, x_label in axes:
            points = [r for r in ok if r.get(x_key) is not None and _finite(r.get(y_key))]
            if not points:
                continue
            name = f"pareto_{y_key}_{x_key.split('_')[0]}.png"
            _pareto_one(plt, points, x_key, x_label, y_key, y_label, folder / name)
            made[f"{y_label} vs {x_label}"] = f"{folder.name}/{name}"
    return made


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def label_strip(names: list[str], cell: int):
    """A white strip with each name on two lines (split at the first '-') over its column of width ``cell``; the
    font is `LABEL_FONT_PX` pixels, smaller only where the longest line would not fit a column."""
    from PIL import Image, ImageDraw

    lines = [name.partition("-")[::2] for name in names]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size = LABEL_FONT_PX
    longest = max((part for pair in lines for part in pair), key=len, default="")
    while size > 9 and probe.textlength(longest, font=_font(size)) > cell - 6:
        size -= 1
    font = _font(size)
    height = 2 * size + 12
    strip = Image.new("RGB", (cell * len(names), height), "white")
    draw = ImageDraw.Draw(strip)
    for j, (head, tail) in enumerate(lines):
        draw.text((j * cell + 3, 3), head, fill="black", font=font)
        draw.text((j * cell + 3, 6 + size), tail, fill="black", font=font)
    return strip


def image_grid(caches: list[MethodCache], indices: list[int], path: Path, scale: int = 1) -> None:
    """Rows = seeds (prompt indices), columns = methods, same seed across a row; method names on top."""
    from PIL import Image

    columns = [load_images([cache.image_path(i) for i in indices]) for cache in caches]  # each (R, 3, H, W)
    _, _, h, w = columns[0].shape
    cell_h, cell_w = h * scale + 4, w * scale + 4
    strip = label_strip([c.method.name for c in caches], cell_w)
    canvas = Image.new("RGB", (cell_w * len(caches), strip.height + cell_h * len(indices)), "white")
    canvas.paste(strip, (0, 0))
    for j, images in enumerate(columns):
        for i, image in enumerate(images):
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(array).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (j * cell_w + 2, strip.height + i * cell_h + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _heatmap_means(plt, recorded, steps: int, path: Path) -> None:
    cols = min(5, len(recorded))
    rows_n = math.ceil(len(recorded) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 3.5 * rows_n), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (cache, tokens) in zip(axes.flat, recorded, strict=False):
        gh, gw = (int(g) for g in tokens["grid"])
        mean = tokens["counts"].astype(np.float64).mean(axis=0).reshape(gh, gw)
        im = ax.imshow(mean, vmin=0, vmax=steps, cmap="viridis")
        title = f"{cache.method.name}\nmean {mean.mean():.1f}, min {mean.min():.1f}"
        ax.set_title(title, fontsize=PLOT_FONT["heatmap_title"])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=PLOT_FONT["annotation"])
    fig.suptitle(f"steps (of {steps}) that computed each token, mean over all images", fontsize=PLOT_FONT["title"])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _heatmap_examples(plt, recorded, steps: int, indices: list[int], shown: MethodCache, path: Path) -> None:
    n_cols = len(recorded) + 1
    fig, axes = plt.subplots(len(indices), n_cols, figsize=(2.7 * n_cols, 2.8 * len(indices)), dpi=100, squeeze=False)
    for i, index in enumerate(indices):
        image = load_images([shown.image_path(index)])[0].permute(1, 2, 0).numpy()
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(f"seed {index} ({shown.method.name})", fontsize=PLOT_FONT["annotation"])
        for j, (cache, tokens) in enumerate(recorded, start=1):
            gh, gw = (int(g) for g in tokens["grid"])
            axes[i, j].imshow(tokens["counts"][index].reshape(gh, gw), vmin=0, vmax=steps, cmap="viridis")
            if i == 0:
                axes[i, j].set_title(cache.method.name, fontsize=PLOT_FONT["annotation"])
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"per image: steps (of {steps}) that computed each token", fontsize=PLOT_FONT["title"])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def selection_heatmaps(
    caches: list[MethodCache], steps: int, indices: list[int], folder: Path, image_cache: MethodCache | None = None
) -> dict[str, str]:
    """Heat maps of how many steps recomputed each token: the mean over all images per method, and per-image maps
    next to the image for a few seeds. Returns {title: relative path}; empty without matplotlib or token records."""
    plt = matplotlib_pyplot()
    recorded = [(c, c.tokens()) for c in caches if c.method.kind is Kind.CATPRUNE]
    recorded = [(c, t) for c, t in recorded if t is not None]
    if plt is None or not recorded:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    _heatmap_means(plt, recorded, steps, folder / "selection_mean.png")
    shown = image_cache if image_cache is not None else recorded[0][0]
    _heatmap_examples(plt, recorded, steps, indices, shown, folder / "selection_examples.png")
    return {
        "mean over all images": f"{folder.name}/selection_mean.png",
        "per image, same seeds": f"{folder.name}/selection_examples.png",
    }


__all__ = [
    "GROUP_COLOURS",
    "image_grid",
    "label_strip",
    "matplotlib_pyplot",
    "pareto_plots",
    "selection_heatmaps",
]
