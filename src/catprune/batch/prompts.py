"""Prompt files: plain text (one prompt per line) or JSONL (one object per line), parsed into `Item` records.

Every problem names the file, the line and the ``--prompts`` flag. A text file's blank lines are skipped; a JSONL
file is recognised by its ``.jsonl`` / ``.ndjson`` suffix.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

#: the fields a JSONL line may carry; anything else is refused (a typo such as "sead" must not pass silently)
JSONL_FIELDS = ("prompt", "id", "seed", "negative_prompt", "num_inference_steps", "guidance_scale")
#: ids become file names: letters, digits, ".", "_" and "-", not starting with "." or "-"
ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
#: names the output directory uses for itself, so not usable as item ids
RESERVED_IDS = ("run", "manifest")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Item:
    """One image to generate. ``None`` fields take the run's value (``--steps``, ``--guidance-scale``).

    Example:
        >>> Item(index=0, line=1, id="000001", prompt="a red circle", seed=7).settings_key(28, None)
        (28, None, None)
    """

    index: int  # position among the file's items (0-based)
    line: int  # 1-based line number in the prompt file
    id: str  # file stem of the outputs: <id>.png and <id>.json
    prompt: str
    seed: int
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None

    def settings_key(self, steps: int, guidance_scale: float | None) -> tuple:
        """What a pipeline call shares: items with different keys never share a batch."""
        return (
            self.num_inference_steps if self.num_inference_steps is not None else steps,
            self.guidance_scale if self.guidance_scale is not None else guidance_scale,
            self.negative_prompt,
        )


def derive_seed(base_seed: int, item_id: str) -> int:
    """The seed of an item without an explicit ``seed``: a hash of the run's ``--seed`` and the item's id.

    It never depends on the rank, the number of processes or the batch, so an image is the same however the run is
    split; changing ``--seed`` gives a new, equally reproducible set.

    Example:
        >>> derive_seed(0, "000001") == derive_seed(0, "000001") != derive_seed(1, "000001")
        True
    """
    digest = hashlib.sha256(f"{int(base_seed)}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def default_id(line: int) -> str:
    """The id of an item that names none: its 1-based line number, zero-padded (``000001`` is the first line)."""
    return f"{line:06d}"


class PromptFileError(ValueError):
    """A problem with the prompt file, naming the file and the line."""


def _where(path: Path, line: int | None = None) -> str:
    return f"--prompts {path}" + (f", line {line}" if line is not None else "")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_record(record, path: Path, line: int) -> dict:
    """Validate one JSONL object; PromptFileError naming the line otherwise."""

    def fail(field, expected, got, fix):
        raise PromptFileError(f"{_where(path, line)}: {field}: expected {expected}, got {got!r}. {fix}")

    if not isinstance(record, dict):
        fail("line", 'a JSON object such as {"prompt": "a red circle"}', record, "Write one object per line.")
    unknown = sorted(set(record) - set(JSONL_FIELDS))
    if unknown:
        fail("field", f"one of {list(JSONL_FIELDS)}", unknown[0], "Remove or rename the field (typo?).")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        fail("prompt", "a non-empty string", prompt, 'Every line needs a "prompt".')
    out = {"prompt": prompt}
    if "id" in record:
        value = record["id"]
        if _is_int(value) and value >= 0:
            value = str(value)
        if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
            fail(
                "id",
                "a non-negative int or a string of letters, digits, '.', '_', '-' (at most 128, not starting "
                "with '.' or '-'), as it names the output files",
                record["id"],
                'Use e.g. "id": "coco-000139".',
            )
        if value in RESERVED_IDS:
            fail("id", f"an id other than {list(RESERVED_IDS)} (the run's own files)", value, "Rename the item.")
        out["id"] = value
    if "seed" in record:
        value = record["seed"]
        if not _is_int(value) or not 0 <= value <= MAX_SEED:
            fail("seed", f"an int in [0, {MAX_SEED}]", value, 'Use e.g. "seed": 42, or leave it out.')
        out["seed"] = value
    if "negative_prompt" in record and record["negative_prompt"] is not None:
        if not isinstance(record["negative_prompt"], str):
            fail("negative_prompt", "a string", record["negative_prompt"], 'Use e.g. "negative_prompt": "blurry".')
        out["negative_prompt"] = record["negative_prompt"]
    if "num_inference_steps" in record and record["num_inference_steps"] is not None:
        value = record["num_inference_steps"]
        if not _is_int(value) or value < 1:
            fail("num_inference_steps", "an int >= 1", value, 'Use e.g. "num_inference_steps": 28.')
        out["num_inference_steps"] = value
    if "guidance_scale" in record and record["guidance_scale"] is not None:
        value = record["guidance_scale"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail("guidance_scale", "a finite number", value, 'Use e.g. "guidance_scale": 7.0.')
        out["guidance_scale"] = float(value)
    return out


def _read_text(path: Path) -> str:
    """The prompt file's text; FileNotFoundError or PromptFileError naming ``--prompts`` otherwise."""
    if not path.exists():
        raise FileNotFoundError(f"--prompts: expected an existing prompt file, got {str(path)!r} (no such file).")
    if not path.is_file():
        raise PromptFileError(f"--prompts: expected a prompt file, got {str(path)!r} (a directory?).")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{_where(path)}: expected UTF-8 text ({exc}). Re-save the file as UTF-8.") from exc


