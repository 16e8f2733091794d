"""The evaluation's outputs: results.json, results.csv and report.html with Pareto plots, image grids and
selection heat maps, built from the generation cache and scores.json.

Plots and heat maps need matplotlib (``pip install 'catprune[eval]'``); without it they are replaced by a note and
everything else is still written. Image grids need only Pillow.
"""

from __future__ import annotations

import csv
import html
import math
import os
from pathlib import Path

import numpy as np

from .harness import MethodCache, _read_json, _write_json, load_generation, load_images, reference_name, timing_summary
from .methods import GROUPS, Kind, Method
from .metrics import paired_difference

#: The acceptance criteria of issue 5 refer to CAT at keep_ratio 0.3, start_step 8.
MAIN_KEEP, MAIN_START = 0.3, 8
ADHERENCE_TOLERANCE = 0.03  # "within 3 points"
GROUP_COLOURS = {
    "reference": "#000000",
    "fewer steps": "#7f7f7f",
    "CAT": "#d62728",
    "ablation": "#1f77b4",
    "baseline": "#2ca02c",
    "peer": "#9467bd",
}
CSV_COLUMNS = [
    "name",
    "group",
    "status",
    "steps",
    "keep_ratio",
    "start_step",
    "selection",
    "images",
    "seconds_per_image",
    "wall_speedup",
    "macs_per_image",
    "macs_ratio",
    "macs_speedup",
    "macs_estimated",
    "psnr",
    "psnr_identical",
    "ssim",
    "lpips",
    "colour_at_cell",
    "shape",
    "adherence",
    "clip_score",
    "fid_to_reference",
    "description",
]


def _order(method: Method) -> tuple:
    cfg = method.config
    return (
        GROUPS.index(method.group),
        -method.steps,
        cfg.selection.value if cfg is not None else "",
        -(cfg.keep_ratio if cfg is not None else 0),
        cfg.start_step if cfg is not None else 0,
        method.name,
    )


def build_rows(out_dir: str | os.PathLike) -> tuple[list[dict], dict]:
    """One row per method (skipped ones included, with their reason) joining timings, MACs and scores."""
    out = Path(out_dir)
    settings, caches, skipped = load_generation(out)
    scores = _read_json(out / "scores.json", default={}) or {}
    method_scores = scores.get("methods", {})
    ref = reference_name(settings)
    timings = {c.method.name: timing_summary(c) for c in caches}
    ref_t = timings.get(ref, {})
    rows = []
    for cache in sorted(caches, key=lambda c: _order(c.method)):
        m = cache.method
        t = timings[m.name]
        row = {
            "name": m.name,
            "group": m.group,
            "status": "ok" if m.name in method_scores else "not scored",
            "steps": m.steps,
            "keep_ratio": m.config.keep_ratio if m.config is not None else None,
            "start_step": m.config.start_step if m.config is not None else None,
            "selection": m.config.selection.value if m.config is not None else None,
            "images": t["images"],
            "seconds_per_image": t["seconds_per_image"],
            "macs_per_image": t["macs_per_image"],
            "macs_estimated": t["macs_estimated"],
            "description": m.description,
        }
        if ref_t.get("seconds_per_image") and t["seconds_per_image"]:
            row["wall_speedup"] = ref_t["seconds_per_image"] / t["seconds_per_image"]
        if ref_t.get("macs_per_image") and t["macs_per_image"]:
            row["macs_ratio"] = t["macs_per_image"] / ref_t["macs_per_image"]
            row["macs_speedup"] = ref_t["macs_per_image"] / t["macs_per_image"]
        if "cached_steps_per_call" in t:
            row["cached_steps_per_generation"] = t["cached_steps_per_call"]
        row.update(method_scores.get(m.name, {}).get("summary", {}))
        rows.append(row)
    for name, reason in sorted(skipped.items()):
        rows.append({"name": name, "group": "peer", "status": f"skipped: {reason}", "description": reason})
    return rows, scores


def _find(rows: list[dict], **match) -> dict | None:
    for row in rows:
        if row.get("status") == "ok" and all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def main_cat(rows: list[dict]) -> dict | None:
    """The CAT row the acceptance criteria refer to: keep 0.3 / start 8 if it was run, else the first CAT row with
    keep 0.3, else the first CAT row (shorter test runs use fewer steps)."""
    cats = [r for r in rows if r.get("selection") == "cat" and r.get("status") == "ok"]
    for pick in (
        lambda r: r["keep_ratio"] == MAIN_KEEP and r["start_step"] == MAIN_START,
        lambda r: r["keep_ratio"] == MAIN_KEEP,
        lambda r: True,
    ):
        found = [r for r in cats if pick(r)]
        if found:
            return found[0]
    return None


