#!/usr/bin/env python3
"""Train the embedded scenes model (rectified flow, SD3 conventions), save fp16 weights, measure quality.

Data is rendered on the fly on the training device from one seeded device generator: scenes are sampled, captioned
as token ids (``ScenesTokenizer.encode_scenes``) and rendered with tensor ops (glyphs from the shipped atlas), so
there is no dataset and no host round trip per step. The (object, cell) combinations of the 200 held-out captions,
the validation captions and the 8 quick-check captions never appear in training: a scene whose set of (object, cell)
pairs equals one of theirs is redrawn (any left after three redraws gets zero loss weight).

Training recipe (what is known to work for short runs):
- x_t = (1 - sigma) x_0 + sigma * noise; the transformer predicts the velocity noise - x_0 at timestep 1000 sigma.
- sigma: with probability 0.8 logit-normal(0, 1) (unshifted: ``--train-shift 1``; the scheduler's shift 3.0 is
  used at inference only), else uniform(0, 1). A first run trained with the shift 3.0 of SD3 learned the layout
  and colours but few glyph details (identity top-1 0.21); the unshifted density puts more training on the middle
  noise levels where the details form.
- caption dropout to the empty caption with probability 0.1 (classifier-free guidance).
- AdamW (betas 0.9/0.99, no weight decay), linear warm-up then cosine decay to 10% of the peak, gradient clipping
  at 1, bf16 autocast with fp32 master weights, two EMAs of the weights (0.998 and 0.9995); adaLN-Zero init.
- A divergence guard: an update whose gradient norm is non-finite or more than ``--spike-factor`` times its running
  mean (after the warm-up) is skipped (no optimizer or EMA step), and a streak of 50 skips ends training early with
  the weights and EMAs from before the streak. A run at peak LR 8e-4 without it diverged at step ~4400 of 4900.
- After training: the raw weights and both EMAs (each rounded through the fp16 files that ship) are compared on
  validation captions by identity top-1, then guidance scales are compared on the same captions; the best are kept.

With ``--steps`` unset the run sizes itself to ``--time-budget`` seconds (from the script's start) after timing
its first steps, and logs the step count; pass that count as ``--steps`` to repeat the run (same kind of GPU).

Example (the shipped run; see docs/scenes_model.md):
    python scripts/train_scenes.py --out $OUT --time-budget 465 --eval --eval-deadline 555

CPU smoke test (a tiny model, about a minute):
    python scripts/train_scenes.py --out /tmp/scenes_smoke --device cpu --tiny --steps 4 --batch-size 4 --eval \
        --eval-captions 4 --eval-steps 2
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shapes training script's shared pieces

from train_shapes import (  # noqa: E402  # shared with shapes
    START,
    flow_loss,
    init_for_training,
    log,
    log_progress,
    lr_at,
    start_run,
    with_weights,
)

import catprune  # noqa: E402
from catprune.evaluation.identity import (  # noqa: E402
    HELD_OUT_CAPTION_SEED,
    HELD_OUT_NUM_CAPTIONS,
    QUICK_CHECK_CAPTIONS,
    VALIDATION_CAPTION_SEED,
    check_identity,
)
from catprune.evaluation.metrics import psnr, ssim  # noqa: E402
from catprune.models.scenes.loading import (  # noqa: E402
    build_scenes_pipeline,
    default_config,
    load_scenes_pipeline,
    random_config,
    save_scenes_weights,
)
from catprune.models.scenes.world import (  # noqa: E402
    random_captions,
    render_scenes,
    sample_scenes,
    scenes_from_captions,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (weights, logs, results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=8e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=250, help="linear warm-up steps")
    p.add_argument("--steps", type=int, default=None, help="total steps (default: sized to --time-budget)")
    p.add_argument("--time-budget", type=float, default=400.0, help="seconds from start to end of training")
    p.add_argument("--probe-steps", type=int, default=30, help="steps timed to size the run when --steps is unset")
    p.add_argument("--ema", default="0.998,0.9995", help="EMA decays (comma-separated)")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--uniform-fraction", type=float, default=0.2, help="share of uniform sigma samples")
    p.add_argument(
        "--train-shift",
        type=float,
        default=1.0,
        help="shift applied to the logit-normal training sigmas (1: none; inference keeps the scheduler's 3.0)",
    )
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument(
        "--spike-factor",
        type=float,
        default=8.0,
        help="divergence guard: skip an update whose gradient norm is non-finite or above this many times the "
        "running mean norm (0 turns the guard off); 50 skips in a row end training with the weights kept",
    )
    p.add_argument(
        "--qk-norm",
        action="store_true",
        help="RMS-normalise queries and keys (SD3.5's qk_norm='rms_norm'): keeps long runs stable; changes the "
        "architecture, so the run writes its scenes_config.json next to the weights",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer for training (falls back to eager if compiling fails)",
    )
    p.add_argument("--tiny", action="store_true", help="a tiny model for a CPU smoke test")
    p.add_argument("--eval", action="store_true", help="choose weights/guidance and measure quality after training")
    p.add_argument("--eval-captions", type=int, default=HELD_OUT_NUM_CAPTIONS, help="held-out captions")
    p.add_argument("--val-captions", type=int, default=100, help="validation captions (weights and guidance)")
    p.add_argument("--eval-steps", type=int, default=28)
    p.add_argument("--eval-guidance", default="4,2,3,5.5,7", help="guidance scales; the first compares weights")
    p.add_argument("--eval-batch-size", type=int, default=200)
    p.add_argument("--eval-deadline", type=float, default=560.0, help="skip optional evaluations after this time")
    return p.parse_args(argv)


def make_batch(args, tokenizer, generator, excluded_keys):
    """One training batch on the generator's device: images x0 in [-1, 1], tokens, loss weights."""
    b = args.batch_size
    scenes = sample_scenes(b, generator)
    for _ in range(3):  # redraw held-out combinations without a host sync
        scenes = scenes.where(torch.isin(scenes.keys(), excluded_keys), sample_scenes(b, generator))
    weight = (~torch.isin(scenes.keys(), excluded_keys)).float()  # (B,)
    x0 = render_scenes(scenes) * 2 - 1  # (B, 3, 128, 128)
    drop = torch.rand(b, generator=generator, device=generator.device) < args.caption_dropout  # (B,)
    return x0, tokenizer.encode_scenes(scenes, drop=drop), weight


