"""``catprune eval``: quality against speed for dense, fewer steps, CAT Pruning, ablations, baselines and peers.

Phases (``--phase``): ``generate`` (images, timings, MACs; cached on disk, resumable), ``score`` (metrics from the
cache), ``report`` (results.json, results.csv, report.html with plots, grids and heat maps), or ``all`` (default).

Example:
    >>> parser = build_parser()
    >>> args = parser.parse_args(["--num-prompts", "20", "--steps", "8", "--methods", "quick"])
    >>> args.phase, args.num_prompts, args.methods
    ('all', 20, 'quick')
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .options import DTYPE_HELP, dtype_name, finite_float, positive_int, resolve_device, seed

PHASES = ("all", "generate", "score", "report")


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--phase", default="all", choices=PHASES, help="which phase(s) to run (default: all)")
    from ..evaluation.registry import registered, resolve
    from ..models import DEFAULT_MODEL

    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a registered model ({', '.join(registered())}; both embedded and offline: scenes, the default, emoji "
        "objects scored by identity; shapes, the fast alternative, flat shapes) or a hub id / local pipeline folder "
        f"(default: {DEFAULT_MODEL})",
    )
    p.add_argument("--num-prompts", type=positive_int, default=200, help="prompts to evaluate (default 200)")
    p.add_argument(
        "--prompt-seed",
        type=seed,
        default=None,
        help="seed of the model's prompt generator (default: the model's held-out set: "
        f"{resolve('scenes').held_out_seed} for scenes, {resolve('shapes').held_out_seed} for shapes)",
    )
    p.add_argument("--prompts", default=None, help="text file with one prompt per line (required for hub models)")
    p.add_argument(
        "--steps", type=positive_int, default=28, help="denoising steps of the dense reference (default 28)"
    )
    p.add_argument(
        "--methods",
        default="default",
        help="comma-separated methods or presets: default, quick, dense[:STEPS], cat[:KEEP:START], random, "
        "magnitude, staleness, no_clustering, ras (same form), dbcache[:THRESHOLD] (default: default)",
    )
    p.add_argument("--seed", type=seed, default=0, help="image j is generated with seed SEED + j (default 0)")
    p.add_argument(
        "--guidance-scale", type=finite_float, default=None, help="classifier-free guidance (pipeline default)"
    )
    p.add_argument("--height", type=positive_int, default=None, help="image height (pipeline default)")
    p.add_argument("--width", type=positive_int, default=None, help="image width (pipeline default)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per pipeline call (default 8)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", type=dtype_name, default="float32", help=f"model dtype: {DTYPE_HELP}")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="outputs/eval", help="root folder; the run goes to OUT/<settings name>")
    p.add_argument("--folder", default=None, help="an existing evaluation folder to score / report (skips --out)")
    p.add_argument("--force", action="store_true", help="regenerate even where images are cached")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up image of every method")
    p.add_argument("--grid-rows", type=positive_int, default=6, help="seeds shown in the image grids (default 6)")
    p.add_argument("--list-methods", action="store_true", help="print the methods that would run, then exit")
    p.add_argument(
        "--time-model",
        type=_time_model,
        default=None,
        help="PRESET[:BACKEND[:HEIGHTxWIDTH]]: also charge every dense and catprune run the GPU time it would take "
        "at that model's measured step times (default backend compile+cudagraph, 1024x1024), e.g. sd3-medium: a "
        "column, a Pareto plot and a comparison at equal time; for small models whose own GPU times say little",
    )
    return p


def _time_model(text: str):
    from ..evaluation.gpu_time import TimeStandIn

    try:
        return TimeStandIn.parse(text, who="")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with the ``eval`` options (the ``catprune`` command adds them as a subcommand)."""
    return _configure(argparse.ArgumentParser(prog="catprune eval", description=__doc__.splitlines()[0]))


def add_parser(sub) -> None:
    """Register ``eval`` on the ``catprune`` command's subparsers."""
    p = sub.add_parser(
        "eval",
        help="evaluate quality vs speed: dense, fewer steps, CAT, ablations, RAS-style, cache-dit",
        description="Generate (cached), score and report: dense at N steps (reference), dense with fewer steps, CAT "
        "at several keep ratios / start steps, ablations and the RAS-style baseline at CAT's budget, cache-dit's "
        "DBCache when installed. Writes results.json, results.csv and report.html.",
    )
    _configure(p)
    p.set_defaults(func=run)