def _per_image(scores: dict, name: str, key: str) -> list[float] | None:
    return scores.get("methods", {}).get(name, {}).get("per_image", {}).get(key)


def _paired(scores: dict, a: str, b: str, key: str = "psnr") -> dict | None:
    x, y = _per_image(scores, a, key), _per_image(scores, b, key)
    if x is None or y is None:
        return None
    return paired_difference(x, y)


def _db(row: dict) -> str:
    """PSNR of a row as text; identical images have infinite PSNR and are left out of the mean."""
    value = row.get("psnr")
    if value is None:
        return "identical to dense (inf)" if row.get("psnr_identical") else "n/a"
    same = f", {row['psnr_identical']} identical" if row.get("psnr_identical") else ""
    return f"{value:.2f} dB{same}"


def _psnr_key(row: dict) -> float:
    value = row.get("psnr")
    return math.inf if value is None and row.get("psnr_identical") else (value if value is not None else -math.inf)


def _ci(d: dict | None, unit: str = " dB") -> str:
    if d is None:
        return ""
    return f"paired difference {d['mean']:+.2f}{unit} (95% CI {d['ci_low']:+.2f} to {d['ci_high']:+.2f}, n={d['n']})"


def acceptance(rows: list[dict], scores: dict) -> list[dict]:
    """Evaluate issue 5's acceptance criteria on the measured rows (a criterion whose methods are missing is
    reported as not evaluated). Each entry: criterion, holds (True / False / None), detail."""
    out = []
    cat = main_cat(rows)
    ref = _find(rows, group="reference")
    keep, start = (cat["keep_ratio"], cat["start_step"]) if cat is not None else (MAIN_KEEP, MAIN_START)
    cat_label = f"CAT (keep {keep:g}, start {start})"

    crit = f"{cat_label} keeps adherence within 3 points of dense"
    if cat is None or ref is None or ref.get("colour_at_cell") is None:
        out.append(
            {"criterion": crit, "holds": None, "detail": "not evaluated (needs the shapes model, dense and CAT)"}
        )
    else:
        drops = {k: ref[k] - cat[k] for k in ("colour_at_cell", "shape")}
        holds = all(v <= ADHERENCE_TOLERANCE + 1e-12 for v in drops.values())
        detail = "; ".join(
            f"{k}: dense {100 * ref[k]:.1f}%, CAT {100 * cat[k]:.1f}% (drop {100 * v:+.1f} points)"
            for k, v in drops.items()
        )
        out.append({"criterion": crit, "holds": holds, "detail": detail})

    crit = f"at equal or lower MACs and wall-clock, {cat_label} has higher PSNR-to-dense than dense with fewer steps"
    fewer = [r for r in rows if r.get("group") == "fewer steps" and r.get("status") == "ok"]
    if cat is None or not fewer or cat.get("macs_ratio") is None:
        out.append({"criterion": crit, "holds": None, "detail": "not evaluated (needs CAT, dense-fewer-steps, MACs)"})
    else:
        costlier = [r for r in fewer if r.get("macs_ratio", 0) >= cat["macs_ratio"] - 1e-12]
        if not costlier:
            out.append(
                {
                    "criterion": crit,
                    "holds": None,
                    "detail": f"not evaluated: no dense-fewer-steps run has MACs >= CAT's ({cat['macs_ratio']:.3f})",
                }
            )
        else:
            match = min(costlier, key=lambda r: r["macs_ratio"])  # the cheapest dense run that costs at least CAT's
            wall_ok = cat["seconds_per_image"] <= match["seconds_per_image"]
            psnr_ok = _psnr_key(cat) > _psnr_key(match)
            parts = [
                f"matched dense run {match['name']}: MACs ratio {match['macs_ratio']:.3f} vs CAT {cat['macs_ratio']:.3f}",
                f"wall-clock {match['seconds_per_image']:.4g} s/image vs CAT {cat['seconds_per_image']:.4g} s/image"
                + ("" if wall_ok else " (CAT is slower: wall-clock condition fails)"),
                f"PSNR {_db(match)} vs CAT {_db(cat)}",
                _ci(_paired(scores, cat["name"], match["name"])),
            ]
            others = [f"{r['name']} {_db(r)}" for r in sorted(fewer, key=lambda r: -r["steps"]) if r is not match]
            parts.append("other fewer-steps runs: " + ", ".join(others))
            out.append(
                {"criterion": crit, "holds": bool(wall_ok and psnr_ok), "detail": "; ".join(p for p in parts if p)}
            )

    crit = f"at the same budget, {cat_label} beats random, magnitude-only and staleness-only selection on PSNR"
    ablations = [
        _find(rows, selection=s, keep_ratio=keep, start_step=start) for s in ("random", "magnitude", "staleness")
    ]
    if cat is None or any(a is None for a in ablations):
        out.append({"criterion": crit, "holds": None, "detail": "not evaluated (needs CAT and the three ablations)"})
    else:
        wins = [_psnr_key(cat) > _psnr_key(a) for a in ablations]
        detail = "; ".join(
            f"{a['selection']}: {_db(a)} vs CAT {_db(cat)}, {_ci(_paired(scores, cat['name'], a['name']))}"
            for a in ablations
        )
        nc = _find(rows, selection="no_clustering", keep_ratio=keep, start_step=start)
        if nc is not None:
            detail += f"; (not a criterion) no_clustering: {_db(nc)}, {_ci(_paired(scores, cat['name'], nc['name']))}"
        out.append({"criterion": crit, "holds": all(wins), "detail": detail})

    crit = f"{cat_label} against the RAS-style baseline and cache-dit (reported as measured)"
    parts = []
    for row in rows:
        if row.get("group") not in ("baseline", "peer"):
            continue
        if row.get("status") != "ok":
            parts.append(f"{row['name']}: {row['status']}")
            continue
        if cat is None:
            continue
        bits = [f"{row['name']}: PSNR {_db(row)} vs CAT {_db(cat)}"]
        d = _paired(scores, cat["name"], row["name"])
        if d is not None:
            bits.append(_ci(d))
        if row.get("adherence") is not None:
            bits.append(f"adherence {100 * row['adherence']:.1f}% vs CAT {100 * cat['adherence']:.1f}%")
        if row.get("macs_ratio") is not None:
            est = " (estimated)" if row.get("macs_estimated") else ""
            bits.append(f"MACs ratio {row['macs_ratio']:.3f}{est} vs CAT {cat['macs_ratio']:.3f}")
        if row.get("seconds_per_image") is not None:
            bits.append(f"{row['seconds_per_image']:.4g} s/image vs CAT {cat['seconds_per_image']:.4g}")
        parts.append(", ".join(bits))
    out.append({"criterion": crit, "holds": None, "detail": "; ".join(parts) or "no baseline or peer was run"})
    for entry in out[:3]:
        entry["status"] = {True: "holds", False: "miss", None: "not evaluated"}[entry["holds"]]
    out[3]["status"] = "reported"
    return out


