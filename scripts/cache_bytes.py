#!/usr/bin/env python3
"""Cache bytes of a full-size SD3 transformer without a GPU: build the preset's config with ``--layers`` blocks
(random weights, CPU), run dense / capture / pruned steps through catprune, read ``catprune.inspect`` and scale the
per-block K/V bytes to the preset's depth (the other caches are shared by the blocks and do not scale). Public API
only. The blocks must be alike (SD3-medium; not SD3.5-medium's dual-attention blocks).

Example (about 2.5 minutes per row on two CPU cores):
    python scripts/cache_bytes.py --preset sd3-medium --size 1024x1024 --cache-dtypes none,fp8 --contexts reuse
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import catprune  # noqa: E402
from catprune.models import model_configs  # noqa: E402
from catprune.models.testing import tiny_sd3_inputs  # noqa: E402


def measure(model, inputs, config: catprune.CATConfig, depth: int, layers: int) -> dict:
    """K/V and total cache GiB of ``config`` scaled from ``layers`` blocks to ``depth``."""
    catprune.apply(model, config)
    b = inputs["hidden_states"].shape[0]
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0):  # start_step 2: dense (reference), capture, pruned
            model(**inputs, timestep=torch.full((b,), t))
    view = catprune.inspect(model)
    catprune.remove(model)
    kv = view.kv_cache_bytes * depth / layers
    shared = view.cache_bytes - view.kv_cache_bytes
    return dict(
        kv_gib=kv / 2**30, shared_gib=shared / 2**30, total_gib=(kv + shared) / 2**30, dtype=view.kv_cache_dtype
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd3-medium")
    p.add_argument("--size", default="1024x1024", help="WxH in pixels (latents are 1/8)")
    p.add_argument("--batch", type=int, default=2, help="rows (2: one image with CFG)")
    p.add_argument("--layers", type=int, default=2, help="blocks actually built (the rest is scaled)")
    p.add_argument("--cache-dtypes", default="none,fp8")
    p.add_argument("--contexts", default="reuse,extrapolate")
    p.add_argument("--dense-peak-gib", type=float, default=None, help="print each total as a share of this peak")
    args = p.parse_args(argv)
    entry = model_configs()[args.preset]
    if entry["class"] != "SD3Transformer2DModel" or entry["config"].get("dual_attention_layers"):
        raise SystemExit(f"--preset: expected an SD3 preset with alike blocks, got {args.preset!r}")
    from diffusers import SD3Transformer2DModel

    depth = entry["config"]["num_layers"]
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**dict(entry["config"], num_layers=args.layers)).to(torch.bfloat16).eval()
    width, height = (int(x) // 8 for x in args.size.lower().split("x"))
    inputs = tiny_sd3_inputs(model, args.batch, height, width, text_tokens=entry.get("text_tokens", 333))
    inputs = {name: t.to(torch.bfloat16) for name, t in inputs.items()}
    for context in args.contexts.split(","):
        for name in args.cache_dtypes.split(","):
            cache_dtype = None if name == "none" else name
            config = catprune.CATConfig(keep_ratio=0.3, start_step=2, context=context, cache_dtype=cache_dtype)
            start = time.time()
            row = measure(model, inputs, config, depth, args.layers)
            share = f"  {100 * row['total_gib'] / args.dense_peak_gib:.1f}% of the peak" if args.dense_peak_gib else ""
            print(
                f"{args.preset} {args.size} B{args.batch} {context:11s} cache_dtype={name:5s} ({row['dtype']}): K/V "
                f"{row['kv_gib']:.4f} GiB + shared {row['shared_gib']:.4f} = {row['total_gib']:.4f} GiB{share} "
                f"({time.time() - start:.0f}s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
