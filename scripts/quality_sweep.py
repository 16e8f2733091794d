#!/usr/bin/env python3
"""Quality per cost: PSNR / SSIM to the dense reference images and the model's adherence score against the MACs
ratio, the wall-clock and the planner's predicted cost, for fewer dense steps, CAT Pruning variants (context reuse /
extrapolate, keep ratios, start steps, schedules, refreshes, fewer steps), the planner's picks and the oracle bound
of the error decomposition. Public API only.

Prompts: the model's held-out captions (``random_captions(n, seed=CAPTION_SEED)``, default the model's held-out
seed: 20000 for shapes, 30000 for scenes); image i uses a generator on the device seeded ``SEED + i`` (``--seed``,
default 1000). PSNR is per image (images in [0, 1]) against the dense reference image of the same prompt and seed,
averaged over the finite values; SSIM likewise; adherence is the model's scorer (scenes: identity top-1; shapes:
colour at cell and shape). The MACs ratio is catprune's analytic count of the run over the reference run's. Seconds:
the pipeline calls of all prompts, CUDA synchronised, after an untimed warm-up. Predicted cost: the time ratio
``catprune.planner.estimate`` gives with the measured MACs (what ``catprune.plan`` would use for the row).

Rows: ``--only`` names of the 8-prompt tables of docs/quality_per_cost.md, or ``--rows`` specs / presets
(``scripts/sweep_rows.py``; ``--rows pareto`` is the quality-per-cost grid).

Examples:
    python scripts/quality_sweep.py --num-prompts 8                              # CPU, shapes, every legacy row
    python scripts/quality_sweep.py --model scenes --only dense-15,cat-x-0.3      # a few rows
    python scripts/quality_sweep.py --model scenes,shapes --rows pareto --device cuda --num-prompts 200 \\
        --batch-size 200 --seed 0 --tf32 --json sweep.json --plot sweep.png    # the GPU grid (docs/quality_per_cost.md)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plot_sweep import mark_pareto, plot  # noqa: E402
from sweep_rows import Row, legacy_rows, parse_rows  # noqa: E402

import catprune  # noqa: E402
from catprune import CATConfig  # noqa: E402
from catprune.evaluation import environment, psnr, registry, ssim  # noqa: E402
from catprune.evaluation.metrics import finite_mean  # noqa: E402

STEPS = 28
FORMAT = "catprune quality sweep 2"


class Sweep:
    """One model's pipeline, prompts and dense reference; generates and scores rows."""

    def __init__(self, model: str, args):
        self.model, self.args, self.device = model, args, args.device
        entry = registry.resolve(model)
        self.caption_seed = args.caption_seed if args.caption_seed is not None else entry.held_out_seed
        self.prompts = entry.prompts(args.num_prompts, self.caption_seed)
        self.scorer = entry.adherence
        self.pipe = catprune.load_pipeline(model, device=args.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.batch = args.batch_size or len(self.prompts)
        self.reference = self.ref_macs = self.ref_seconds = None

    def seeds(self) -> list[int]:
        return [self.args.seed + i for i in range(len(self.prompts))]

    def _chunks(self):
        for start in range(0, len(self.prompts), self.batch):
            yield self.prompts[start : start + self.batch], self.seeds()[start : start + self.batch]

    def generate(self, steps: int, config: CATConfig | None, count: int | None = None):
        """(images (N, 3, H, W) in [0, 1] on the device, analytic MACs, seconds) of all prompts (or the first
        ``count`` of one batch: the warm-up)."""
        catprune.apply(self.pipe, config if config is not None else CATConfig(keep_ratio=1.0))  # 1.0: dense, counted
        images, macs, seconds = [], 0, 0.0
        try:
            for prompts, seeds in self._chunks():
                prompts, seeds = (prompts[:count], seeds[:count]) if count else (prompts, seeds)
                generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
                sync(self.device)
                start = time.perf_counter()
                out = self.pipe(list(prompts), num_inference_steps=steps, generator=generators, output_type="pt")
                sync(self.device)
                seconds += time.perf_counter() - start
                images.append(out.images.float())
                macs += catprune.stats(self.pipe).macs
                if count:
                    break
        finally:
            catprune.remove(self.pipe)
        return torch.cat(images), macs, seconds

    def warm_up(self) -> None:
        """Untimed: one dense and one pruned call on a full batch (kernels, allocator, cuBLAS heuristics)."""
        self.generate(2, None, count=self.batch)
        self.generate(3, CATConfig(keep_ratio=0.3, start_step=2), count=self.batch)

    def run_reference(self) -> dict:
        a = self.args
        name = f"{self.model}-{a.device}-p{len(self.prompts)}-c{self.caption_seed}-seed{a.seed}-s{a.steps}.pt"
        cache = Path(a.cache) / name if a.cache else None
        if cache is not None and cache.exists():  # the dense reference of an earlier run with the same settings
            saved = torch.load(cache)
            self.reference, self.ref_macs, self.ref_seconds = saved["images"].to(a.device), saved["macs"], saved["s"]
        else:
            self.reference, self.ref_macs, self.ref_seconds = self.generate(a.steps, None)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"images": self.reference.cpu(), "macs": self.ref_macs, "s": self.ref_seconds}, cache)
        row = {"row": f"dense-{self.args.steps}", "method": "reference", "steps": self.args.steps, "config": None}
        return {**row, "macs_ratio": 1.0, "seconds": self.ref_seconds, **self.adherence(self.reference)}

    def adherence(self, images) -> dict:
        if self.scorer is None:
            return {}
        return {k: v for k, v in self.scorer(images, self.prompts)["summary"].items() if isinstance(v, (int, float))}

    def score(self, row: Row, images, macs: int, seconds: float, config: CATConfig | None) -> dict:
        p = psnr(images, self.reference)
        out = {"row": row.name, "method": row.method, "steps": row.steps}
        out["context"] = config.context.value if config is not None else None
        out["config"] = config.to_dict() if config is not None else None
        out.update(macs_ratio=macs / self.ref_macs, psnr=finite_mean(p.tolist()), psnr_identical=int(p.isinf().sum()))
        out.update(ssim=float(ssim(images, self.reference).mean()), **self.adherence(images))
        out.update(seconds=seconds, seconds_ratio=seconds / self.ref_seconds)
        if row.kind != "oracle":  # the oracle is a bound, not a way to run: the planner has no cost for it
            try:
                e = catprune.planner.estimate(
                    self.pipe, config, row.steps, self.args.steps, macs_ratio=out["macs_ratio"]
                )
                out.update(predicted_time_ratio=e.time_ratio, time_source=e.time_source)
            except ValueError as exc:  # e.g. a step count the planner does not take
                out.update(predicted_time_ratio=None, time_source=str(exc))
        return out

    def run_row(self, row: Row) -> dict:
        if row.kind == "oracle":
            return self.run_oracle(row)
        steps, config, extra = row.steps, row.config, {}
        if row.kind == "plan":
            plan = catprune.plan(self.pipe, row.speedup, num_inference_steps=self.args.steps)
            steps, config = plan.num_inference_steps, plan.config
            if config is not None:  # quality does not depend on the backend: run it eagerly like every row
                config = dataclasses.replace(config, backend="eager")
            extra = {"plan": {"summary": plan.summary(), "predicted_speedup": plan.predicted_speedup}}
            row = dataclasses.replace(row, steps=steps)
        images, macs, seconds = self.generate(steps, config)
        return {**self.score(row, images, macs, seconds, config), **extra}

    def run_oracle(self, row: Row) -> dict:
        """The decomposition's oracle (scripts/decompose_error.py): every pruned step's selected tokens get their
        exact dense outputs, the others keep their last ones. Seconds include the extra dense calls."""
        from decompose_error import run

        dense_model = copy.deepcopy(self.pipe.transformer)
        images, start = [], time.perf_counter()
        for prompts, seeds in self._chunks():
            out, _, _ = run(self.pipe, prompts, row.steps, row.config, dense_model, oracle=True, seeds=seeds)
            images.append(out)
        sync(self.device)
        seconds = time.perf_counter() - start
        del dense_model
        _, macs, _ = self.generate(row.steps, row.config, count=1)  # the pruned run it bounds (MACs per image)
        return self.score(row, torch.cat(images), macs * len(self.prompts), seconds, row.config)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def print_row(r: dict) -> None:
    psnr_text = "ref" if r.get("psnr") is None and r["method"] == "reference" else f"{r.get('psnr') or 0:.2f}"
    extra = " ".join(f"{k} {r[k]:.3f}" for k in ("identity_top1", "colour_at_cell", "shape") if k in r)
    pred = r.get("predicted_time_ratio")
    print(
        f"  {r['row']:22s} MACs {r['macs_ratio']:.3f} PSNR {psnr_text:>6s} SSIM {r.get('ssim', 1.0):.4f} {extra} "
        f"{r['seconds']:.2f}s" + (f" (predicted time {pred:.3f})" if pred is not None else ""),
        flush=True,
    )


