#!/usr/bin/env python3
"""Where CAT Pruning's error comes from, per pruned step of a generation (public API only).

For every pruned step this compares the pruned transformer call with a dense call of an untouched copy of the
transformer on the same input:

- (a) ``sel``: relative L2 error of the SELECTED tokens' outputs (they are computed, so all of it is the cost of
  attending to stale / forecast keys and values of the others);
- (b) ``unsel``: relative L2 error of the unselected tokens' reused outputs (staleness of the output cache);
- (c) ``drift``: relative L2 error and PSNR (peak = the dense latent's range) of the step's input latent against
  the dense run's latent at the same step (the trajectory drift that (a) and (b) accumulate into).

``--oracle`` also runs the bound where every pruned step's selected tokens get their exact dense outputs (fresh
context) and the other tokens keep their last outputs: the best any context forecast could do at that selection
(the selection itself is scored on the runtime's own outputs). Reached through `catprune.observe` (the selected
tokens of each step), a forward hook on the transformer, and the adapters' public ``patchify`` / ``unpatchify``.

Example:
    python scripts/decompose_error.py --num-prompts 8 --contexts reuse,extrapolate --oracle
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import catprune  # noqa: E402
from catprune import CATConfig  # noqa: E402
from catprune.adapters.common import patchify, unpatchify  # noqa: E402
from catprune.algorithm import token_mask  # noqa: E402


def rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return (err.pow(2).sum() / ref.pow(2).sum().clamp_min(1e-20)).sqrt().item()


class Tracer:
    """Forward hook + step observer: records each call's input latent and, at pruned steps, the error split."""

    def __init__(self, pipe, dense_model=None, oracle: bool = False):
        self.pipe, self.dense_model, self.oracle = pipe, dense_model, oracle
        self.inputs: list[torch.Tensor] = []
        self.rows: list[dict] = []
        self.record = None
        self.cache = None  # (B, M, P) the oracle's output cache

    def observe(self, record) -> None:
        self.record = record

    def hook(self, module, args, kwargs, output):
        x = kwargs["hidden_states"]  # (B, C, H, W), CFG rows duplicated
        self.inputs.append(x[: x.shape[0] // 2].detach().clone())
        record, self.record = self.record, None
        if record is None or record.kind == "dense":
            return None
        p = module.config.patch_size
        grid, channels = (x.shape[-2] // p, x.shape[-1] // p), module.out_channels
        out = patchify(output[0], grid, p)  # (B, M, P)
        if record.kind in ("capture", "refresh"):
            self.cache = out.clone()
            return None
        with torch.no_grad():
            dense = patchify(self.dense_model(**dict(kwargs, return_dict=False))[0], grid, p)  # (B, M, P)
        mask = token_mask(record.selected, out.shape[1])  # (B, M)
        err = out - dense  # (B, M, P)
        self.rows.append(dict(step=record.step, sel=rel(err[mask], dense[mask]), unsel=rel(err[~mask], dense[~mask])))
        if not self.oracle:
            return None
        self.cache[mask] = dense[mask]  # selected tokens exact, the others keep their last (oracle) outputs
        return (unpatchify(self.cache, grid, p, channels),)


def run(pipe, prompts, steps, config=None, dense_model=None, oracle=False, seeds=None):
    """(images, per-step input latents, per-pruned-step error rows). Image i uses a generator on the pipeline's
    device seeded ``seeds[i]`` (default ``1000 + i``)."""
    tracer = Tracer(pipe, dense_model, oracle)
    if config is not None:
        catprune.apply(pipe, config)
    handle = pipe.transformer.register_forward_hook(tracer.hook, with_kwargs=True)
    observer = catprune.observe(pipe, tracer.observe) if config is not None else None
    seeds = seeds if seeds is not None else [1000 + i for i in range(len(prompts))]
    generators = [torch.Generator(pipe.device).manual_seed(s) for s in seeds]
    try:
        images = pipe(list(prompts), num_inference_steps=steps, generator=generators, output_type="pt").images
    finally:
        handle.remove()
        if observer is not None:
            observer.remove()
        if config is not None:
            catprune.remove(pipe)
    return images.float(), tracer.inputs, tracer.rows


def image_psnr(a, b) -> float:
    return (10 * torch.log10(1 / ((a - b) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12))).mean().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes", choices=("shapes", "scenes"))
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--keep-ratio", type=float, default=0.3)
    p.add_argument("--start-step", type=int, default=8)
    p.add_argument("--contexts", default="reuse,extrapolate")
    p.add_argument("--forecast-max-ratio", type=float, default=1.0, help="the cap docs/quality_per_cost.md used")
    p.add_argument("--oracle", action="store_true", help="also run the exact-selected-tokens bound (reuse context)")
    args = p.parse_args(argv)
    world = importlib.import_module(f"catprune.models.{args.model}.world")
    prompts = world.random_captions(args.num_prompts, seed=20_000)
    pipe = catprune.load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    dense_model = copy.deepcopy(pipe.transformer)
    reference, dense_inputs, _ = run(pipe, prompts, args.steps)
    runs = [(c, False) for c in args.contexts.split(",")] + ([("reuse", True)] if args.oracle else [])
    for context, oracle in runs:
        config = CATConfig(
            keep_ratio=args.keep_ratio,
            start_step=args.start_step,
            context=context,
            forecast_max_ratio=args.forecast_max_ratio,
        )
        images, inputs, rows = run(pipe, prompts, args.steps, config, dense_model, oracle)
        name = "oracle" if oracle else context
        print(f"\n{name}: keep {args.keep_ratio}, start {args.start_step}: image PSNR to dense "
              f"{image_psnr(images, reference):.2f} dB")  # fmt: skip
        print(f"{'step':>4s} {'(a) sel':>8s} {'(b) unsel':>9s} {'(c) drift':>9s} {'drift dB':>8s}")
        for row in rows:
            i = row["step"]
            x, d = inputs[i], dense_inputs[i]
            drift_db = 20 * torch.log10((d.max() - d.min()) / ((x - d) ** 2).mean().sqrt().clamp_min(1e-12)).item()
            print(f"{i:4d} {row['sel']:8.4f} {row['unsel']:9.4f} {rel(x - d, d):9.4f} {drift_db:8.2f}")
        mean_a, mean_b = (sum(r[key] for r in rows) / len(rows) for key in ("sel", "unsel"))
        print(f"mean over pruned steps: (a) {mean_a:.4f}  (b) {mean_b:.4f}")


if __name__ == "__main__":
    main()