def generate(pipe, captions, steps: int, guidance: float, batch_size: int) -> torch.Tensor:
    """Images (B, 3, 128, 128) in [0, 1] on the pipeline's device; image j uses a generator seeded j."""
    device = pipe.device
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        generators = [torch.Generator(device).manual_seed(start + j) for j in range(len(chunk))]
        out.append(
            pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="pt")
            .images.float()
            .clamp(0, 1)
        )
    return torch.cat(out)


def evaluate(args, out: Path, pipes: dict, device, summary: dict) -> None:
    guidance = [float(g) for g in args.eval_guidance.split(",")]
    validation = random_captions(args.val_captions, seed=VALIDATION_CAPTION_SEED)
    held_out = random_captions(args.eval_captions, seed=HELD_OUT_CAPTION_SEED)
    bs = args.eval_batch_size
    results: dict = {"validation": [], "held_out": [], "quick_check": []}

    def save_results() -> None:
        with open(out / "results.json", "w") as f:
            json.dump({"summary": summary, **results}, f, indent=2)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return value, round(time.time() - t, 2)

    best = None
    for name, pipe in pipes.items():  # weights, at the first guidance scale
        images, seconds = timed(lambda p=pipe: generate(p, validation, args.eval_steps, guidance[0], bs))
        top1 = check_identity(images, validation).top1
        results["validation"].append({"weights": name, "guidance": guidance[0], "identity_top1": top1, "s": seconds})
        log(f"validation {name} g={guidance[0]}: identity top-1 {top1:.3f} ({seconds}s)")
        if best is None or top1 > best[0]:
            best = (top1, name, guidance[0])
    chosen = best[1]
    pipe = pipes[chosen]
    for g in guidance[1:]:  # guidance, with the chosen weights
        if time.time() - START > args.eval_deadline - 60:
            break
        images = generate(pipe, validation, args.eval_steps, g, bs)
        top1 = check_identity(images, validation).top1
        results["validation"].append({"weights": chosen, "guidance": g, "identity_top1": top1})
        log(f"validation {chosen} g={g}: identity top-1 {top1:.3f}")
        if top1 > best[0]:
            best = (top1, chosen, g)
    chosen_g = best[2]
    summary["chosen_weights"], summary["chosen_guidance"] = chosen, chosen_g
    log(f"chosen: {chosen} weights, guidance {chosen_g}")
    save_scenes_weights(pipe, out / "weights")
    save_results()

    # Held-out quality: dense 28 steps is the reference of every row.
    reference, seconds = timed(lambda: generate(pipe, held_out, args.eval_steps, chosen_g, bs))
    report = check_identity(reference, held_out)
    row = {"method": f"dense-{args.eval_steps}", "identity_top1": report.top1, "objects": len(report.objects)}
    row.update({"psnr": None, "ssim": None, "s": seconds})
    results["held_out"].append(row)
    log(f"HELD-OUT dense-{args.eval_steps} g={chosen_g}: identity top-1 {report.top1:.3f} ({seconds}s)")
    save_results()
    grid = [reference[:16].cpu()]

    def compare(method: str, images: torch.Tensor, seconds: float, extra: dict | None = None) -> None:
        top1 = check_identity(images, held_out).top1
        p = psnr(images.cpu(), reference.cpu())
        s = ssim(images.cpu(), reference.cpu())
        r = {
            "method": method,
            "identity_top1": top1,
            "psnr": float(p[torch.isfinite(p)].mean()) if torch.isfinite(p).any() else None,
        }
        r.update({"ssim": float(s.mean()), "s": seconds, **(extra or {})})
        results["held_out"].append(r)
        log(f"HELD-OUT {method}: identity {top1:.3f} PSNR {r['psnr']} SSIM {r['ssim']:.4f} ({seconds}s)")
        save_results()

    for keep in (0.3, 0.5):
        if time.time() - START > args.eval_deadline:
            break
        config = catprune.CATConfig(keep_ratio=keep)
        catprune.apply(pipe, config)
        try:
            images, seconds = timed(lambda: generate(pipe, held_out, args.eval_steps, chosen_g, bs))
            extra = {"config": {"keep_ratio": keep, "start_step": config.start_step}}
            try:
                extra["stats"] = str(catprune.stats(pipe))[-400:]
            except Exception as err:  # stats are informative only
                extra["stats"] = f"unavailable: {err!r}"
        finally:
            catprune.remove(pipe)
        compare(f"CAT keep {keep} start {config.start_step}", images, seconds, extra)
        if keep == 0.3:
            grid.append(images[:16].cpu())
    for steps in (8, 12, 15, 20):
        if time.time() - START > args.eval_deadline:
            break
        images, seconds = timed(lambda s=steps: generate(pipe, held_out, s, chosen_g, bs))
        compare(f"dense-{steps}", images, seconds)
    # Settings for the CPU test: the quick-check captions at few steps.
    for steps in (4, 6, 8, 28):
        if time.time() - START > args.eval_deadline + 15:
            break
        images = generate(pipe, list(QUICK_CHECK_CAPTIONS), steps, chosen_g, bs)
        r = check_identity(images, list(QUICK_CHECK_CAPTIONS))
        results["quick_check"].append({"steps": steps, "guidance": chosen_g, "identity_top1": r.top1})
        log(f"quick-check steps={steps}: identity top-1 {r.top1:.3f} ({[o.found for o in r.objects]})")
    save_results()
    try:
        from PIL import Image

        rows = torch.cat(grid)  # (R*16, 3, 128, 128): dense rows then CAT rows
        n = rows.shape[0] // 8
        sheet = rows[: n * 8].view(n, 8, 3, 128, 128).permute(0, 3, 1, 4, 2).reshape(n * 128, 8 * 128, 3)
        Image.fromarray((sheet * 255).round().byte().numpy()).save(out / "samples.png")
    except Exception as err:  # the picture is optional
        log(f"samples.png not written: {err!r}")