def run_model(model: str, rows: list[Row], args, started: float) -> dict:
    """One model's section of the output: the reference, every row run within the time budget, the rows skipped."""
    out = {"rows": [], "skipped": []}
    if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
        out["skipped"] = [{"row": r.name, "reason": "time budget"} for r in rows]
        return out
    t0 = time.perf_counter()
    sweep = Sweep(model, args)
    if args.warmup:
        sweep.warm_up()
    out.update(prompts=len(sweep.prompts), caption_seed=sweep.caption_seed, batch_size=sweep.batch)
    out["reference"] = sweep.run_reference()
    print(f"{model}: {len(sweep.prompts)} prompts, reference dense-{args.steps}", flush=True)
    print_row(out["reference"])
    for row in rows:
        if row.kind == "dense" and row.steps == args.steps:
            continue  # the reference itself
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            out["skipped"].append({"row": row.name, "reason": "time budget"})
            continue
        result = sweep.run_row(row)
        out["rows"].append(result)
        print_row(result)
    out["seconds"] = time.perf_counter() - t0
    del sweep
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    return out


def select_rows(args) -> list[Row]:
    if args.rows:
        return parse_rows(args.rows, args.steps)
    table = legacy_rows(args.steps)
    names = args.only.split(",") if args.only else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"--only: unknown rows {unknown}; expected some of {list(table)} (or use --rows)")
    return [table[n] for n in names]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes", help="shapes, scenes, or both comma-separated (in that order)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=None, help="prompts per pipeline call (default: all)")
    p.add_argument("--steps", type=int, default=STEPS, help="steps of the dense reference (default 28)")
    p.add_argument("--seed", type=int, default=1000, help="image i uses seed SEED + i (default 1000)")
    p.add_argument("--caption-seed", type=int, default=None, help="default: the model's held-out caption seed")
    p.add_argument("--only", default=None, help="comma-separated legacy row names (see sweep_rows.legacy_rows)")
    p.add_argument("--rows", default=None, help="row specs or presets, e.g. pareto (see scripts/sweep_rows.py)")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls on CUDA (as scripts/train_scenes.py's eval)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds: rows not started by then are skipped")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up calls")
    p.add_argument("--cache", default=None, help="a folder to keep the dense references in between runs")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--plot", default=None, help="write the Pareto plot (PNG) to this file (needs matplotlib)")
    return p


def main(argv=None) -> dict:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows = select_rows(args)
    unknown = [m for m in args.model.split(",") if m not in ("shapes", "scenes")]
    if unknown:
        raise SystemExit(f"--model: expected shapes and/or scenes (comma-separated), got {unknown}")
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "plot", "cache")}
    result = {"format": FORMAT, "settings": settings, "environment": environment(args.device), "models": {}}
    for model in args.model.split(","):
        result["models"][model] = run_model(model, rows, args, started)
        mark_pareto(result["models"][model])
        if args.json:  # after every model: a later failure or timeout keeps what was measured
            Path(args.json).write_text(json.dumps(result, indent=1))
    result["seconds"] = time.perf_counter() - started
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        print(plot(result, args.plot))
    print(f"done in {result['seconds']:.1f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