def _line_fields(raw: str, path: Path, line_number: int, on_error: str, warn) -> dict | None:
    """The fields of one JSONL line, or None when it is malformed and ``on_error`` is ``"skip"`` (reported through
    ``warn``); with ``"stop"`` a malformed line raises PromptFileError."""
    try:
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PromptFileError(
                f"{_where(path, line_number)}: malformed JSON ({exc.msg} at column {exc.colno}). Expected one "
                'object per line, e.g. {"prompt": "a red circle", "id": "a1"}.'
            ) from exc
        return _parse_record(record, path, line_number)
    except PromptFileError as exc:
        if on_error == "stop":
            raise PromptFileError(f"{exc} (or pass --on-error skip to skip such lines)") from exc
        warn(f"catprune generate: skipping {exc}")
        return None


def read_prompts(path, base_seed: int = 0, on_error: str = "stop", warn=None) -> list[Item]:
    """Read a prompt file into items (ids unique, seeds set).

    Args:
        path: a text file (one prompt per line, blank lines skipped) or a ``.jsonl`` / ``.ndjson`` file with one
            object per line: ``prompt`` and optionally ``id``, ``seed``, ``negative_prompt``,
            ``num_inference_steps``, ``guidance_scale``.
        base_seed: the run's ``--seed``; an item without ``seed`` gets ``derive_seed(base_seed, id)``.
        on_error: ``"stop"`` raises on the first malformed JSONL line; ``"skip"`` reports it through ``warn`` and
            goes on (an item that is skipped keeps no id, the others keep theirs: ids come from line numbers).
        warn: callable taking one message (default: print to stderr).

    Raises:
        FileNotFoundError: the file does not exist. PromptFileError (a ValueError): the file holds no prompt, a line
        is malformed (with ``on_error="stop"``), or two items share an id.

    Example:
        >>> import tempfile, os
        >>> with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        ...     _ = f.write("a red circle\\n\\na blue square\\n")
        >>> [(i.id, i.prompt) for i in read_prompts(f.name)]
        [('000001', 'a red circle'), ('000003', 'a blue square')]
        >>> os.unlink(f.name)
    """
    if on_error not in ("stop", "skip"):
        raise ValueError(f"--on-error: expected 'stop' or 'skip', got {on_error!r}.")
    warn = warn or (lambda message: print(message, file=sys.stderr))
    path = Path(path)
    text = _read_text(path)
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    items: list[Item] = []
    seen: dict[str, int] = {}
    for line_number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        fields = _line_fields(raw, path, line_number, on_error, warn) if jsonl else {"prompt": raw.strip()}
        if fields is None:
            continue
        item_id = fields.get("id", default_id(line_number))
        if item_id in seen:
            raise PromptFileError(
                f"{_where(path, line_number)}: id: expected ids unique in the file, got {item_id!r} again (first on "
                f'line {seen[item_id]}). Give each line its own "id" (outputs are named <id>.png).'
            )
        seen[item_id] = line_number
        items.append(
            Item(
                index=len(items),
                line=line_number,
                id=item_id,
                prompt=fields["prompt"],
                seed=fields.get("seed", derive_seed(base_seed, item_id)),
                negative_prompt=fields.get("negative_prompt"),
                num_inference_steps=fields.get("num_inference_steps"),
                guidance_scale=fields.get("guidance_scale"),
            )
        )
    if not items:
        raise PromptFileError(
            f"{_where(path)}: expected at least one prompt, got an empty file"
            + (" (every line was skipped as malformed)" if jsonl and text.strip() else "")
            + ". Write one prompt per line (or one JSON object per line in a .jsonl file)."
        )
    return items
