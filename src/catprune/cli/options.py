"""Shared option parsing of the ``catprune`` subcommands: value validators for argparse ``type=`` (argparse puts
the flag's name in front of their message), the one dtype table, device checks, the output path check, and the
mapping of `CATConfig` field names to the flags that set them.

Example:
    >>> positive_int("28"), seed("0"), dtype_name("bf16")
    (28, 0, 'bfloat16')
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

#: every dtype spelling the subcommands accept -> the torch dtype's name
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
DTYPE_HELP = "float32 (fp32), bfloat16 (bf16) or float16 (fp16)"

#: image file extensions the output of ``generate`` may have (written by Pillow)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value


class CLIError(Exception):
    """A user error found by a subcommand: printed as one line, exit status 2."""


def _int(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An int >= 1 (steps, sizes, batch sizes, repeats)."""
    value = _int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0."""
    value = _int(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def seed(text: str) -> int:
    """A generator seed in [0, 2**63 - 1]."""
    value = _int(text, "an integer seed in [0, 2**63 - 1]")
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"expected an integer seed in [0, 2**63 - 1] (torch generators take 64-bit seeds), got {text!r}"
        )
    return value


def finite_float(text: str) -> float:
    """A finite float (no nan / inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def ratio(text: str) -> float:
    """A finite float in (0, 1]."""
    value = finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"expected a number in (0, 1] (1 disables pruning; e.g. 0.3 keeps 30% of the tokens), got {text!r}"
        )
    return value


def dtype_name(text: str) -> str:
    """One of `DTYPES`' spellings -> the torch dtype's name."""
    name = DTYPES.get(text.lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"expected {DTYPE_HELP}, got {text!r}")
    return name


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def resolve_device(name: str, flag: str = "--device") -> str:
    """``auto`` -> cuda when available else cpu; anything else is checked against this torch build (CLIError)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    fix = f"Use {flag} cpu, {flag} cuda, {flag} cuda:1, ... (or {flag} auto)."
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"{flag}: expected a torch device such as cpu or cuda, got {name!r}. {fix}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(
                f"{flag}: got {name!r}, but this torch build sees no CUDA device (torch {torch.__version__}, "
                f"CUDA {torch.version.cuda or 'not built'}). Use {flag} cpu, or install a CUDA build of torch."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(
                f"{flag}: got {name!r}, but only {torch.cuda.device_count()} CUDA device(s) are visible. "
                f"Use an index below {torch.cuda.device_count()}."
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"{flag}: got {name!r}, but MPS is not available here. {fix}")
    elif device.type != "cpu":
        raise CLIError(f"{flag}: expected cpu, cuda[:N], mps or auto, got {name!r}. {fix}")
    return name


def check_output_file(path: str, flag: str = "--out") -> Path:
    """An image path that can be written: an image extension, not a directory, under a writable directory.

    Checked before any work starts, so a bad path fails in a second instead of after the generation.
    """
    out = Path(path)
    if out.is_dir():
        raise CLIError(f"{flag}: {path!r} is a directory. Give a file name, e.g. {flag} {out / 'image.png'}.")
    from PIL import Image

    writable = [s for s in IMAGE_SUFFIXES if s in Image.registered_extensions()]  # this Pillow's formats
    if out.suffix.lower() not in writable:
        raise CLIError(
            f"{flag}: expected an image file name ending in {', '.join(writable)}, got {path!r}. "
            f"Use e.g. {flag} {out.with_suffix('.png') if out.name else 'outputs/image.png'}."
        )
    parent = out.parent
    while not parent.exists():  # the first existing ancestor decides whether the folders can be created
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(
            f"{flag}: cannot create {path!r}: {str(parent)!r} is a file, not a directory. Choose another path."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{flag}: cannot write under {str(parent)!r} (permission denied). Choose another path.")
    return out


def config_error(exc: Exception, flags: dict[str, str]) -> str:
    """An error message from `CATConfig` / `catprune.apply` with ``CATConfig.field`` replaced by the flag that sets
    it (``flags``: field -> flag), so that it names what the user typed.

    Example:
        >>> config_error(ValueError("CATConfig.seed: expected an int >= 0, got -1"), {"seed": "--seed"})
        '--seed: expected an int >= 0, got -1'
    """

    def flag(match: re.Match) -> str:
        return flags.get(match.group(1), match.group(0))

    message = re.sub(r"CATConfig\.(\w+)", flag, str(exc))
    for field, name in flags.items():  # "Pass e.g. seed=0." -> "Pass e.g. --seed 0."
        message = re.sub(rf"\b{field}=", f"{name} ", message)
    return message


def selection_name(text: str) -> str:
    """``--selection`` (``generate`` and ``bench``): a `catprune.Selection` value."""
    from catprune.config import Selection

    choices = [s.value for s in Selection]
    if text.strip().lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
    return text.strip().lower()


#: CATConfig fields of `add_rule_options` -> their flags (config errors name the flag)
RULE_FLAGS = {"selection": "--selection", "context": "--context", "final_dense_steps": "--final-dense-steps"}


def add_rule_options(p: argparse.ArgumentParser) -> None:
    """``--selection``, ``--context`` and ``--final-dense-steps`` of ``generate``: one value each (the CATConfig
    fields of those names)."""
    from catprune.config import Context, Selection

    p.add_argument(
        "--selection",
        type=selection_name,
        default=Selection.CAT.value,
        help="which tokens a pruned step recomputes: cat (the paper's rule), drift (catprune's: the largest predicted "
        "drift of a reused output; use with --context extrapolate), or an ablation / baseline rule",
    )
    p.add_argument(
        "--context",
        choices=[c.value for c in Context],
        default=Context.REUSE.value,
        help="what the recomputed tokens attend to for the others: reuse (their last keys / values, the paper's) or "
        "extrapolate (a per-token forecast of them)",
    )
    p.add_argument(
        "--final-dense-steps",
        type=non_negative_int,
        default=0,
        help="the last n steps run dense (every token recomputed)",
    )
