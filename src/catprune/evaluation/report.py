"""The evaluation's outputs: results.json, results.csv and report.html (settings, how CAT compares, the results
table, figures), built from the generation cache and scores.json.

Example:
    >>> cell(0.51234, "macs_ratio"), cell(0.51234, "ssim"), cell(float("inf"), "psnr"), cell(True)
    ('0.512', '0.5123', 'inf', 'yes')
"""

from __future__ import annotations

import csv
import html
import math
import os
from collections.abc import Callable
from pathlib import Path

from . import compare, figures
from .files import read_json, write_json, write_text
from .gpu_time import TimeStandIn
from .settings import reference_name
from .store import load_generation

Log = Callable[[str], None]

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
    "gpu_time_ratio",
    "gpu_speedup",
    "psnr",
    "psnr_identical",
    "ssim",
    "colour_at_cell",
    "shape",
    "adherence",
    "clip_score",
    "fid_to_reference",
    "description",
]
#: Columns of the HTML results table (shown when some row has a value).
TABLE_COLUMNS = [
    ("name", "method"),
    ("group", "group"),
    ("steps", "steps"),
    ("macs_ratio", "MACs ratio"),
    ("macs_speedup", "MACs speed-up"),
    ("seconds_per_image", "s / image"),
    ("wall_speedup", "wall speed-up"),
    ("gpu_speedup", "modelled GPU speed-up"),
    ("psnr", "PSNR dB"),
    ("ssim", "SSIM"),
    ("colour_at_cell", "colour@cell"),
    ("shape", "shape"),
    ("identity_top1", "identity top-1"),
    ("clip_score", "CLIP"),
    ("status", "status"),
]
LPIPS_NOTE = (
    "LPIPS is not reported: no PyPI package ships its complete weights (the lpips package downloads its AlexNet / "
    "VGG backbone through torchvision at run time) and an evaluation never downloads. PSNR and SSIM measure "
    "fidelity to the dense images instead."
)


def _print(message: str) -> None:
    print(message, flush=True)


