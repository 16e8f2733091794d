"""``catprune generate --speedup X``: let `catprune.plan` choose the steps and the CAT configuration.

``--speedup`` chooses ``--keep-ratio``, ``--start-step`` and possibly fewer ``--steps`` (which becomes the reference
step count of the dense run the speed-up is measured against). Giving ``--keep-ratio`` or ``--start-step`` with
values other than their defaults together with ``--speedup`` is an error, as are ``--dense``, ``--compare`` and
``--prompts``; ``--backend`` is planned for (its measured step times, when the tables have them).
"""

from __future__ import annotations

import dataclasses

from .options import CLIError


def check_speedup_flags(args) -> None:
    """Refuse flag combinations ``--speedup`` cannot honour (before the model loads)."""
    if getattr(args, "speedup", None) is None:
        return
    from catprune import CATConfig

    default = CATConfig()
    clashes = [
        flag
        for flag, given in (
            ("--keep-ratio", args.keep_ratio != default.keep_ratio),
            ("--start-step", args.start_step != default.start_step),
            ("--selection", args.selection != default.selection.value),
            ("--context", args.context != default.context.value),
            ("--final-dense-steps", args.final_dense_steps != default.final_dense_steps),
            ("--dense", args.dense),
            ("--compare", args.compare),
            ("--prompts", args.prompts is not None),
        )
        if given
    ]
    if clashes:
        raise CLIError(
            f"--speedup: chooses the steps and the CAT configuration itself, so it cannot be combined with "
            f"{', '.join(clashes)}; got --speedup {args.speedup:g}. Drop --speedup to set them yourself, or drop "
            f"{', '.join(clashes)}."
        )


def planned_config(pipe, args, device: str, config, reason):
    """With ``--speedup``: print what the planner chose and why, set ``args.steps`` (and ``args.dense`` for a plan
    of plain fewer steps), and return (config, None, {"plan": report}); without it (config, reason, {}) unchanged."""
    if getattr(args, "speedup", None) is None:
        return config, reason, {}
    import catprune

    try:
        plan = catprune.plan(
            pipe,
            args.speedup,
            num_inference_steps=args.steps,
            height=args.height,
            width=args.width,
            device=device,
            backend=args.backend,
        )
    except ValueError as exc:
        raise CLIError(f"--speedup: {exc}") from None
    print(plan.summary())
    args.steps = plan.num_inference_steps
    if plan.config is None:
        args.dense = True
    else:
        config = dataclasses.replace(plan.config, seed=args.seed)
    quality = plan.expected_quality
    report = {
        "requested_speedup": plan.requested_speedup,
        "reference_steps": plan.reference_steps,
        "num_inference_steps": plan.num_inference_steps,
        "config": None if plan.config is None else config.to_dict(),
        "macs_ratio": plan.macs_ratio,
        "predicted_speedup": plan.predicted_speedup,
        "expected_psnr_db": None if quality is None else quality.psnr_db,
        "quality_source": None if quality is None else quality.source,
        "time_source": plan.time_source,
        "reason": plan.reason,
    }
    return config, None, {"plan": report}  # a plan prunes (or is dense with fewer steps): nothing to warn about