# ----------------------------------------------------------------------------------------------------- figures
def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def pareto_plots(rows: list[dict], folder: Path) -> dict[str, str]:
    """Speed-up (wall-clock and MACs) against PSNR-to-dense and against adherence. Returns {title: relative path};
    empty if matplotlib is missing."""
    plt = _matplotlib()
    if plt is None:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    ok = [r for r in rows if r.get("status") == "ok"]
    for y_key, y_label in (("psnr", "PSNR to dense (dB)"), ("adherence", "adherence (mean of colour@cell, shape)")):
        for x_key, x_label in (
            ("wall_speedup", "wall-clock speed-up vs dense"),
            ("macs_speedup", "MACs speed-up vs dense"),
        ):
            points = [r for r in ok if r.get(x_key) is not None and _finite(r.get(y_key))]
            if not points:
                continue
            fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
            fewer = sorted([r for r in points if r["group"] in ("fewer steps", "reference")], key=lambda r: r[x_key])
            if len(fewer) > 1:
                ax.plot([r[x_key] for r in fewer], [r[y_key] for r in fewer], "-", color="#bbbbbb", zorder=1)
            for group in GROUPS:
                pts = [r for r in points if r["group"] == group]
                if pts:
                    ax.scatter(
                        [r[x_key] for r in pts],
                        [r[y_key] for r in pts],
                        c=GROUP_COLOURS[group],
                        label=group,
                        s=36,
                        zorder=2,
                    )
            for i, r in enumerate(sorted(points, key=lambda r: (r[x_key], r[y_key]))):
                dy = (3, -9, 10)[i % 3]  # stagger the labels of points that sit at the same budget
                ax.annotate(r["name"], (r[x_key], r[y_key]), fontsize=6.5, xytext=(4, dy), textcoords="offset points")
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            ax.set_title(f"{y_label.split(' (')[0]} against {x_label.split(' vs')[0]}")
            fig.tight_layout()
            name = f"pareto_{y_key}_{x_key.split('_')[0]}.png"
            fig.savefig(folder / name)
            plt.close(fig)
            made[f"{y_label} vs {x_label}"] = f"{folder.name}/{name}"
    return made


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _label_strip(names: list[str], cell: int, height: int = 30):
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (cell * len(names), height), "white")
    draw = ImageDraw.Draw(strip)
    for j, name in enumerate(names):
        head, _, tail = name.partition("-")
        draw.text((j * cell + 3, 2), head[:20], fill="black")
        draw.text((j * cell + 3, 15), tail[:20], fill="black")
    return strip


