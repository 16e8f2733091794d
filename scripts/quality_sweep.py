#!/usr/bin/env python3
"""Quality per cost: PSNR to the dense 28-step images against the MACs ratio, for fewer dense steps and for CAT
Pruning variants (context reuse / extrapolate, keep ratios, schedules, refreshes). Public API only.

Prompts: the model's held-out captions (``random_captions(n, seed=20000)``); image i uses a generator seeded
``1000 + i``; all prompts run as one batch per row. PSNR is per image (images in [0, 1]) and then averaged; the
MACs ratio is catprune's analytic count of the run over the dense 28-step run's.

Examples:
    python scripts/quality_sweep.py --num-prompts 8                              # CPU, shapes, every row
    python scripts/quality_sweep.py --model scenes --only dense-15,cat-x-0.3      # a few rows
    python scripts/quality_sweep.py --device cuda --num-prompts 200 --json sweep.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import catprune  # noqa: E402
from catprune import CATConfig  # noqa: E402

STEPS = 28
CAPTION_SEED = 20_000


def rows() -> dict[str, tuple[int, CATConfig | None]]:
    """Named rows: (inference steps, CATConfig or None for dense). ``x`` rows pin ``forecast_max_ratio=1.0`` (the
    best cap on shapes, as docs/quality_per_cost.md reports them); ``cat-x5-0.3`` is the library default."""
    table: dict[str, tuple[int, CATConfig | None]] = {f"dense-{n}": (n, None) for n in (8, 12, 15, 20)}
    for keep in (0.2, 0.3, 0.4, 0.5):
        table[f"cat-r-{keep}"] = (STEPS, CATConfig(keep_ratio=keep, start_step=8, context="reuse"))
        table[f"cat-x-{keep}"] = (
            STEPS,
            CATConfig(keep_ratio=keep, start_step=8, context="extrapolate", forecast_max_ratio=1.0),
        )
    table["cat-x-0.33"] = (
        STEPS,
        CATConfig(keep_ratio=0.33, start_step=8, context="extrapolate", forecast_max_ratio=1.0),
    )
    for context, tag in (("extrapolate", "x"), ("reuse", "r")):  # schedules and refreshes at MACs ~0.5
        table[f"cat-{tag}-0.5to0.15"] = (
            STEPS,
            CATConfig(keep_ratio=0.5, keep_ratio_end=0.15, context=context, forecast_max_ratio=1.0),
        )
        table[f"cat-{tag}-0.2-refresh7"] = (
            STEPS,
            CATConfig(keep_ratio=0.2, refresh_every=7, context=context, forecast_max_ratio=1.0),
        )
    table["cat-x-0.15to0.5"] = (
        STEPS,
        CATConfig(keep_ratio=0.15, keep_ratio_end=0.5, context="extrapolate", forecast_max_ratio=1.0),
    )
    for keep, start in ((0.3, 6), (0.38, 6), (0.25, 10), (0.2, 11), (0.4, 5), (0.42, 4), (0.35, 7)):  # start vs keep
        for context, tag in (("extrapolate", "x"), ("reuse", "r")):
            config = CATConfig(keep_ratio=keep, start_step=start, context=context, forecast_max_ratio=1.0)
            table[f"cat-{tag}-{keep}-start{start}"] = (STEPS, config)
    table["cat-x5-0.3"] = (STEPS, CATConfig(keep_ratio=0.3, start_step=8))  # the library default: cap 0.5
    for cache_dtype in ("bf16", "fp8"):  # low-precision caches: the default and the paper's context
        table[f"cat-x5-0.3-{cache_dtype}"] = (STEPS, CATConfig(keep_ratio=0.3, start_step=8, cache_dtype=cache_dtype))
        config = CATConfig(keep_ratio=0.3, start_step=8, context="reuse", cache_dtype=cache_dtype)
        table[f"cat-r-0.3-{cache_dtype}"] = (STEPS, config)
    return table


def generate(pipe, prompts, steps, config, device):
    """Images (N, 3, H, W) in [0, 1] and the run's analytic MACs."""
    catprune.apply(pipe, config if config is not None else CATConfig(keep_ratio=1.0))  # 1.0: dense, still counted
    generators = [torch.Generator(device).manual_seed(1000 + i) for i in range(len(prompts))]
    try:
        images = pipe(list(prompts), num_inference_steps=steps, generator=generators, output_type="pt").images
        macs = catprune.stats(pipe).macs
    finally:
        catprune.remove(pipe)
    return images.float().cpu(), macs


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12)  # (N,)
    return (10 * torch.log10(1 / mse)).mean().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes", choices=("shapes", "scenes"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--only", default=None, help="comma-separated row names (default: all); see rows()")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--cache", default=None, help="a folder to keep the dense 28-step reference in between runs")
    args = p.parse_args(argv)
    table = rows()
    names = args.only.split(",") if args.only else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"--only: unknown rows {unknown}; expected some of {list(table)}")
    world = importlib.import_module(f"catprune.models.{args.model}.world")
    prompts = world.random_captions(args.num_prompts, seed=CAPTION_SEED)
    pipe = catprune.load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    cache = Path(args.cache) / f"{args.model}-{args.device}-{len(prompts)}.pt" if args.cache else None
    if cache is not None and cache.exists():  # the dense 28-step reference of an earlier run
        reference, macs_ref = torch.load(cache).values()
    else:
        reference, macs_ref = generate(pipe, prompts, STEPS, None, args.device)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"images": reference, "macs": macs_ref}, cache)
    results = []
    print(f"{'row':24s} {'MACs':>6s} {'PSNR dB':>8s}  (to dense-{STEPS}, {args.model}, {len(prompts)} prompts)")
    for name in names:
        steps, config = table[name]
        start = time.time()
        images, macs = generate(pipe, prompts, steps, config, args.device)
        row = {"row": name, "steps": steps, "macs_ratio": macs / macs_ref, "psnr": psnr(images, reference)}
        row["config"] = config.to_dict() if config is not None else None
        results.append(row)
        print(f"{name:24s} {row['macs_ratio']:6.3f} {row['psnr']:8.2f}  ({time.time() - start:.0f}s)", flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"model": args.model, "prompts": len(prompts), "rows": results}, indent=1)
        )


if __name__ == "__main__":
    main()
