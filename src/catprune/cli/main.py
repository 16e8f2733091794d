"""The ``catprune`` command: ``generate``, ``env``, ``bench`` and ``eval`` (each subcommand adds itself through
`COMMANDS`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

from catprune.models import DEFAULT_MODEL, EXAMPLE_CAPTIONS

from .options import (
    DTYPE_HELP,
    RULE_FLAGS,
    CLIError,
    add_rule_options,
    check_output_file,
    config_error,
    dtype_name,
    finite_float,
    positive_int,
    ratio,
    resolve_device,
    seed,
    torch_dtype,
)
from .speedup import check_speedup_flags, planned_config

#: CATConfig fields -> the ``generate`` flags that set them (config errors name the flag)
CONFIG_FLAGS = {"keep_ratio": "--keep-ratio", "start_step": "--start-step", "seed": "--seed", "backend": "--backend"}
CONFIG_FLAGS |= RULE_FLAGS
DEFAULT_REPEATS = 3
DEFAULT_OUT = "outputs/catprune.png"
NOISY_SPREAD = 0.20  # timings whose (max - min) exceeds this share of the median are called too noisy to trust


def _warn(message: str) -> None:
    print(f"catprune generate: warning: {message}", file=sys.stderr, flush=True)


def psnr(a, b) -> float:
    """PSNR in dB between two images in [0, 1] (tensors or arrays of the same shape); inf when identical.

    Example:
        >>> import torch
        >>> round(psnr(torch.zeros(3, 2, 2), torch.full((3, 2, 2), 0.1)), 2)
        20.0
    """
    import torch

    from catprune.evaluation.metrics import psnr as psnr_per_image

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(psnr_per_image(a.reshape(1, 1, 1, -1), b.reshape(1, 1, 1, -1))[0])  # all pixels as one image


def _json_safe(value):
    """``value`` with non-finite floats as None (JSON has no Infinity / NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _timed_call(pipe, prompt, args, seed, steps=None, batch_size=None):
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    kwargs = dict(
        num_inference_steps=steps or args.steps,
        generator=generator,
        num_images_per_prompt=batch_size or args.batch_size,
        output_type="pt",
    )
    if args.height:
        kwargs["height"] = args.height
    if args.width:
        kwargs["width"] = args.width
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = pipe(prompt, **kwargs).images  # (N, 3, H, W) in [0, 1]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return images.float().cpu(), time.perf_counter() - start


def _to_pil(image):
    from PIL import Image

    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def _side_by_side(left, right, captions: tuple[list[str], list[str]]):
    """Two panels under a header; each caption is a list of lines."""
    from PIL import Image, ImageDraw

    scale = max(1, 256 // max(left.height, 1))
    left = left.resize((left.width * scale, left.height * scale), Image.NEAREST)
    right = right.resize((right.width * scale, right.height * scale), Image.NEAREST)
    line = 14
    header = 4 + line * max(len(captions[0]), len(captions[1]))
    canvas = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height) + header), "white")
    canvas.paste(left, (0, header))
    canvas.paste(right, (left.width + 8, header))
    draw = ImageDraw.Draw(canvas)
    for x, lines in ((4, captions[0]), (left.width + 12, captions[1])):
        for i, text in enumerate(lines):
            draw.text((x, 2 + line * i), text, fill="black")
    return canvas