def image_grid(caches: list[MethodCache], indices: list[int], path: Path, scale: int = 1) -> None:
    """Rows = seeds (prompt indices), columns = methods, same seed across a row; method names on top."""
    from PIL import Image

    columns = []
    for cache in caches:
        columns.append(load_images([cache.image_path(i) for i in indices]))  # (R, 3, H, W)
    _, _, h, w = columns[0].shape
    cell_h, cell_w = h * scale + 4, w * scale + 4
    strip = _label_strip([c.method.name for c in caches], cell_w)
    canvas = Image.new("RGB", (cell_w * len(caches), strip.height + cell_h * len(indices)), "white")
    canvas.paste(strip, (0, 0))
    for j, images in enumerate(columns):
        for i, image in enumerate(images):
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(array).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (j * cell_w + 2, strip.height + i * cell_h + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def selection_heatmaps(
    caches: list[MethodCache], steps: int, indices: list[int], folder: Path, image_cache: MethodCache | None = None
) -> dict[str, str]:
    """Heat maps of how many steps recomputed each token: the mean over all images per method, and per-image maps
    next to the image for a few seeds. Returns {title: relative path}; empty without matplotlib or token records."""
    plt = _matplotlib()
    recorded = [(c, c.tokens()) for c in caches if c.method.kind is Kind.CATPRUNE]
    recorded = [(c, t) for c, t in recorded if t is not None]
    if plt is None or not recorded:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    cols = min(5, len(recorded))
    rows_n = math.ceil(len(recorded) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.1 * cols, 3.0 * rows_n), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (cache, tokens) in zip(axes.flat, recorded, strict=False):
        gh, gw = (int(g) for g in tokens["grid"])
        mean = tokens["counts"].astype(np.float64).mean(axis=0).reshape(gh, gw)
        im = ax.imshow(mean, vmin=0, vmax=steps, cmap="viridis")
        ax.set_title(f"{cache.method.name}\nmean {mean.mean():.1f}, min {mean.min():.1f}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"steps (of {steps}) that computed each token, mean over all images", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "selection_mean.png")
    plt.close(fig)
    made["mean over all images"] = f"{folder.name}/selection_mean.png"

    fig, axes = plt.subplots(
        len(indices),
        len(recorded) + 1,
        figsize=(2.2 * (len(recorded) + 1), 2.3 * len(indices)),
        dpi=100,
        squeeze=False,
    )
    for i, index in enumerate(indices):
        shown = image_cache if image_cache is not None else recorded[0][0]
        image = load_images([shown.image_path(index)])[0].permute(1, 2, 0).numpy()
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(f"seed {index} ({shown.method.name})", fontsize=7)
        for j, (cache, tokens) in enumerate(recorded, start=1):
            gh, gw = (int(g) for g in tokens["grid"])
            axes[i, j].imshow(tokens["counts"][index].reshape(gh, gw), vmin=0, vmax=steps, cmap="viridis")
            if i == 0:
                axes[i, j].set_title(cache.method.name, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"per image: steps (of {steps}) that computed each token", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "selection_examples.png")
    plt.close(fig)
    made["per image, same seeds"] = f"{folder.name}/selection_examples.png"
    return made


# ---------------------------------------------------------------------------------------------------- writing
def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.4g}"
    return html.escape(str(value))


def write_report(out_dir: str | os.PathLike, grid_rows: int = 6, command: str | None = None) -> dict:
    """Write results.json, results.csv, report.html, plots/, grids/ and heatmaps/ into the evaluation folder.

    Returns the results dict (also written as results.json).

    Example:
        >>> import tempfile
        >>> from catprune.models.shapes import build_random_shapes_pipeline
        >>> from catprune.evaluation import EvalSettings, generate, parse_methods, score
        >>> pipe = build_random_shapes_pipeline(num_layers=1, attention_head_dim=8, num_attention_heads=2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = generate(EvalSettings(num_prompts=2, steps=4), parse_methods("cat:0.5:2", 4), d, pipe=pipe,
        ...                  log=lambda s: None)
        ...     _ = score(d, log=lambda s: None)
        ...     results = write_report(d)
        ...     sorted(p.name for p in Path(d).glob("results.*"))
        ['results.csv', 'results.json']
    """
    out = Path(out_dir)
    settings, caches, skipped = load_generation(out)
    rows, scores = build_rows(out)
    stored = _read_json(out / "settings.json", default={})
    checks = acceptance(rows, scores)
    n = settings.num_prompts
    complete = [
        c for c in sorted(caches, key=lambda c: _order(c.method)) if all(c.image_path(i).is_file() for i in range(n))
    ]
    indices = list(range(min(grid_rows, n)))
    notes = []
    figures: dict[str, dict[str, str]] = {"plots": {}, "grids": {}, "heatmaps": {}}
    if complete:
        image_grid(complete, indices, out / "grids" / "overview.png")
        figures["grids"]["all methods (columns), same seeds (rows)"] = "grids/overview.png"
        focus_names = _focus(rows)
        focus = [c for c in complete if c.method.name in focus_names]
        if len(focus) > 1:
            image_grid(focus, indices, out / "grids" / "focus.png", scale=2)
            figures["grids"]["dense vs CAT vs matched fewer steps / baselines, 2x"] = "grids/focus.png"
    if _matplotlib() is None:
        notes.append("Pareto plots and heat maps skipped: matplotlib is not installed (pip install 'catprune[eval]').")
    else:
        figures["plots"] = pareto_plots(rows, out / "plots")
        reference = next((c for c in complete if c.method.is_reference), None)
        figures["heatmaps"] = selection_heatmaps(complete, settings.steps, indices[:4], out / "heatmaps", reference)
    for status in scores.get("metrics", {}).values():
        if not status.get("available"):
            notes.append(f"{status['name']}: {status['reason']}")
    for name, reason in skipped.items():
        notes.append(f"method {name} skipped: {reason}")

    prompts = settings.prompts()
    results = {
        "grid_prompts": [f"seed {settings.seed + i}: {prompts[i]}" for i in indices],
        "settings": settings.to_dict(),
        "machine": stored.get("machine"),
        "command": command,
        "reference": reference_name(settings),
        "methods": rows,
        "acceptance": checks,
        "notes": notes,
        "figures": figures,
    }
    _write_json(out / "results.json", results)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    (out / "report.html").write_text(_html(results, settings.folder_name()))
    return results


def _focus(rows: list[dict]) -> list[str]:
    names = [r["name"] for r in rows if r.get("group") == "reference"]
    cat = main_cat(rows)
    if cat is not None:
        names.append(cat["name"])
        fewer = [
            r for r in rows if r.get("group") == "fewer steps" and r.get("status") == "ok" and r.get("macs_ratio")
        ]
        costlier = [r for r in fewer if r["macs_ratio"] >= cat.get("macs_ratio", 1)]
        if costlier:
            names.append(min(costlier, key=lambda r: r["macs_ratio"])["name"])
    for sel in ("random", "ras"):
        r = cat and _find(rows, selection=sel, keep_ratio=cat["keep_ratio"], start_step=cat["start_step"])
        if r is not None:
            names.append(r["name"])
    names += [r["name"] for r in rows if r.get("group") == "peer" and r.get("status") == "ok"]
    return names


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f0f0f0; } td.l, th.l { text-align: left; }
tr.reference td { font-weight: bold; } .ok { color: #1a7f37; } .miss { color: #cf222e; } .na { color: #777; }
.scroll { overflow-x: auto; max-width: 100%; } img { margin: 4px 0; } code { background: #f5f5f5; padding: 1px 3px; }
"""

_IMAGE_CHECK = """
<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; });
  var status = document.getElementById("image-status");
  status.dataset.loaded = loaded.length;
  status.dataset.total = images.length;
  status.textContent = loaded.length + " of " + images.length + " images loaded";
  status.className = loaded.length === images.length ? "ok" : "miss";
});
</script>
"""


def _html(results: dict, title: str) -> str:
    e = html.escape
    s = results["settings"]
    machine = results.get("machine") or {}
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>catprune eval: {e(title)}</title><style>{_STYLE}</style></head>",
        "<body>",
        f"<h1>catprune eval: {e(title)}</h1>",
        "<p id='image-status' class='na' data-loaded='' data-total=''>checking images…</p>",
        "<p>",
        f"Model <code>{e(str(s['model']))}</code>, {s['num_prompts']} prompts, {s['steps']} steps, seeds "
        f"{s['seed']}..{s['seed'] + s['num_prompts'] - 1}, batch {s['batch_size']}, device <code>{e(str(s['device']))}</code>"
        f" ({e(str(machine.get('gpu') or machine.get('cpu') or ''))}, torch threads {machine.get('torch_threads')}). "
        f"Reference: <code>{e(results['reference'])}</code>. Wall-clock is per image, end to end, measured in this "
        "run; MACs are the transformer's analytic multiply-accumulates relative to the reference.",
        "</p>",
    ]
    if results.get("command"):
        parts.append(f"<p>Command: <code>{e(results['command'])}</code></p>")
    parts.append(
        "<h2>Acceptance (issue 5)</h2><table><tr><th class='l'>criterion</th><th>holds</th><th class='l'>measured</th></tr>"
    )
    for c in results["acceptance"]:
        css = {"holds": "ok", "miss": "miss"}.get(c["status"], "na")
        mark = f"<span class='{css}'>{'MISS' if c['status'] == 'miss' else e(c['status'])}</span>"
        parts.append(
            f"<tr><td class='l'>{e(c['criterion'])}</td><td>{mark}</td><td class='l'>{e(c['detail'])}</td></tr>"
        )
    parts.append("</table>")

    cols = [
        ("name", "method"),
        ("group", "group"),
        ("steps", "steps"),
        ("macs_ratio", "MACs ratio"),
        ("macs_speedup", "MACs speed-up"),
        ("seconds_per_image", "s / image"),
        ("wall_speedup", "wall speed-up"),
        ("psnr", "PSNR dB"),
        ("ssim", "SSIM"),
        ("lpips", "LPIPS"),
        ("colour_at_cell", "colour@cell"),
        ("shape", "shape"),
        ("clip_score", "CLIP"),
        ("status", "status"),
    ]
    present = [c for c in cols if any(r.get(c[0]) is not None for r in results["methods"])]
    parts.append("<h2>Results</h2><div class='scroll'><table><tr>")
    parts += [f"<th class='{'l' if k in ('name', 'group', 'status') else ''}'>{e(label)}</th>" for k, label in present]
    parts.append("</tr>")
    for r in results["methods"]:
        parts.append(f"<tr class='{e(r.get('group', '')).replace(' ', '-')}' title='{e(r.get('description', ''))}'>")
        for k, _ in present:
            value = r.get(k)
            if k == "macs_ratio" and r.get("macs_estimated") and value is not None:
                text = _cell(value) + " (est.)"
            else:
                text = _cell(value)
            parts.append(f"<td class='{'l' if k in ('name', 'group', 'status') else ''}'>{text}</td>")
        parts.append("</tr>")
    parts.append("</table></div>")
    parts.append(
        "<p>Methods: "
        + "; ".join(f"<code>{e(r['name'])}</code>: {e(r.get('description', ''))}" for r in results["methods"])
        + "</p>"
    )
    if results["notes"]:
        parts.append("<h2>Skipped</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in results["notes"]) + "</ul>")
    for section, heading in (("plots", "Pareto plots"), ("grids", "Image grids"), ("heatmaps", "Selection heat maps")):
        figures = results["figures"].get(section) or {}
        if not figures:
            continue
        parts.append(f"<h2>{heading}</h2>")
        if section == "grids":
            parts.append("<p>Rows: " + "; ".join(e(p) for p in results.get("grid_prompts", [])) + "</p>")
        if section == "heatmaps":
            parts.append(
                "<p>How many of the steps computed each image token (dense and capture steps compute all tokens; a "
                "pruned step computes its k selected tokens). Uniform maps mean evenly spread refreshes; bright "
                "regions were recomputed more often.</p>"
            )
        for caption, rel in figures.items():
            parts.append(
                f"<figure><figcaption>{e(caption)}</figcaption><div class='scroll'><img src='{e(rel)}' alt='{e(caption)}'></div></figure>"
            )
    parts.append(_IMAGE_CHECK)
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = ["acceptance", "build_rows", "image_grid", "pareto_plots", "selection_heatmaps", "write_report"]
