"""``catprune generate --prompts FILE --out DIR``: the batch mode of ``generate`` (see `catprune.batch`).

Every per-image flag of ``generate`` (``--model``, ``--steps``, ``--keep-ratio``, ``--start-step``, ``--seed``,
``--guidance-scale``, ``--height``, ``--width``, ``--dense``, ``--device``, ``--dtype``, ``--backend`` when the
parser has it) applies to every item unless its JSONL line overrides it; ``--batch-size`` is the number of items
per pipeline call. Launch it under ``torchrun`` or ``accelerate launch`` to shard the items over processes.

Example:
    >>> from catprune.cli.main import main
    >>> main(["generate", "--prompts", "prompts.txt", "--out", "images", "--steps", "4"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

#: exit status of an interrupted run (128 + SIGINT, the shell convention)
EXIT_INTERRUPTED = 130


def add_batch_arguments(parser) -> None:
    """Add the batch-mode flags to the ``generate`` parser."""
    group = parser.add_argument_group("batch mode (--prompts)")
    group.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="prompt file: one prompt per line, or .jsonl with prompt and optional id, seed, negative_prompt, "
        "num_inference_steps, guidance_scale; --out is then a directory (resumable; torchrun shards it)",
    )
    group.add_argument(
        "--manifest-every", type=int, default=100, metavar="N", help="rewrite DIR/manifest.json every N images"
    )
    group.add_argument(
        "--on-error",
        choices=("stop", "skip"),
        default="stop",
        help="a malformed JSONL line: stop (default) or skip it with a warning",
    )
    group.add_argument(
        "--overwrite", action="store_true", help="replace the outputs of a run with other settings in --out"
    )
    group.add_argument("--no-progress", action="store_true", help="no run progress bar")


def options_from_args(args):
    """`BatchOptions` from the parsed ``generate`` flags; ValueError for flags that do not fit the batch mode."""
    from catprune.batch import BatchOptions

    if getattr(args, "prompt", None) is not None:
        raise ValueError(
            f"generate: expected either a prompt or --prompts FILE, got both (prompt {args.prompt!r} and --prompts "
            f"{args.prompts}). Put the prompt in the file, or drop --prompts."
        )
    if getattr(args, "compare", False):
        raise ValueError("--compare: expected a single prompt, got --prompts. Use --dense for a dense dataset.")
    return BatchOptions(
        prompts=args.prompts,
        out=args.out,
        model=args.model,
        steps=args.steps,
        keep_ratio=args.keep_ratio,
        start_step=args.start_step,
        selection=args.selection,
        context=args.context,
        final_dense_steps=args.final_dense_steps,
        seed=args.seed,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        guidance_scale=args.guidance_scale,
        dense=args.dense,
        device=args.device,
        dtype=args.dtype,
        backend=getattr(args, "backend", None),
        manifest_every=args.manifest_every,
        on_error=args.on_error,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def cmd_generate_batch(args) -> int:
    """Run the batch mode; 0 on success, 130 on Ctrl-C (errors propagate as ValueError / TypeError / OSError)."""
    if args.prompts is None:
        from catprune.models import EXAMPLE_CAPTIONS

        example = EXAMPLE_CAPTIONS.get(args.model, EXAMPLE_CAPTIONS["scenes"])
        raise ValueError(
            f"generate: expected a prompt (e.g. catprune generate {example!r}) or --prompts FILE, got neither."
        )
    if args.out is None:
        raise ValueError(
            "--out: expected the output directory of the batch run (e.g. --out images/), got nothing. "
            "With --prompts, --out names a directory."
        )
    from catprune.batch import DistContext, run_batch

    options = options_from_args(args)
    ctx = DistContext.from_env()
    try:
        summary = run_batch(options, ctx)
    except KeyboardInterrupt:
        if ctx.is_main:
            out = Path(options.out)
            count = len(list(out.glob("*.png"))) if out.is_dir() else 0
            print(
                f"catprune generate: interrupted; {count} complete image(s) in {out}, nothing partial was written. "
                "Re-run the same command to resume.",
                file=sys.stderr,
                flush=True,
            )
        return EXIT_INTERRUPTED
    if args.json and ctx.is_main:
        print(json.dumps({**asdict(summary), "macs_saved": summary.macs_saved, "out": options.out}, indent=2))
    return 0
