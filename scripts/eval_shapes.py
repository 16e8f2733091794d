#!/usr/bin/env python3
"""Quality bar of the embedded shapes model: dense generation, 28 steps, 200 held-out seeded captions.

Prints colour_at_cell and shape rates (fractions of all objects). Image j uses a generator seeded j on the
pipeline's device, so the numbers do not depend on the batch size (they do depend, slightly, on the device).

Examples:
    python scripts/eval_shapes.py --device cuda                 # the shipped weights
    python scripts/eval_shapes.py --path runs/shapes --device cuda --guidance 3
    python scripts/eval_shapes.py --num-captions 16 --steps 10  # a quick CPU look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from catprune.evaluation.adherence import (  # noqa: E402
    HELD_OUT_CAPTION_SEED,
    HELD_OUT_NUM_CAPTIONS,
    measure_shapes_quality,
)
from catprune.evaluation.machine import environment  # noqa: E402
from catprune.models.shapes import load_shapes_pipeline  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", default=None, help="a saved pipeline or weights folder (default: the shipped weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=None, help="default: the pipeline's default guidance scale")
    p.add_argument("--num-captions", type=int, default=HELD_OUT_NUM_CAPTIONS)
    p.add_argument("--caption-seed", type=int, default=HELD_OUT_CAPTION_SEED)
    p.add_argument("--seed", type=int, default=0, help="image j uses generator seed (seed + j)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args(argv)

    if args.device.startswith("cuda"):  # plain fp32, as on a CPU
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    pipe = load_shapes_pipeline(args.path, device=args.device)
    start = time.time()
    result = measure_shapes_quality(
        pipe,
        num_captions=args.num_captions,
        caption_seed=args.caption_seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        show_progress=False,
    )
    summary = {**result.summary(), "device": str(pipe.device), "seconds": round(time.time() - start, 1)}
    if args.device.startswith("cuda"):
        summary["card"] = environment(args.device)["gpu"]
    print(
        f"colour_at_cell={result.colour_at_cell:.3f} shape={result.shape:.3f} "
        f"({result.num_objects} objects, {result.num_captions} captions, {args.steps} steps, "
        f"guidance {result.guidance_scale}, {summary['seconds']}s on {summary['device']})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