def _settings(args):
    from ..evaluation import EvalSettings

    device = resolve_device(args.device)
    return EvalSettings(
        model=args.model,
        num_prompts=args.num_prompts,
        prompt_seed=args.prompt_seed,
        prompts_file=args.prompts,
        steps=args.steps,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        device=device,
        dtype=args.dtype,
    )


#: (row key, header, format) of the printed table; the optional ones only when some row has a value
_COLUMNS = [("macs_ratio", "MACs", "6.3f"), ("seconds_per_image", "s/img", "8.4f"), ("wall_speedup", "wall x", "7.2f")]
_OPTIONAL = [("gpu_speedup", "gpu x", "6.2f")]
_SCORES = [("ssim", "SSIM", "6.4f"), ("colour_at_cell", "col@cell", "8.3f"), ("shape", "shape", "6.3f"),
           ("identity_top1", "identity", "8.3f")]  # fmt: skip


def _table(results: dict) -> str:
    """The results as a text table: the columns the rows have (the model's own adherence scores, the modelled
    GPU speed-up when `--time-model` was given) and the comparisons under it."""
    rows = results["methods"]
    ok = [r for r in rows if r.get("status") == "ok"]
    present = list(_COLUMNS)
    present += [c for c in _OPTIONAL if any(r.get(c[0]) is not None for r in ok)]
    scores = [c for c in _SCORES if any(r.get(c[0]) is not None for r in ok)]
    name_w = max([24] + [len(r["name"]) for r in rows])

    def cell(value, spec):
        width = spec.split(".")[0]
        return f"{'-':>{width}}" if value is None else format(value, spec)

    head = [f"{'method':<{name_w}} {'group':<12}"] + [f"{h:>{f.split('.')[0]}}" for _, h, f in present]
    head += [f"{'PSNR':>7}"] + [f"{h:>{f.split('.')[0]}}" for _, h, f in scores]
    lines = [" ".join(head)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['name']:<{name_w}} {r.get('group', ''):<12} {r.get('status', '')}")
            continue
        psnr = "inf" if r.get("psnr") is None and r.get("psnr_identical") else cell(r.get("psnr"), "7.2f")
        parts = [f"{r['name']:<{name_w}} {r['group']:<12}"] + [cell(r.get(k), f) for k, _, f in present]
        lines.append(" ".join(parts + [f"{psnr:>7}"] + [cell(r.get(k), f) for k, _, f in scores]))
    for check in results["comparisons"]:
        lines.append(f"[{check['status'].upper()}] {check['criterion']}: {check['detail']}")
    return "\n".join(lines)


def _command(args) -> str:
    """The ``catprune eval`` command line that reproduces these options (non-default ones only)."""
    defaults = vars(build_parser().parse_args([]))
    words = ["catprune", "eval"]
    for key, value in vars(args).items():
        if key not in defaults or value == defaults[key] or key in ("phase", "folder", "force", "list_methods"):
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def run(args) -> int:
    """Entry point of ``catprune eval``."""
    from ..evaluation import generate, parse_methods, score, write_report

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.folder is not None:
        if args.phase in ("all", "generate"):
            raise ValueError(
                "catprune eval: --folder: expected --phase score or --phase report with an existing folder, got "
                f"--phase {args.phase}. Use --out to generate, or add --phase score."
            )
        folder = Path(args.folder)
    else:
        settings = _settings(args)
        folder = Path(args.out) / settings.folder_name()
        methods = parse_methods(args.methods, steps=settings.steps)
        if args.list_methods:
            for m in methods:
                print(f"{m.name:<26} {m.group:<12} {m.description}")
            return 0
        if args.phase in ("all", "generate"):
            with _phase("generate"):
                generate(settings, methods, folder, force=args.force, warmup=not args.no_warmup)
    if args.phase in ("all", "score"):
        with _phase("score"):
            score(folder)
    if args.phase in ("all", "score", "report"):
        with _phase("report"):
            results = write_report(
                folder, grid_rows=args.grid_rows, command=_command(args), time_model=args.time_model
            )
        print(_table(results))
        print(f"report: {folder / 'report.html'}")
    return 0


class _phase:
    """Print when a phase starts and how long it took."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.started = time.perf_counter()
        print(f"[eval] phase {self.name} ...", flush=True)

    def __exit__(self, kind, value, traceback):
        if kind is None:
            print(f"[eval] phase {self.name}: done in {time.perf_counter() - self.started:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run ``catprune eval`` stand-alone (``python -m catprune.cli.eval_cmd``)."""
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
