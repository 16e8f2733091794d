#!/usr/bin/env python3
"""Train the embedded shapes model (rectified flow, SD3 conventions), save fp16 weights, measure quality.

Data is rendered on the fly on the training device: scenes are sampled, captioned (as token ids) and rendered with
tensor ops from one seeded device generator, so there is no dataset and no host round trip per step. The 200
held-out evaluation captions and the 16 quick-check captions never appear verbatim in training (scenes with those
captions are redrawn; any left after three redraws get zero loss weight).

Training (SD3 conventions):
- x_t = (1 - sigma) x_0 + sigma * noise, the transformer predicts the velocity noise - x_0 from timestep 1000 * sigma.
- sigma: with probability 0.8 logit-normal(0, 1) pushed through the scheduler's shift (3.0), else uniform(0, 1). The
  uniform part is a deliberate departure from SD3: shifted logit-normal almost never samples sigma < 0.1, where
  the last Euler steps of inference act.
- caption dropout to the empty caption with probability 0.1, for classifier-free guidance.
- AdamW, linear warm-up then cosine decay to 10% of the peak, gradient clipping at 1, bf16 autocast, an EMA of the
  weights; adaLN-Zero initialisation (the modulation and output layers start at zero, as in DiT).

With ``--steps`` unset, the run sizes itself to ``--time-budget`` seconds after timing its first steps, and logs
the step count; pass that count as ``--steps`` to repeat the run exactly (on the same kind of GPU).

Example (the shipped run; see docs/shapes_model.md):
    python scripts/train_shapes.py --out runs/shapes --time-budget 450 --eval

CPU smoke test (a tiny model, seconds):
    python scripts/train_shapes.py --out /tmp/shapes_smoke --device cpu --tiny --steps 4 --batch-size 4 --eval \
        --eval-captions 4 --eval-steps 2
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from catprune.evaluation.adherence import (  # noqa: E402
    HELD_OUT_CAPTION_SEED,
    HELD_OUT_NUM_CAPTIONS,
    QUICK_CHECK_CAPTIONS,
    measure_shapes_quality,
)
from catprune.evaluation.machine import cuda_sync  # noqa: E402
from catprune.models.shapes.loading import (  # noqa: E402
    build_shapes_pipeline,
    default_config,
    load_shapes_pipeline,
    random_config,
    save_flat_weights,
)
from catprune.models.shapes.world import (  # noqa: E402
    random_captions,
    render_scenes,
    sample_scenes,
    scenes_from_captions,
)

VALIDATION_CAPTION_SEED = 777  # captions used to choose EMA-vs-raw weights and the default guidance scale
START = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - START:7.1f}s] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (weights, config, logs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=250, help="linear warm-up steps")
    p.add_argument("--steps", type=int, default=None, help="total steps (default: sized to --time-budget)")
    p.add_argument("--time-budget", type=float, default=450.0, help="seconds from start to end of training")
    p.add_argument("--probe-steps", type=int, default=40, help="steps timed to size the run when --steps is unset")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--uniform-fraction", type=float, default=0.2, help="share of uniform sigma samples")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--tiny", action="store_true", help="a tiny model for a CPU smoke test")
    p.add_argument("--eval", action="store_true", help="measure quality after training and pick the weights")
    p.add_argument("--eval-captions", type=int, default=HELD_OUT_NUM_CAPTIONS)
    p.add_argument("--eval-steps", type=int, default=28)
    p.add_argument("--eval-guidance", default="2,3,4.5,6", help="guidance scales tried on validation captions")
    p.add_argument("--eval-batch-size", type=int, default=200)
    p.add_argument("--eval-deadline", type=float, default=570.0, help="skip optional evaluations after this time")
    return p.parse_args(argv)


def init_for_training(transformer: torch.nn.Module) -> None:
    """adaLN-Zero: zero the modulation layers and the output projection, so every block starts as the identity."""
    for block in transformer.transformer_blocks:
        for norm in (block.norm1, block.norm1_context):
            torch.nn.init.zeros_(norm.linear.weight)
            torch.nn.init.zeros_(norm.linear.bias)
    for layer in (transformer.norm_out.linear, transformer.proj_out):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def sample_sigmas(n: int, generator: torch.Generator, shift: float, uniform_fraction: float) -> torch.Tensor:
    device = generator.device
    u = torch.sigmoid(torch.randn(n, generator=generator, device=device))  # (B,) logit-normal(0, 1)
    shifted = shift * u / (1 + (shift - 1) * u)  # SD3 / FlowMatchEulerDiscreteScheduler shift
    uniform = torch.rand(n, generator=generator, device=device)  # (B,)
    pick = torch.rand(n, generator=generator, device=device) < uniform_fraction  # (B,)
    return torch.where(pick, uniform, shifted)


def make_batch(args, tokenizer, generator, excluded_keys):
    """One training batch, entirely on the generator's device: images x0 in [-1, 1], tokens, loss weights."""
    b = args.batch_size
    scenes = sample_scenes(b, generator, captions=False)
    for _ in range(3):  # redraw held-out captions without a host sync
        scenes = scenes.where(torch.isin(scenes.keys(), excluded_keys), sample_scenes(b, generator, captions=False))
    weight = (~torch.isin(scenes.keys(), excluded_keys)).float()  # (B,), zero for any held-out caption left
    x0 = render_scenes(scenes, device=generator.device) * 2 - 1  # (B, 3, 128, 128)
    drop = torch.rand(b, generator=generator, device=generator.device) < args.caption_dropout  # (B,)
    tokens = tokenizer.encode_scenes(scenes, drop=drop)
    return x0, tokens, weight


