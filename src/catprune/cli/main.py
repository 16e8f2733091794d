"""The ``catprune`` command: ``generate``, ``env``, ``bench`` and ``eval`` (each subcommand adds itself through
`COMMANDS`)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16"}


def _device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def psnr(a, b) -> float:
    """PSNR in dB between two images in [0, 1] (tensors or arrays of the same shape); inf when identical.

    Example:
        >>> import torch
        >>> round(psnr(torch.zeros(3, 2, 2), torch.full((3, 2, 2), 0.1)), 2)
        20.0
    """
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(1.0 / mse)).item()


def _timed_call(pipe, prompt, args, seed):
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    kwargs = dict(
        num_inference_steps=args.steps,
        generator=generator,
        num_images_per_prompt=args.batch_size,
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


def _side_by_side(left, right, captions: tuple[str, str]):
    from PIL import Image, ImageDraw

    scale = max(1, 256 // max(left.height, 1))
    left = left.resize((left.width * scale, left.height * scale), Image.NEAREST)
    right = right.resize((right.width * scale, right.height * scale), Image.NEAREST)
    header = 30
    canvas = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height) + header), "white")
    canvas.paste(left, (0, header))
    canvas.paste(right, (left.width + 8, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), captions[0], fill="black")
    draw.text((left.width + 12, 2), captions[1], fill="black")
    return canvas


def _save_images(images, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        _to_pil(images[0]).save(out)
        return [out]
    paths = [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        _to_pil(image).save(path)
    return paths


def cmd_generate(args) -> int:
    if args.prompts is not None or args.prompt is None:  # batch mode: --prompts FILE --out DIR
        from catprune.cli.batch_cmd import cmd_generate_batch

        return cmd_generate_batch(args)
    import torch

    import catprune
    from catprune.models import load_pipeline

    config = catprune.CATConfig(keep_ratio=args.keep_ratio, start_step=args.start_step, seed=args.seed)
    device = _device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    pipe = load_pipeline(args.model, device=device, dtype=dtype)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not args.progress)
    out = Path(args.out)
    report = {"prompt": args.prompt, "model": args.model, "device": str(device), "config": config.to_dict()}

    if args.compare:
        warm = argparse.Namespace(**{**vars(args), "steps": 2, "batch_size": 1})
        _timed_call(pipe, args.prompt, warm, args.seed)  # untimed warm-up: lazy initialisation stays out of both timings
        dense_images, dense_time = _timed_call(pipe, args.prompt, args, args.seed)
        catprune.apply(pipe, config)
        cat_images, cat_time = _timed_call(pipe, args.prompt, args, args.seed)
        stats = catprune.stats(pipe)
        catprune.remove(pipe)
        value = psnr(dense_images, cat_images)
        canvas = _side_by_side(
            _to_pil(dense_images[0]),
            _to_pil(cat_images[0]),
            (f"dense: {dense_time:.2f} s", f"CAT (keep {args.keep_ratio}, start {args.start_step}): {cat_time:.2f} s"),
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(out)
        report.update(
            dense_seconds=dense_time,
            cat_seconds=cat_time,
            speedup=dense_time / cat_time,
            psnr_db=value,
            macs_ratio=stats.macs_ratio,
            images=[str(out)],
        )
        print(f"dense: {dense_time:.3f} s   CAT: {cat_time:.3f} s   speed-up {dense_time / cat_time:.2f}x")
        print(f"PSNR(CAT vs dense) = {value:.2f} dB   {stats}")
    else:
        if not args.dense:
            catprune.apply(pipe, config)
        images, seconds = _timed_call(pipe, args.prompt, args, args.seed)
        paths = _save_images(images, out)
        report.update(seconds=seconds, images=[str(p) for p in paths], dense=args.dense)
        print(
            f"{'dense' if args.dense else 'CAT'}: {seconds:.3f} s for {len(images)} image(s) -> {', '.join(map(str, paths))}"
        )
        if not args.dense:
            stats = catprune.stats(pipe)
            report["macs_ratio"] = stats.macs_ratio
            print(stats)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_env(args) -> int:
    import importlib.metadata as md

    import torch

    import catprune

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    info = {
        "catprune": catprune.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "accelerate": version("accelerate"),
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>15}: {value}")
    return 0


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate an image with CAT Pruning (default: the embedded shapes model)")
    p.add_argument("prompt", nargs="?", help="text prompt, e.g. 'a large red circle at the center' (or --prompts)")
    p.add_argument("--model", default="shapes", help="'shapes' (embedded, offline), a hub id, or a local folder")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    p.add_argument("--keep-ratio", type=float, default=0.3, help="fraction of image tokens recomputed per pruned step")
    p.add_argument("--start-step", type=int, default=8, help="dense warm-up steps before pruning starts")
    p.add_argument("--seed", type=int, default=0, help="generator seed (also the k-means seed)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (model default if omitted)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (model default if omitted)")
    p.add_argument("--batch-size", type=int, default=1, help="images for the prompt (num_images_per_prompt)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--out", default="catprune.png", help="output PNG (several images get _0, _1, ... suffixes)")
    p.add_argument("--dense", action="store_true", help="run the dense model (no pruning)")
    p.add_argument("--compare", action="store_true", help="dense and CAT side by side, with PSNR and timings")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
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
    except (ValueError, TypeError, OSError, NotImplementedError) as exc:
        print(f"catprune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
