"""Where a step's time goes: torch.profiler over N consecutive transformer calls of each step kind (the stock dense
step, catprune's dense step, catprune's full-selection step, the pruned step) in a real generation, kernel time
grouped into categories (GEMM, attention/SDPA, gather/scatter/index, elementwise/norm, selection/topk/sort, copies,
other) by kernel-name patterns. Prints one table (ms per step, categories by kind, and how much each category
shrinks from the full-selection to the pruned step against the MACs ratio) and writes JSON.

Usage (GPU):
    python scripts/profile_step.py --preset sd3-medium --mode cudagraph --replays 5 --json $OUT/profile.json
    python scripts/profile_step.py --preset sd3-medium --mode compile --kinds pruned --operators   # which op is which
On a CPU it runs the tiny preset (sd3-tiny at 64x64, fp32) unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from catprune.bench import MODES, _embeddings, build_pipeline, environment
from catprune.bench.baselines import DENSE_BASELINES
from catprune.bench.profiling import CATEGORY_NAMES, KINDS, profile_kind


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="default: sd3-medium on a GPU, sd3-tiny on a CPU")
    p.add_argument("--size", default=None, help="WxH; default 1024x1024 on a GPU, 64x64 on a CPU")
    p.add_argument("--mode", default="eager", choices=MODES, help="catprune's backend for dense / full / pruned")
    p.add_argument("--stock", default="eager", choices=DENSE_BASELINES, help="configuration of the stock step")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    p.add_argument("--replays", type=int, default=5, help="consecutive calls profiled per kind")
    p.add_argument("--keep-ratio", type=float, default=0.3)
    p.add_argument("--start-step", type=int, default=None, help="default 8 on a GPU, 3 on a CPU")
    p.add_argument("--context", default="reuse", choices=("reuse", "extrapolate"), help="CATConfig.context")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--no-cfg", action="store_true")
    p.add_argument("--dtype", default=None, help="default bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--operators", action="store_true",
        help="also list the operators with the most self time, by input shapes (which eager op launched a kernel; "
        "use --mode eager or compile: kernels replayed from a CUDA graph belong to no operator)",
    )
    args = p.parse_args(argv)
    args.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = torch.device(args.device).type == "cpu"
    args.preset = args.preset or ("sd3-tiny" if cpu else "sd3-medium")
    args.size = args.size or ("64x64" if cpu else "1024x1024")
    args.start_step = args.start_step if args.start_step is not None else (3 if cpu else 8)
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    args.kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in args.kinds if k not in KINDS]
    if bad:
        p.error(
            f"argument --kinds: expected a comma list of {', '.join(KINDS)}, got {bad[0]!r}; e.g. --kinds full,pruned"
        )
    return args


def format_report(report: dict) -> str:
    kinds = list(report["kinds"])
    rows = report["kinds"]
    shrink = "full" in rows and "pruned" in rows
    head = f"{'ms per step':<22}" + "".join(f"{k:>10}" for k in kinds) + (f"{'full/pruned x':>15}" if shrink else "")
    lines = [head, "-" * len(head)]

    def line(label, values):
        text = f"{label:<22}" + "".join(f"{v:>10.3f}" for v in values)
        if shrink and values[kinds.index("pruned")] > 0:
            text += f"{values[kinds.index('full')] / values[kinds.index('pruned')]:>15.2f}"
        return text

    for category in CATEGORY_NAMES:
        lines.append(line(category, [rows[k]["categories"][category] for k in kinds]))
    lines.append(line("kernel total", [rows[k]["kernel_ms"] for k in kinds]))
    lines.append(line("wall (timed run)", [rows[k]["wall_ms"] for k in kinds]))
    lines.append(line("wall - kernels", [rows[k]["wall_ms"] - rows[k]["kernel_ms"] for k in kinds]))
    if shrink and rows["full"]["macs"] and rows["pruned"]["macs"]:
        lines.append(f"MACs full / pruned step: {rows['full']['macs'] / rows['pruned']['macs']:.2f} x")
    lines.append(line("launches per step", [rows[k].get("launches", 0.0) for k in kinds]))
    for kind in kinds:
        lines.append(f"top {kind} (ms per step, launches per step):")
        for name, ms, _, launches in rows[kind]["top"][:10]:
            lines.append(f"  {ms:8.3f} {launches:6.1f}  {name[:100]}")
        if rows[kind].get("operators"):
            lines.append(f"top {kind} operators (self ms per step, calls per step, input shapes):")
            for name, shapes, ms, count in rows[kind]["operators"]:
                lines.append(f"  {ms:8.3f} {count:6.1f}  {name[:40]:<40} {shapes[:100]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    width, height = (int(x) for x in args.size.lower().split("x"))
    dtype = getattr(torch, args.dtype)
    pipe, entry = build_pipeline(args.preset, args.device, dtype)
    embeds = _embeddings(pipe, entry, args.batch_size, args.device, dtype, cfg=False if args.no_cfg else None)
    kwargs = dict(**embeds, height=height, width=width, output_type="latent")
    report = dict(
        environment=environment(),
        preset=args.preset,
        size=args.size,
        mode=args.mode,
        stock=args.stock,
        replays=args.replays,
        keep_ratio=args.keep_ratio,
        start_step=args.start_step,
        context=args.context,
        device=args.device,
        kinds={},
    )
    with torch.no_grad():
        for kind in args.kinds:
            report["kinds"][kind] = profile_kind(
                pipe, kwargs, kind, args.device, args.replays, args.mode, args.stock, args.keep_ratio, args.start_step,
                {"context": args.context}, operators=args.operators,
            )
    text = format_report(report)
    print(text)
    hidden = [k for k, row in report["kinds"].items() if row["kernel_ms"] < 0.1 * row["wall_ms"]]
    if hidden and torch.device(args.device).type == "cuda":
        print(
            f"note: kernel time under 10% of wall time for {', '.join(hidden)}: the profiler may not see kernels "
            "inside CUDA graph replays here; profile again with --mode eager (same kernels, launched one by one)"
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
