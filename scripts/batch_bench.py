#!/usr/bin/env python3
"""Throughput of ``catprune generate --prompts`` on one device: dense vs CAT, images/s.

Two cases, each run dense then with CAT Pruning through the batch runner (the same code as the command line, files
written, sidecars and manifest included):

- ``shapes``: ``--shapes-prompts`` (default 1,000) captions of the embedded model at its 128 px;
- ``random:<--sd3-preset>``: ``--sd3-prompts`` (default 50) prompts through the stock diffusers SD3 pipeline with
  random full-size SD3-medium weights at ``--sd3-size`` (default 1024 px). No download: prompts become random
  embeddings seeded from their text (``catprune generate --model random:sd3-medium`` does the same).

For each run it prints images, images/s end to end (model build, warm-up and file writes included) and in steady
state (pipeline calls after the first batch, from the sidecars' ``batch_seconds``), MACs saved, and the CAT/dense
ratio of the steady images/s.

Examples:
    python scripts/batch_bench.py                                  # the one-GPU measurement (CUDA, bf16)
    python scripts/batch_bench.py --json batch_bench.json --out /tmp/batch_bench
    python scripts/batch_bench.py --only sd3                       # one case (each fits in a few minutes on a GPU)
    python scripts/batch_bench.py --device cpu --dtype float32 --shapes-prompts 2 --shapes-size 32 \\
        --sd3-preset sd3-tiny --sd3-prompts 2 --sd3-size 64 --steps 3 --start-step 2   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from catprune.batch import BatchOptions, run_batch  # noqa: E402
from catprune.models.shapes.world import random_captions  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cuda', 'cpu'")
    p.add_argument("--dtype", default=None, help="model dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--steps", type=int, default=28, help="denoising steps of every image")
    p.add_argument("--keep-ratio", type=float, default=0.3)
    p.add_argument("--start-step", type=int, default=8)
    p.add_argument("--shapes-prompts", type=int, default=1000)
    p.add_argument("--shapes-size", type=int, default=None, help="shapes image side (default: the model's 128)")
    p.add_argument("--shapes-batch-size", type=int, default=16)
    p.add_argument("--sd3-preset", default="sd3-medium", help="bench preset with random weights (sd3-tiny on CPU)")
    p.add_argument("--sd3-prompts", type=int, default=50)
    p.add_argument("--sd3-size", type=int, default=1024)
    p.add_argument("--sd3-batch-size", type=int, default=1)
    p.add_argument(
        "--backend",
        default=None,
        help="CATConfig.backend of the CAT runs (default cudagraph on CUDA, eager on the CPU); dense runs are the "
        "stock pipeline",
    )
    p.add_argument("--only", choices=("shapes", "sd3"), default=None, help="run one of the two cases")
    p.add_argument("--out", default=None, help="output root (default: a temporary directory, removed at the end)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def steady_rate(out: Path) -> float:
    """Images per second of the pipeline calls but the first (which pays lazy initialisation), from the sidecars."""
    calls: dict[int, tuple[float, int]] = {}  # batch index -> (seconds of its pipeline call, images)
    for path in out.glob("*.json"):
        if path.name in ("run.json", "manifest.json"):
            continue
        side = json.loads(path.read_text())
        seconds, count = calls.get(side["batch_index"], (side["batch_seconds"], 0))
        calls[side["batch_index"]] = (seconds, count + 1)
    ordered = [calls[i] for i in sorted(calls)]
    if len(ordered) > 1:
        ordered = ordered[1:]  # the first call is the warm-up
    seconds = sum(s for s, _ in ordered)
    return sum(n for _, n in ordered) / seconds if seconds else 0.0


def write_json(path: str, device: str, results: list[dict]) -> None:
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.startswith("cuda") else device}
    Path(path).write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    backend = args.backend or ("cudagraph" if device.startswith("cuda") else "eager")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="catprune-batch-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    cases = [
        ("shapes", "shapes", random_captions(args.shapes_prompts, seed=0), args.shapes_size, args.shapes_batch_size),
        (
            f"random:{args.sd3_preset}",
            f"random:{args.sd3_preset}",
            [f"a photograph of scene number {i}, highly detailed" for i in range(args.sd3_prompts)],
            args.sd3_size,
            args.sd3_batch_size,
        ),
    ]
    if args.only is not None:
        cases = cases[:1] if args.only == "shapes" else cases[1:]
    results = []
    print(
        f"device {device}, dtype {dtype}, {args.steps} steps, CAT keep {args.keep_ratio} from step {args.start_step}, "
        f"CAT backend {backend} (dense: the stock pipeline)"
    )
    for name, model, prompts, size, batch_size in cases:
        slug = name.replace(":", "-")
        prompt_file = root / f"{slug}.txt"
        prompt_file.write_text("\n".join(prompts) + "\n")
        rates = {}
        for mode in ("dense", "cat"):
            out = root / f"{slug}-{mode}"
            options = BatchOptions(
                prompts=str(prompt_file),
                out=str(out),
                model=model,
                steps=args.steps,
                keep_ratio=args.keep_ratio,
                start_step=args.start_step,
                height=size,
                width=size,
                batch_size=batch_size,
                dense=mode == "dense",
                backend=None if mode == "dense" else backend,
                device=device,
                dtype=dtype,
                overwrite=True,
                manifest_every=max(len(prompts), 1),
            )
            summary = run_batch(options)
            rates[mode] = steady_rate(out)
            row = {
                "case": name,
                "mode": mode,
                "images": summary.done,
                "batch_size": batch_size,
                "size": size,
                "images_per_s": summary.images_per_s,
                "steady_images_per_s": rates[mode],
                "macs_saved": summary.macs_saved,
                "wall_s": summary.wall_s,
                "backend": "stock" if mode == "dense" else backend,
            }
            results.append(row)
            if args.json:  # after every run: a run cut short keeps what it measured
                write_json(args.json, device, results)
            print(
                f"{name:>20} {mode:>5}: {summary.done} images, {summary.images_per_s:.3f} img/s end to end, "
                f"{rates[mode]:.3f} img/s steady, MACs saved {100 * summary.macs_saved:.1f}%",
                flush=True,
            )
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if rates["dense"] > 0:
            print(f"{name:>20} CAT/dense steady img/s: {rates['cat'] / rates['dense']:.2f}x")
    if not args.out:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