def _save_atomic(image, path: Path, description: str | None = None) -> None:
    """Write ``image`` (PIL) to ``path`` through a temporary file in the same folder and a rename: an interrupted
    run never leaves a partial image (nor replaces an existing one with a partial one)."""
    from PIL import Image, PngImagePlugin

    path.parent.mkdir(parents=True, exist_ok=True)
    image_format = Image.registered_extensions()[path.suffix.lower()]
    extra = {}
    if description is not None and image_format == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("Description", description)
        extra["pnginfo"] = info
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "xb") as f:  # the usual permissions (umask), unlike mkstemp's 0600
            image.save(f, format=image_format, **extra)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_images(images, out: Path) -> list[Path]:
    if len(images) == 1:
        _save_atomic(_to_pil(images[0]), out)
        return [out]
    paths = [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        _save_atomic(_to_pil(image), path)
    return paths


def _cat_config(args):
    """The CATConfig the flags describe; a CLIError naming the flag when a value is out of range."""
    import catprune
    from catprune.batch.runner import CONFIG_FIELDS

    fields = dict({name: getattr(args, name) for name in CONFIG_FIELDS}, backend=args.backend)
    try:
        return catprune.CATConfig(**fields)
    except (ValueError, TypeError) as exc:
        raise CLIError(config_error(exc, CONFIG_FLAGS)) from None


def _nothing_pruned_reason(config, steps: int) -> str | None:
    """Why a generation of ``steps`` steps with ``config`` prunes no step (None when it prunes)."""
    if not config.pruning_enabled:
        return f"--keep-ratio {config.keep_ratio:g} recomputes every token"
    if config.start_step >= steps:
        return (
            f"--start-step {config.start_step} >= --steps {steps}: the first {config.start_step} steps are dense "
            "warm-up, so no step is left to prune"
        )
    if config.start_step >= steps - config.final_dense_steps:
        return (
            f"--start-step {config.start_step} + --final-dense-steps {config.final_dense_steps} >= --steps {steps}: "
            "every step is dense warm-up or a final dense step"
        )
    return None


def _spread(times: list[float]) -> float:
    """(max - min) / median of the timings: 0 for one run."""
    return (max(times) - min(times)) / statistics.median(times)


def _compare(pipe, config, args, out: Path, report: dict, dense_equivalent: bool) -> None:
    """Dense and CAT, each timed ``--repeats`` times after an untimed warm-up (interleaved, so slow phases of a
    shared machine hit both sides); medians, spreads, MACs ratio and PSNR; the side-by-side image."""
    import dataclasses

    import catprune

    repeats = args.repeats or DEFAULT_REPEATS
    # untimed warm-up: lazy initialisation (allocator, kernels, the pruned path's buffers) stays out of both timings
    _timed_call(pipe, args.prompt, args, args.seed, steps=2, batch_size=1)
    with catprune.applied(pipe, dataclasses.replace(config, start_step=2)):
        _timed_call(pipe, args.prompt, args, args.seed, steps=3, batch_size=1)
    dense_times, cat_times = [], []
    for _ in range(repeats):
        dense_images, seconds = _timed_call(pipe, args.prompt, args, args.seed)
        dense_times.append(seconds)
        with catprune.applied(pipe, config):
            cat_images, seconds = _timed_call(pipe, args.prompt, args, args.seed)
            stats = catprune.stats(pipe)
        cat_times.append(seconds)
    dense_s, cat_s = statistics.median(dense_times), statistics.median(cat_times)
    dense_spread, cat_spread = _spread(dense_times), _spread(cat_times)
    speedup = dense_s / cat_s
    value = psnr(dense_images, cat_images)
    identical = math.isinf(value)
    label = "CAT (dense-equivalent)" if dense_equivalent else "CAT"
    psnr_text = "identical to dense (PSNR infinite)" if identical else f"PSNR {value:.2f} dB vs dense"
    captions = (
        ["dense", f"{dense_s:.2f} s (median of {repeats})"],
        [
            f"{label} keep {config.keep_ratio:g}, start {config.start_step}",
            f"{cat_s:.2f} s, {speedup:.2f}x, MACs x{stats.macs_ratio:.3f}",
            psnr_text,
        ],
    )
    canvas = _side_by_side(_to_pil(dense_images[0]), _to_pil(cat_images[0]), captions)
    _save_atomic(canvas, out, description=" | ".join(" / ".join(c) for c in captions))
    noisy = max(dense_spread, cat_spread) > NOISY_SPREAD
    report.update(
        label=label,
        dense_equivalent=dense_equivalent,
        repeats=repeats,
        dense_seconds=dense_s,
        cat_seconds=cat_s,
        dense_seconds_all=dense_times,
        cat_seconds_all=cat_times,
        dense_spread=dense_spread,
        cat_spread=cat_spread,
        speedup=speedup,
        timing_noisy=noisy,
        psnr_db=None if identical else value,
        macs_ratio=stats.macs_ratio,
        pruned_steps=stats.pruned_steps,
        images=[str(out)],
    )
    if identical:
        report["psnr_note"] = "the CAT image is identical to the dense one: PSNR is infinite"
    ideal = f"{1 / stats.macs_ratio:.2f}x" if stats.macs_ratio > 0 else "-"
    print(
        f"dense: {dense_s:.3f} s   {label}: {cat_s:.3f} s   (medians of {repeats} runs; spread dense "
        f"{dense_spread:.0%}, CAT {cat_spread:.0%})"
    )
    print(f"speed-up {speedup:.2f}x   MACs ratio {stats.macs_ratio:.3f} (at best {ideal})")
    if repeats == 1:
        _warn("one timed run per side (--repeats 1): the speed-up has no error bar; use --repeats 3 or more.")
    elif noisy:
        _warn(
            f"the timings vary by more than {NOISY_SPREAD:.0%} of their median (dense {dense_spread:.0%}, CAT "
            f"{cat_spread:.0%}): the speed-up is too noisy to trust. Close other programs, or raise --repeats."
        )
    if identical:
        print("PSNR(CAT vs dense) = inf (identical images)   " + str(stats))
    else:
        print(f"PSNR(CAT vs dense) = {value:.2f} dB   {stats}")
    print(f"image: {out}")


def cmd_generate(args) -> int:
    check_speedup_flags(args)
    if args.prompts is not None or args.prompt is None:  # batch mode: --prompts FILE --out DIR
        from catprune.cli.batch_cmd import cmd_generate_batch

        return cmd_generate_batch(args)
    import catprune
    from catprune.models import load_pipeline

    # everything the user typed is checked before the model loads
    if args.repeats is not None and not args.compare:
        raise CLIError(
            f"--repeats: only applies with --compare (it times dense and CAT), got --repeats {args.repeats} without "
            "it. Add --compare, or drop --repeats."
        )
    out = check_output_file(args.out if args.out is not None else DEFAULT_OUT)
    device = resolve_device(args.device)
    config = _cat_config(args)
    if (
        config.backend.value in ("cudagraph", "compile+cudagraph")
        and not args.dense
        and device.split(":")[0] != "cuda"
    ):
        raise CLIError(
            f"--backend: {args.backend!r} captures CUDA graphs and needs --device cuda, got --device {args.device} "
            f"({device}). Use --backend eager (or compile) on this device."
        )
    if not args.prompt.strip():
        _warn("the prompt is empty: this generates the unconditional image (what the model draws for no caption).")
    reason = None if args.dense or args.speedup is not None else _nothing_pruned_reason(config, args.steps)
    if reason is not None:
        _warn(
            f"nothing will be pruned ({reason}); the output equals the dense image and is labelled dense-equivalent."
        )

    pipe = load_pipeline(args.model, device=device, dtype=torch_dtype(args.dtype))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not args.progress)
    config, reason, plan = planned_config(pipe, args, device, config, reason)  # --speedup: the planner's choice
    report = {"prompt": args.prompt, "model": args.model, "device": str(device), "config": config.to_dict(), **plan}

    def apply():
        try:
            catprune.apply(pipe, config)
        except (ValueError, TypeError) as exc:
            raise CLIError(config_error(exc, CONFIG_FLAGS)) from None

    if args.compare:
        apply()  # validates the config against the model before the timed runs
        catprune.remove(pipe)
        _compare(pipe, config, args, out, report, dense_equivalent=reason is not None)
    else:
        if not args.dense:
            apply()
        images, seconds = _timed_call(pipe, args.prompt, args, args.seed)
        paths = _save_images(images, out)
        if args.dense:
            label = "dense"
        else:  # the label says what ran: the stats of this generation, not the flags
            stats = catprune.stats(pipe)
            label = "CAT" if stats.pruned_steps else "CAT (dense-equivalent: nothing pruned)"
            report.update(macs_ratio=stats.macs_ratio, pruned_steps=stats.pruned_steps)
        report.update(
            label=label,
            dense_equivalent=label != "CAT",
            seconds=seconds,
            images=[str(p) for p in paths],
            dense=args.dense,
        )
        print(f"{label}: {seconds:.3f} s for {len(images)} image(s) -> {', '.join(map(str, paths))}")
        if not args.dense:
            print(stats)
    if args.json:
        print(json.dumps(_json_safe(report), indent=2, default=str, allow_nan=False))
    return 0