def main(argv=None) -> None:
    args = parse_args(argv)
    out, device, card = start_run(args)

    config = (
        random_config(num_layers=2, attention_head_dim=16, num_attention_heads=2) if args.tiny else default_config()
    )
    if args.qk_norm:
        config["transformer"]["qk_norm"] = "rms_norm"
    pipe = build_scenes_pipeline(config)
    init_for_training(pipe.transformer)
    transformer, text_encoder, tokenizer = pipe.transformer.to(device), pipe.text_encoder.to(device), pipe.tokenizer
    transformer.train()
    text_encoder.train()
    params = [p for m in (transformer, text_encoder) for p in m.parameters()]
    n_params = {m: sum(p.numel() for p in getattr(pipe, m).parameters()) for m in ("transformer", "text_encoder")}
    log(f"parameters: {n_params}")
    decays = [float(d) for d in args.ema.split(",")]
    emas = [[p.detach().clone().float() for p in params] for _ in decays]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0, fused=device.type == "cuda")
    shift = args.train_shift
    generator = torch.Generator(device=device).manual_seed(args.seed)
    excluded = (
        random_captions(HELD_OUT_NUM_CAPTIONS, seed=HELD_OUT_CAPTION_SEED)
        + random_captions(args.val_captions, seed=VALIDATION_CAPTION_SEED)
        + list(QUICK_CHECK_CAPTIONS)
    )
    excluded_keys = scenes_from_captions(excluded).keys().to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    train_transformer = torch.compile(transformer) if args.compile else transformer
    total = args.steps if args.steps is not None else 10**9
    log_rows, running, running_n = [], 0.0, 0
    probe_start = None
    step = 0
    skipped, skip_streak, norm_mean = 0, 0, 0.0
    train_start = time.time()
    while step < total:
        if args.steps is None and step == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            probe_start = time.time()
        if args.steps is None and step == 5 + args.probe_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - probe_start) / args.probe_steps
            remaining = args.time_budget - (time.time() - START)
            total = step + max(0, int(remaining / per_step))
            log(f"{per_step * 1000:.1f} ms/step -> total steps {total} (reproduce with --steps {total})")
            if device.type == "cuda":
                log(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, args)
        x0, tokens, weight = make_batch(args, tokenizer, generator, excluded_keys)
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = flow_loss(train_transformer, text_encoder, x0, tokens, weight, generator, shift, args, autocast)
            loss.backward()
        except Exception as err:  # a compiler failure must not cost the run: train eagerly instead
            if train_transformer is transformer or step > 0:
                raise
            log(f"torch.compile failed ({err!r:.300}); training eagerly")
            train_transformer = transformer
            optimizer.zero_grad(set_to_none=True)
            loss = flow_loss(transformer, text_encoder, x0, tokens, weight, generator, shift, args, autocast)
            loss.backward()
        if step == 0:
            log(f"first step done at {time.time() - START:.1f}s (compile included)")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if args.spike_factor > 0:
            norm = float(grad_norm)  # one host sync per step: small next to a ~90 ms step
            if not math.isfinite(norm) or (step > args.warmup and norm > args.spike_factor * norm_mean):
                skipped += 1
                skip_streak += 1
                log(f"step {step}: gradient norm {norm:.3g} (running mean {norm_mean:.3g}): update skipped")
                if skip_streak >= 50:
                    log(f"{skip_streak} updates skipped in a row: training ends at step {step} with the weights kept")
                    break
                step += 1
                continue
            skip_streak = 0
            norm_mean = norm if norm_mean == 0.0 else 0.98 * norm_mean + 0.02 * norm  # from the first kept update
        optimizer.step()
        current = [p.detach().float() for p in params]
        for ema, d in zip(emas, decays, strict=True):
            torch._foreach_lerp_(ema, current, 1 - min(d, (1 + step) / (10 + step)))
        running += loss.detach()
        running_n += 1
        step += 1
        if step % args.log_every == 0 or step == total:
            mean = float(running) / max(1, running_n)
            log_progress(out, log_rows, step, mean, grad_norm, lr_at(step - 1, total, args), args, train_start)
            running, running_n = 0.0, 0
        if args.steps is None and time.time() - START > args.time_budget + 20:
            log(f"time budget exceeded: stopping at step {step} of {total}")
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.time() - train_start
    log(f"trained {step} steps in {train_seconds:.1f}s")

    # Candidate pipelines on the device in fp32, each rounded through the fp16 files that would ship.
    transformer.eval()
    text_encoder.eval()
    candidates = {}
    for d, ema in zip(decays, emas, strict=True):
        candidates[f"ema{d}"] = with_weights(pipe, ema)
    candidates["raw"] = pipe
    pipes = {}
    for name, candidate in candidates.items():
        with tempfile.TemporaryDirectory() as tmp:
            save_scenes_weights(candidate.to("cpu"), tmp)
            pipes[name] = load_scenes_pipeline(tmp, device=device)
            pipes[name].set_progress_bar_config(disable=True)
    del candidates
    first = next(iter(pipes))
    save_scenes_weights(pipes[first], out / "weights")  # replaced by the validation winner below
    summary = {
        "card": card,
        "torch": torch.__version__,
        "steps": step,
        "batch_size": args.batch_size,
        "train_seconds": round(train_seconds, 1),
        "final_loss": log_rows[-1]["loss"] if log_rows else None,
        "skipped_updates": skipped,
        "parameters": n_params,
        "args": vars(args),
        "chosen_weights": first,
    }
    with open(out / "results.json", "w") as f:
        json.dump({"summary": summary}, f, indent=2)
    log(f"saved weights to {out / 'weights'}")
    if args.eval:
        evaluate(args, out, pipes, device, summary)
    summary["total_seconds"] = round(time.time() - START, 1)
    with open(out / "results.json") as f:
        results = json.load(f)
    results["summary"] = summary
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    if not (args.tiny or args.qk_norm):  # the packaged scenes_config.json describes the shipped architecture
        (out / "weights" / "scenes_config.json").unlink(missing_ok=True)
    for path in (out / "weights").iterdir():  # flat: the device returns files at most two folders deep
        shutil.move(str(path), out / path.name)
    (out / "weights").rmdir()
    log(f"done: {json.dumps(summary)}")
    rows = results.get("held_out", [])
    print("\nmethod                      identity  PSNR(dB)  SSIM    seconds")
    for r in rows:
        psnr_text = f"{r['psnr']:.2f}" if r.get("psnr") is not None else "ref"
        ssim_text = f"{r['ssim']:.4f}" if r.get("ssim") is not None else "ref"
        print(f"{r['method']:<28}{r['identity_top1']:.3f}     {psnr_text:<9} {ssim_text:<7} {r.get('s')}")


if __name__ == "__main__":
    main()
