"""``catprune bench`` subcommand."""

from __future__ import annotations

import argparse
import sys

from catprune.cli.options import (
    DTYPE_HELP,
    config_error,
    dtype_name,
    non_negative_int,
    positive_int,
    ratio,
    selection_name,
)

#: CATConfig fields -> the ``bench`` flags that set them (config errors name the flag)
CONFIG_FLAGS = {
    "keep_ratio": "--keep-ratio",
    "start_step": "--start-step",
    "keep_ratio_end": "--keep-ratio-end",
    "final_dense_steps": "--final-dense-steps",
    "forecast_max_ratio": "--forecast-max-ratio",
    "context": "--context",
    "cache_dtype": "--cache-dtype",
    "selection": "--selection",
}


def _list(kind):
    def parse(text):
        values = [kind(x) for x in text.split(",") if x]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma list of at least one value, got {text!r}")
        return values

    return parse


def _size(text):
    """One ``--sizes`` item: ``WxH`` in pixels, both positive integers."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected WxH in pixels (comma-separated), e.g. 1024x1024, got {text!r}")
    return int(parts[0]), int(parts[1])


def check_cat_options(args) -> None:
    """The CATConfig of every CAT case ``args`` asks for, validated before any model is built: ValueError naming
    the flag (``--keep-ratio``, ``--start-step``, ...) when one is out of range."""
    from catprune import CATConfig

    for context in args.context:
        for cache_dtype in args.cache_dtype:
            try:
                CATConfig(
                    keep_ratio=args.keep_ratio,
                    start_step=args.start_step,
                    keep_ratio_end=args.keep_ratio_end,
                    final_dense_steps=args.final_dense_steps,
                    forecast_max_ratio=args.forecast_max_ratio,
                    context=context,
                    cache_dtype=cache_dtype,
                    selection=args.selection,
                )
            except (ValueError, TypeError) as exc:
                raise ValueError(config_error(exc, CONFIG_FLAGS)) from None


def cache_dtypes(text: str) -> list[str | None]:
    """``--cache-dtype``: a comma list of ``none`` and `catprune.CacheDtype` values (one case each)."""
    from catprune import CacheDtype

    choices = ["none"] + [d.value for d in CacheDtype]
    values = [x.strip().lower() for x in text.split(",") if x.strip()]
    wrong = [x for x in values if x not in choices]
    if wrong or not values:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of {', '.join(choices)}, got {text!r}. Use e.g. none,fp8 to measure both"
        )
    return [None if x == "none" else x for x in values]


def context_name(text: str) -> str:
    """One ``--context`` item: a `catprune.Context` value."""
    from catprune import Context

    values = [c.value for c in Context]
    if text not in values:
        raise argparse.ArgumentTypeError(f"expected {' or '.join(values)} (comma-separated), got {text!r}")
    return text


def _number_or_none(text: str, ok, expected: str) -> float | None:
    """``none`` -> None, else a float for which ``ok`` holds; ArgumentTypeError saying what was ``expected``."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected} or none, got {text!r}")
    return value


def keep_ratio_end(text: str) -> float | None:
    """``--keep-ratio-end``: a number in (0, 1] or ``none``."""
    return _number_or_none(text, lambda v: 0 < v <= 1, "a number in (0, 1]")


def forecast_cap(text: str) -> float | None:
    """``--forecast-max-ratio``: a number > 0 or ``none`` (uncapped)."""
    return _number_or_none(text, lambda v: v > 0, "a number > 0")


def dense_baseline(text: str) -> str:
    """``--dense-baseline``: one of `catprune.bench.baselines.CHOICES` (argparse names the flag)."""
    from catprune.bench.baselines import CHOICES

    if text not in CHOICES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(CHOICES)}, got {text!r}. Use best for the fastest stock configuration, or "
            "same (the default) for catprune's dense path in the CAT mode"
        )
    return text