def cell(value, key: str = "") -> str:
    """A table cell: MACs ratios with 3 decimals, other floats with 4 significant digits, booleans as yes / no."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.3f}" if key == "macs_ratio" else f"{value:.4g}"
    return html.escape(str(value))


def _focus(rows: list[dict]) -> tuple[list[str], str]:
    """The methods of the focus grid and its title (naming only what it shows)."""
    names = [r["name"] for r in rows if r.get("group") == "reference"]
    parts = ["dense"]
    cat = compare.main_cat(rows)
    if cat is not None:
        names.append(cat["name"])
        parts.append("CAT")
        match = compare.matched_dense_run(rows, cat, costlier_only=False)
        if match is not None:
            names.append(match["name"])
            parts.append(f"matched fewer steps ({match['name']})")
    others = [
        r["name"]
        for sel in ("random", "ras")
        if cat is not None
        and (r := compare.find(rows, selection=sel, keep_ratio=cat["keep_ratio"], start_step=cat["start_step"]))
    ]
    others += [r["name"] for r in rows if r.get("group") == "peer" and r.get("status") == "ok"]
    if others:
        parts.append("baselines / peers")
    return names + others, " vs ".join(parts) + ", 2x"


def _figures(out: Path, settings, rows, complete, indices, log: Log, gpu_label=None) -> tuple[dict, list[str]]:
    made: dict[str, dict[str, str]] = {"plots": {}, "grids": {}, "heatmaps": {}}
    notes = []
    if complete:
        log("[eval] report: image grids ...")
        figures.image_grid(complete, indices, out / "grids" / "overview.png")
        made["grids"]["all methods (columns), same seeds (rows)"] = "grids/overview.png"
        focus_names, title = _focus(rows)
        focus = [c for c in complete if c.method.name in focus_names]
        if len(focus) > 1:
            figures.image_grid(focus, indices, out / "grids" / "focus.png", scale=2)
            made["grids"][title] = "grids/focus.png"
    if figures.matplotlib_pyplot() is None:
        notes.append("Pareto plots and heat maps skipped: matplotlib is not installed (pip install 'catprune[eval]').")
    else:
        log("[eval] report: Pareto plots ...")
        made["plots"] = figures.pareto_plots(rows, out / "plots", gpu_label)
        log("[eval] report: selection heat maps ...")
        reference = next((c for c in complete if c.method.is_reference), None)
        made["heatmaps"] = figures.selection_heatmaps(
            complete, settings.steps, indices[:4], out / "heatmaps", reference
        )
    return made, notes


def write_report(
    out_dir: str | os.PathLike,
    grid_rows: int = 6,
    command: str | None = None,
    log: Log = _print,
    time_model: TimeStandIn | None = None,
) -> dict:
    """Write results.json, results.csv, report.html, plots/, grids/ and heatmaps/ into the evaluation folder.
    ``time_model``: charge dense and catprune runs a full-size model's GPU step times too (`gpu_time`): a column,
    a Pareto plot and a comparison at equal modelled time.

    Returns the results dict (also written as results.json).

    Example:
        >>> import tempfile
        >>> from catprune.models.shapes import build_random_shapes_pipeline
        >>> from catprune.evaluation import EvalSettings, generate, parse_methods, score
        >>> pipe = build_random_shapes_pipeline(num_layers=1, attention_head_dim=8, num_attention_heads=2)
        >>> quiet = lambda s: None
        >>> settings = EvalSettings(model="shapes", num_prompts=2, steps=4)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = generate(settings, parse_methods("cat:0.5:2", 4), d, pipe=pipe, log=quiet)
        ...     _ = score(d, log=quiet)
        ...     results = write_report(d, log=quiet)
        ...     sorted(p.name for p in Path(d).glob("results.*"))
        ['results.csv', 'results.json']
    """
    out = Path(out_dir)
    settings, caches, skipped = load_generation(out)
    rows, scores = compare.build_rows(out, time_model)
    n = settings.num_prompts
    complete = [c for c in sorted(caches, key=lambda c: compare.order(c.method)) if c.complete(n)]
    indices = list(range(min(grid_rows, n)))
    gpu_label = None if time_model is None else f"modelled GPU speed-up, {time_model.label}"
    made, notes = _figures(out, settings, rows, complete, indices, log, gpu_label)
    for status in scores.get("metrics", {}).values():
        if not status.get("available") and status.get("name") != "lpips":
            notes.append(f"{status['name']}: {status['reason']}")
    notes.append(LPIPS_NOTE)
    notes += [f"method {name} skipped: {reason}" for name, reason in skipped.items()]
    prompts = settings.prompts()
    results = {
        "grid_prompts": [f"seed {settings.seed + i}: {prompts[i]}" for i in indices],
        "settings": settings.to_dict(),
        "machine": (read_json(out / "settings.json", default={}) or {}).get("machine"),
        "command": command,
        "reference": reference_name(settings),
        "methods": rows,
        "comparisons": compare.comparisons(rows, scores, time_model),
        "time_model": None if time_model is None else time_model.label,
        "notes": notes,
        "figures": made,
    }
    log("[eval] report: results.json, results.csv, report.html ...")
    write_json(out / "results.json", results)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    write_text(out / "report.html", _html(results, settings.folder_name()))
    return results


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

_COMPARISON_INTRO = (
    "Each line compares CAT's main configuration with something a user could run instead: the dense model with "
    "fewer steps at equal or higher cost, other token-selection rules at exactly the same budget, and the RAS-style "
    "baseline and cache-dit. <b>holds</b> / <b>miss</b> is the verdict on the measured numbers; <b>not evaluated</b> "
    "means a method the comparison needs was not run (<code>--methods quick</code> runs all of them)."
)


def _html_header(results: dict, title: str) -> list[str]:
    e = html.escape
    s = results["settings"]
    machine = results.get("machine") or {}
    where = machine.get("gpu") or machine.get("cpu") or ""
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>catprune eval: {e(title)}</title><style>{_STYLE}</style></head>",
        "<body>",
        f"<h1>catprune eval: {e(title)}</h1>",
        "<p id='image-status' class='na' data-loaded='' data-total=''>checking images…</p>",
        "<p>",
        f"Model <code>{e(str(s['model']))}</code>, {s['num_prompts']} prompts, {s['steps']} steps, seeds "
        f"{s['seed']}..{s['seed'] + s['num_prompts'] - 1}, batch {s['batch_size']}, device "
        f"<code>{e(str(s['device']))}</code> ({e(str(where))}, torch threads {machine.get('torch_threads')}). "
        f"Reference: <code>{e(results['reference'])}</code>. Wall-clock is per image, end to end, measured in this "
        "run; MACs are the transformer's analytic multiply-accumulates relative to the reference.",
        "</p>",
    ]
    if results.get("command"):
        parts.append(f"<p>Command: <code>{e(results['command'])}</code></p>")
    return parts


def _html_comparisons(results: dict) -> list[str]:
    e = html.escape
    parts = [
        f"<h2>How CAT compares</h2><p>{_COMPARISON_INTRO}</p>",
        "<table><tr><th class='l'>comparison</th><th>verdict</th><th class='l'>measured</th></tr>",
    ]
    for c in results["comparisons"]:
        css = {"holds": "ok", "miss": "miss"}.get(c["status"], "na")
        mark = f"<span class='{css}'>{'MISS' if c['status'] == 'miss' else e(c['status'])}</span>"
        parts.append(
            f"<tr><td class='l'>{e(c['criterion'])}</td><td>{mark}</td><td class='l'>{e(c['detail'])}</td></tr>"
        )
    parts.append("</table>")
    return parts


def _html_table(results: dict) -> list[str]:
    e = html.escape
    present = [c for c in TABLE_COLUMNS if any(r.get(c[0]) is not None for r in results["methods"])]
    left = ("name", "group", "status")
    parts = ["<h2>Results</h2><div class='scroll'><table><tr>"]
    parts += [f"<th class='{'l' if k in left else ''}'>{e(label)}</th>" for k, label in present]
    parts.append("</tr>")
    for r in results["methods"]:
        parts.append(f"<tr class='{e(r.get('group', '')).replace(' ', '-')}' title='{e(r.get('description', ''))}'>")
        for k, _ in present:
            text = cell(r.get(k), k)
            if k == "macs_ratio" and r.get("macs_estimated") and r.get(k) is not None:
                text += " (est.)"
            parts.append(f"<td class='{'l' if k in left else ''}'>{text}</td>")
        parts.append("</tr>")
    parts.append("</table></div>")
    parts.append(
        "<p>Methods: "
        + "; ".join(f"<code>{e(r['name'])}</code>: {e(r.get('description', ''))}" for r in results["methods"])
        + "</p>"
    )
    return parts


def _html_figures(results: dict) -> list[str]:
    e = html.escape
    parts = []
    for section, heading in (("plots", "Pareto plots"), ("grids", "Image grids"), ("heatmaps", "Selection heat maps")):
        made = results["figures"].get(section) or {}
        if not made:
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
        for caption, rel in made.items():
            parts.append(
                f"<figure><figcaption>{e(caption)}</figcaption><div class='scroll'><img src='{e(rel)}' "
                f"alt='{e(caption)}'></div></figure>"
            )
    return parts


def _html(results: dict, title: str) -> str:
    parts = _html_header(results, title) + _html_comparisons(results) + _html_table(results)
    if results["notes"]:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in results["notes"])
        parts.append(f"<h2>Not measured</h2><ul>{items}</ul>")
    parts += _html_figures(results)
    parts += [_IMAGE_CHECK, "</body></html>"]
    return "\n".join(parts)


__all__ = ["CSV_COLUMNS", "cell", "write_report"]