def flow_loss(transformer, text_encoder, x0, tokens, weight, generator, shift: float, args, autocast) -> torch.Tensor:
    """Rectified-flow loss of one batch: noise x0 to a sampled sigma, predict the velocity noise - x0, weighted MSE."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)  # (B, 3, H, W)
    sigma = sample_sigmas(x0.shape[0], generator, shift, args.uniform_fraction)  # (B,)
    s = sigma.view(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise  # (B, 3, H, W)
    with autocast:
        states, pooled = text_encoder(tokens["input_ids"], tokens["attention_mask"])
        pred = transformer(
            hidden_states=xt,
            timestep=sigma * 1000,
            encoder_hidden_states=states,
            pooled_projections=pooled,
            return_dict=False,
        )[0]  # (B, 3, H, W)
    per_sample = F.mse_loss(pred.float(), noise - x0, reduction="none").mean(dim=(1, 2, 3))  # (B,)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def lr_at(step: int, total: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def start_run(args) -> tuple[Path, torch.device, str]:
    """The output folder (created), the device (seeded; TF32 on CUDA) and the card's name, logged with the args."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"device {device} ({card}), torch {torch.__version__}, args {vars(args)}")
    return out, device, card


def log_progress(out: Path, log_rows: list, step: int, mean: float, grad_norm, lr: float, args, train_start: float):
    """One row of the training log: printed and (re)written to ``out/train_log.csv``; a non-finite loss fails."""
    row = {
        "step": step,
        "loss": round(mean, 5),
        "grad_norm": round(float(grad_norm), 4),
        "lr": f"{lr:.3g}",
        "elapsed_s": round(time.time() - START, 1),
        "samples_per_s": round(step * args.batch_size / (time.time() - train_start), 1),
    }
    log_rows.append(row)
    log(" ".join(f"{k}={v}" for k, v in row.items()))
    with open(out / "train_log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerows(log_rows)
    if not math.isfinite(mean):
        raise RuntimeError(f"loss is not finite at step {step}")


def with_weights(pipe, values: list):
    """A deep copy of ``pipe`` whose transformer and text-encoder parameters are ``values`` (e.g. an EMA)."""
    copied = copy.deepcopy(pipe)
    with torch.no_grad():
        params = [p for m in (copied.transformer, copied.text_encoder) for p in m.parameters()]
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
    return copied


def evaluate(args, out: Path, pipes: dict, device, summary: dict) -> None:
    """Choose weights and guidance on validation captions, then measure the held-out quality bar."""
    guidance = [float(g) for g in args.eval_guidance.split(",")]
    n = args.eval_captions
    validation = random_captions(n, seed=VALIDATION_CAPTION_SEED)
    held_out = random_captions(n, seed=HELD_OUT_CAPTION_SEED)
    kw = dict(num_inference_steps=args.eval_steps, batch_size=args.eval_batch_size, seed=0)
    results = {"validation": [], "held_out": [], "quick_check": []}
    best = None
    for name, pipe in pipes.items():
        for g in guidance:
            r = measure_shapes_quality(pipe, captions=validation, guidance_scale=g, **kw).summary()
            r["weights"] = name
            results["validation"].append(r)
            log(f"validation {name} g={g}: colour_at_cell={r['colour_at_cell']:.3f} shape={r['shape']:.3f}")
            score = r["colour_at_cell"] + r["shape"]
            if best is None or score > best[0]:
                best = (score, name, g)
    _, chosen, chosen_g = best
    summary["chosen_weights"], summary["chosen_guidance"] = chosen, chosen_g
    log(f"chosen: {chosen} weights, guidance {chosen_g}")
    if chosen != "ema":  # the EMA weights were saved first; ship the raw ones instead
        save_flat_weights(pipes[chosen], out)
    pipe = pipes[chosen]

    def held_out_at(g: float) -> None:
        r = measure_shapes_quality(pipe, captions=held_out, guidance_scale=g, **kw).summary()
        results["held_out"].append(r)
        log(f"HELD-OUT g={g} steps={args.eval_steps}: colour_at_cell={r['colour_at_cell']:.3f} shape={r['shape']:.3f}")
        with open(out / "results.json", "w") as f:
            json.dump({"summary": summary, **results}, f, indent=2)

    held_out_at(chosen_g)
    # Settings for the fast CPU test: the quick-check captions at few steps.
    for steps in (6, 8, 10, 12, 28):
        for g in (chosen_g, 1.0):
            if time.time() - START > args.eval_deadline:
                break
            r = measure_shapes_quality(
                pipe, captions=QUICK_CHECK_CAPTIONS, guidance_scale=g, num_inference_steps=steps, seed=0
            ).summary()
            results["quick_check"].append(r)
            log(f"quick-check g={g} steps={steps}: colour_at_cell={r['colour_at_cell']:.3f} shape={r['shape']:.3f}")
    for g in guidance:
        if g != chosen_g and time.time() - START < args.eval_deadline:
            held_out_at(g)
    with open(out / "results.json", "w") as f:
        json.dump({"summary": summary, **results}, f, indent=2)


def main(argv=None) -> None:
    args = parse_args(argv)
    out, device, card = start_run(args)

    config = (
        random_config(
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
        )
        if args.tiny
        else default_config()
    )
    pipe = build_shapes_pipeline(config)
    init_for_training(pipe.transformer)
    transformer, text_encoder, tokenizer = pipe.transformer.to(device), pipe.text_encoder.to(device), pipe.tokenizer
    transformer.train()
    text_encoder.train()
    params = [p for m in (transformer, text_encoder) for p in m.parameters()]
    n_params = {m: sum(p.numel() for p in getattr(pipe, m).parameters()) for m in ("transformer", "text_encoder")}
    log(f"parameters: {n_params}")
    ema = [p.detach().clone().float() for p in params]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0, fused=device.type == "cuda")
    shift = float(pipe.scheduler.config.shift)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    excluded = list(random_captions(HELD_OUT_NUM_CAPTIONS, seed=HELD_OUT_CAPTION_SEED)) + list(QUICK_CHECK_CAPTIONS)
    excluded_keys = scenes_from_captions(excluded).keys().to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    total = args.steps if args.steps is not None else 10**9
    log_rows, running, running_n = [], 0.0, 0
    probe_start = None
    step = 0
    train_start = time.time()
    while step < total:
        if args.steps is None and step == 5:
            cuda_sync(device)
            probe_start = time.time()
        if args.steps is None and step == 5 + args.probe_steps:
            cuda_sync(device)
            per_step = (time.time() - probe_start) / args.probe_steps
            remaining = args.time_budget - (time.time() - START)
            total = step + max(0, int(remaining / per_step))
            log(f"{per_step * 1000:.1f} ms/step -> total steps {total} (reproduce with --steps {total})")
            if device.type == "cuda":
                log(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, args)
        x0, tokens, weight = make_batch(args, tokenizer, generator, excluded_keys)
        loss = flow_loss(transformer, text_encoder, x0, tokens, weight, generator, shift, args, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - decay)
        running += loss.detach()
        running_n += 1
        step += 1
        if step % args.log_every == 0 or step == total:
            log_progress(
                out,
                log_rows,
                step,
                float(running) / running_n,
                grad_norm,
                lr_at(step - 1, total, args),
                args,
                train_start,
            )
            running, running_n = 0.0, 0
        if args.steps is None and time.time() - START > args.time_budget + 30:
            log(f"time budget exceeded: stopping at step {step} of {total}")
            break
    cuda_sync(device)
    train_seconds = time.time() - train_start
    log(f"trained {step} steps in {train_seconds:.1f}s")

    # Two pipelines on the device in fp32, each rounded through the fp16 files that would ship.
    transformer.eval()
    text_encoder.eval()
    raw_pipe = pipe
    ema_pipe = with_weights(pipe, ema)
    pipes = {}
    for name, candidate in (("ema", ema_pipe), ("raw", raw_pipe)):
        with tempfile.TemporaryDirectory() as tmp:
            save_flat_weights(candidate.to("cpu"), tmp)
            pipes[name] = load_shapes_pipeline(tmp, device=device)
    save_flat_weights(pipes["ema"], out)  # the default; replaced by raw below if it wins on validation
    summary = {
        "card": card,
        "torch": torch.__version__,
        "steps": step,
        "batch_size": args.batch_size,
        "train_seconds": round(train_seconds, 1),
        "final_loss": log_rows[-1]["loss"] if log_rows else None,
        "parameters": n_params,
        "args": vars(args),
    }
    with open(out / "results.json", "w") as f:
        json.dump({"summary": summary}, f, indent=2)
    log(f"saved weights to {out}")
    if args.eval:
        if device.type == "cuda":  # measure in plain fp32, as on a CPU
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        evaluate(args, out, pipes, device, summary)
    summary["total_seconds"] = round(time.time() - START, 1)
    log(f"done: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