def check_sizes(pipe, sizes, preset: str) -> None:
    """``--sizes`` against the largest image the preset's transformer places (SD3's ``pos_embed_max_size``), before
    anything is timed: ValueError naming the flag and the limit in pixels."""
    config = pipe.transformer.config
    limit = getattr(config, "pos_embed_max_size", None)
    if limit is None:
        return
    pixels = limit * getattr(config, "patch_size", 1) * getattr(pipe, "vae_scale_factor", 8)
    for width, height in sizes:
        if max(width, height) > pixels:
            raise ValueError(
                f"--sizes: expected at most {pixels} pixels per side for --preset {preset} (its transformer places "
                f"at most {limit} patches per side), got {width}x{height}. Pass a smaller size."
            )


def cmd_bench(args, time_candidate=None) -> int:
    """Run the cases of ``args``; ``time_candidate`` (``name -> seconds per step``) ranks ``--dense-baseline best``'s
    candidates instead of timing them (tests)."""
    import torch

    from catprune.bench import BenchCase, build_pipeline, format_details, format_table, run_case, save_json
    from catprune.bench.baselines import SAME, candidates, check_dense_baseline

    check_cat_options(args)  # before building the models: a bad flag fails fast and names itself
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(args.dtype, args.dtype))
    check_dense_baseline(
        args.dense_baseline, device
    )  # before building the models: a CUDA-only baseline on a CPU fails fast
    candidates(device, tuple(args.dense_candidates or ()))
    pipe, entry = build_pipeline(args.preset, device, dtype, weights=args.weights, text_encoders=args.text_encoders)
    check_sizes(pipe, args.sizes, args.preset)
    results = []
    for width, height in args.sizes:
        for batch in args.batch_sizes:
            for steps in args.steps:
                dense = None  # a stock baseline is measured once per size / batch / steps, for every CAT mode
                for mode, context, cache_dtype in [
                    (m, c, d) for m in args.modes for c in args.context for d in args.cache_dtype
                ]:
                    case = BenchCase(
                        preset=args.preset,
                        height=height,
                        width=width,
                        steps=steps,
                        batch_size=batch,
                        cfg=False if args.no_cfg else None,
                        dtype=str(dtype).replace("torch.", ""),
                        mode=mode,
                        keep_ratio=args.keep_ratio,
                        start_step=args.start_step,
                        context=context,
                        forecast_max_ratio=args.forecast_max_ratio,
                        repeats=args.repeats,
                        vae=not args.no_vae,
                        dense_baseline=args.dense_baseline,
                        dense_candidates=tuple(args.dense_candidates) if args.dense_candidates else None,
                        split=args.split,
                        compile_vae=args.compile_vae,
                        cache_dtype=cache_dtype,
                        keep_ratio_end=args.keep_ratio_end,
                        final_dense_steps=args.final_dense_steps,
                        selection=args.selection,
                    )
                    result = run_case(case, pipe, entry, device, dense=dense, time_candidate=time_candidate)
                    if args.dense_baseline != SAME:
                        dense = result.dense, result.baseline
                    results.append(result)
                    print(format_table([result]).splitlines()[-1], file=sys.stderr, flush=True)
                    if args.json:
                        save_json(results, args.json)
    print(format_details(results))  # the table stays last: tools read its rows from the end of the output
    print(f"device: {results[0].device}")
    print(format_table(results))
    return 0


def _add_cat_options(p) -> None:
    """The CATConfig of the CAT side: keep ratio, start step, context and forecast cap."""
    p.add_argument("--keep-ratio", type=ratio, default=0.3, help="fraction of image tokens recomputed, in (0, 1]")
    p.add_argument("--start-step", type=positive_int, default=8, help="dense warm-up steps before pruning (>= 2)")
    p.add_argument(
        "--context",
        type=_list(context_name),
        default=["reuse"],
        help="CATConfig.context of the pruned steps, a list: reuse (the paper's and the library default), extrapolate "
        "(the K/V forecast), or reuse,extrapolate to time both",
    )
    p.add_argument(
        "--selection",
        type=selection_name,
        default="cat",
        help="CATConfig.selection of the CAT side: cat (the paper's, default), drift, or an ablation / baseline rule "
        "(no_clustering, staleness, magnitude, random, ras)",
    )
    p.add_argument(
        "--forecast-max-ratio",
        type=forecast_cap,
        default=0.5,
        help="CATConfig.forecast_max_ratio with --context extrapolate: a number > 0, or none (default 0.5)",
    )
    p.add_argument(
        "--keep-ratio-end",
        type=keep_ratio_end,
        default=None,
        help="CATConfig.keep_ratio_end of the CAT side: a keep-ratio schedule from --keep-ratio to this over the "
        "pruned steps (a number in (0, 1]; default none: constant)",
    )
    p.add_argument(
        "--final-dense-steps",
        type=non_negative_int,
        default=0,
        help="CATConfig.final_dense_steps of the CAT side: the last n steps run dense (default 0)",
    )
    p.add_argument(
        "--cache-dtype",
        type=cache_dtypes,
        default=[None],
        help="CATConfig.cache_dtype of the CAT side, a list: none (the model's dtype, default), bf16, fp16 or fp8; "
        "e.g. none,fp8 times both and reports cache GiB and peak memory of each",
    )