def cmd_env(args) -> int:
    import catprune
    from catprune.evaluation.machine import environment

    env = environment()
    info = {
        "catprune": catprune.__version__,
        **{key: env[key] for key in ("python", "platform", "torch")},
        **{name: env[name] or "not installed" for name in ("diffusers", "transformers", "accelerate")},
        **{key: env[key] for key in ("cuda_available", "cuda")},
        "devices": env["gpus"],
        "cpu_threads": env["torch_threads"],
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>15}: {value}")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option that has a default (not after switches and unset options)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _add_generate(sub):
    from catprune.config import Backend

    p = sub.add_parser(
        "generate",
        help="generate an image with CAT Pruning (default: the embedded scenes model; --model shapes is the fast one)",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "prompt",
        nargs="?",
        help=f"text prompt (or --prompts), e.g. {EXAMPLE_CAPTIONS['scenes']!r} for scenes (the default model; its "
        f"words: catprune.models.scenes.OBJECT_NAMES and the grid cells), {EXAMPLE_CAPTIONS['shapes']!r} for shapes",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="'scenes' (embedded, offline: emoji objects on gradients), 'shapes' (embedded, offline, the fast "
        "alternative: flat coloured shapes), a hub id, or a local folder",
    )
    p.add_argument("--steps", type=positive_int, default=28, help="denoising steps")
    p.add_argument(
        "--keep-ratio", type=ratio, default=0.3, help="fraction of image tokens recomputed per pruned step, in (0, 1]"
    )
    p.add_argument("--start-step", type=positive_int, default=8, help="dense warm-up steps before pruning starts")
    add_rule_options(p)
    p.add_argument(
        "--speedup",
        type=finite_float,
        default=None,
        help="let catprune.plan choose steps, keep ratio and start step for this speed-up over dense --steps; "
        "prints its choice and why (not with --keep-ratio / --start-step / --selection / --context / "
        "--final-dense-steps / --dense / --compare)",
    )
    p.add_argument("--seed", type=seed, default=0, help="generator seed (also the k-means seed), in [0, 2**63 - 1]")
    p.add_argument("--height", type=positive_int, default=None, help="image height in pixels (model default)")
    p.add_argument("--width", type=positive_int, default=None, help="image width in pixels (model default)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images for the prompt (num_images_per_prompt)")
    p.add_argument(
        "--guidance-scale", type=finite_float, default=None, help="classifier-free guidance scale (model default)"
    )
    p.add_argument(
        "--out",
        default=None,
        help="output image (.png, .jpg, ...; several images get _0, _1, ... suffixes), checked before generating; "
        f"with --prompts the output directory, required (default: {DEFAULT_OUT})",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dense", action="store_true", help="run the dense model (no pruning)")
    mode.add_argument("--compare", action="store_true", help="dense and CAT side by side, with PSNR and timings")
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help=f"with --compare: timed runs of each side after a warm-up; medians and spread are reported "
        f"(default: {DEFAULT_REPEATS})",
    )
    p.add_argument(
        "--backend",
        default="eager",
        choices=[b.value for b in Backend],
        help="execution of the steps; on a GPU use cudagraph (CUDA only, like compile+cudagraph)",
    )
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", type=dtype_name, default="float32", help=f"model dtype: {DTYPE_HELP}")
    p.add_argument("--progress", action="store_true", help="show the progress bar")
    p.add_argument("--json", action="store_true", help="also print a JSON report")
    from catprune.cli.batch_cmd import add_batch_arguments

    add_batch_arguments(p)
    p.set_defaults(func=cmd_generate)


def _add_env(sub):
    p = sub.add_parser("env", help="print versions and devices (for bug reports)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_env)


def _add_bench(sub):
    from catprune.bench.cli import add_bench

    add_bench(sub)


def _add_eval(sub):
    from catprune.cli.eval_cmd import add_parser

    add_parser(sub)


COMMANDS = [_add_generate, _add_env, _add_bench, _add_eval]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="catprune", description="CAT Pruning for diffusion transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, TypeError, OSError, NotImplementedError) as exc:
        print(f"catprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = " (no partial image written)" if args.command == "generate" else ""
        print(f"catprune {args.command}: interrupted{done}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