def add_bench(sub):
    p = sub.add_parser("bench", help="time dense vs CAT on random-weight full-size models (GPU)")
    p.add_argument(
        "--preset",
        default="sd3-medium",
        help="sd3-medium, sd3.5-medium, sd3.5-large, pixart-sigma-1024, flux-dev, shapes (the embedded model; "
        "real weights), or sd3-tiny for smoke tests",
    )
    p.add_argument("--sizes", type=_list(_size), default=[(1024, 1024)], help="WxH list, e.g. 1024x1024,512x512")
    p.add_argument("--steps", type=_list(positive_int), default=[28], help="step counts, e.g. 28,50")
    p.add_argument("--batch-sizes", type=_list(positive_int), default=[1], help="images per prompt batch, e.g. 1,4")
    p.add_argument("--modes", type=_list(str), default=["eager"], help="eager, compile, cudagraph, compile+cudagraph")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument(
        "--random-weights",
        action="store_true",
        help="full-size models with random weights built from the preset's config (the default; compute does not "
        "depend on weight values)",
    )
    weights.add_argument(
        "--weights",
        default=None,
        help="real weights: a hub id or a local diffusers pipeline folder of the preset's family",
    )
    _add_cat_options(p)
    p.add_argument("--repeats", type=positive_int, default=3, help="timed generations per case (default 3)")
    p.add_argument("--dtype", type=dtype_name, default="bf16", help=f"model dtype: {DTYPE_HELP}")
    p.add_argument(
        "--no-cfg", action="store_true", help="no classifier-free guidance (batch not doubled; always so for Flux)"
    )
    p.add_argument(
        "--text-encoders",
        action="store_true",
        help="keep the family's text encoders (random weights) resident, so peak memory is a whole pipeline's",
    )
    p.add_argument("--no-vae", action="store_true", help="skip timing the VAE decode")
    p.add_argument(
        "--dense-baseline",
        type=dense_baseline,
        default="same",
        help="the dense side: same (default: catprune's dense path in each CAT mode, as in stored runs), or the "
        "stock transformer (catprune not applied) as eager, compile, compile:max-autotune-no-cudagraphs, "
        "compile:reduce-overhead or cudagraph; best times each available one briefly and keeps the fastest "
        "(all candidates' ms/step and the winner go into the table and JSON)",
    )
    p.add_argument(
        "--dense-candidates",
        type=_list(str),
        default=None,
        help="with --dense-baseline best: the configurations to time, e.g. eager,compile,cudagraph (default: all; "
        "compile:max-autotune-no-cudagraphs costs minutes of autotuning on a full-size model)",
    )
    p.add_argument(
        "--split",
        action="store_true",
        help="also time catprune's full-selection step (every token selected): splits the speed-up into "
        "implementation (stock step vs full-selection step) and pruning (full-selection step vs pruned step)",
    )
    p.add_argument(
        "--compile-vae",
        nargs="?",
        const="default",
        default=None,
        choices=["default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"],
        help="torch.compile the VAE decode (the same compiled decode in the dense and the CAT end-to-end time); "
        "optional mode, default torch.compile's default",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write results with an environment block to this JSON file")
    p.set_defaults(func=cmd_bench)
