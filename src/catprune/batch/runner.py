"""`run_batch`: generate every item of a prompt file into a directory, resumably, over any number of processes.

Files in the output directory:

- ``run.json``: the run's settings and their fingerprint, written (atomically) before the first image. A later run
  with other settings refuses the directory unless ``overwrite``.
- ``<id>.png`` and ``<id>.json`` per item: the image and its sidecar (prompt, id, seed, model, catprune config or
  ``"dense"``, steps, tokens computed, MACs, seconds, and the run fingerprint).
- ``manifest.json``: settings, counts, throughput and MACs saved, rewritten every ``manifest_every`` images and at
  the end.

An item is done when its sidecar parses and matches the item and the run settings and its image decodes; anything
else is generated again. Batches are fixed by the prompt file (see `catprune.batch.plan`), so a resumed or
re-sharded run writes the same bytes as an uninterrupted one-process run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..evaluation.machine import cuda_sync
from ..evaluation.settings import set_call_kwargs
from ..models import DEFAULT_MODEL
from .dist import DistContext
from .io import atomic_write_bytes, atomic_write_json, encode_png
from .outdir import FORMAT, expected_fields, item_done, prepare_directory
from .plan import Batch, make_batches, shard
from .progress import Progress, format_seconds
from .prompts import Item, read_prompts

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16"}
#: settings that change the images: a directory holds the outputs of one combination of them
FINGERPRINT_KEYS = ("model", "catprune", "steps", "guidance_scale", "height", "width", "dtype", "seed", "batch_size")


#: the `CATConfig` fields a run sets from its flags of the same names (`generate`'s single image does the same)
CONFIG_FIELDS = ("keep_ratio", "start_step", "selection", "context", "final_dense_steps", "seed")


@dataclass
class BatchOptions:
    """The settings of a batch run (the ``catprune generate --prompts`` flags). ``model`` defaults to the embedded
    ``scenes`` model (`catprune.models.DEFAULT_MODEL`); ``model="shapes"`` is the fast embedded one.

    Example:
        >>> options = BatchOptions(prompts="prompts.txt", out="out", steps=4, start_step=2, keep_ratio=0.5)
        >>> options.settings()["catprune"]["keep_ratio"], BatchOptions("p.txt", "o", dense=True).settings()["catprune"]
        (0.5, 'dense')
        >>> options.model, BatchOptions("p.txt", "o", model="shapes").settings()["model"]
        ('scenes', 'shapes')
    """

    prompts: str
    out: str
    model: str = DEFAULT_MODEL
    steps: int = 28
    keep_ratio: float = 0.3
    start_step: int = 8
    selection: str = "cat"
    context: str = "reuse"
    final_dense_steps: int = 0
    seed: int = 0
    height: int | None = None
    width: int | None = None
    batch_size: int = 1
    guidance_scale: float | None = None
    dense: bool = False
    device: str = "auto"
    dtype: str = "float32"
    backend: str | None = None
    manifest_every: int = 100
    on_error: str = "stop"
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        def check_int(flag, value, low, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{flag}: expected an int >= {low}, got {value!r}.")

        check_int("--steps", self.steps, 1)
        check_int("--batch-size", self.batch_size, 1)
        check_int("--manifest-every", self.manifest_every, 1)
        check_int("--seed", self.seed, 0)
        check_int("--height", self.height, 8, allow_none=True)
        check_int("--width", self.width, 8, allow_none=True)
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {self.dtype!r}.")
        if self.on_error not in ("stop", "skip"):
            raise ValueError(f"--on-error: expected 'stop' or 'skip', got {self.on_error!r}.")
        if Path(self.out).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            raise ValueError(
                f"--out: expected an output directory with --prompts, got {self.out!r} (an image file name). "
                "Pass e.g. --out images/."
            )
        self.cat_config()  # CATConfig validates keep ratio, start step and backend

    def cat_config(self):
        """The CATConfig of the run, or None for ``dense``."""
        if self.dense:
            return None
        import catprune

        extra = {"backend": self.backend} if self.backend is not None else {}
        return catprune.CATConfig(**{name: getattr(self, name) for name in CONFIG_FIELDS}, **extra)

    def settings(self) -> dict:
        """The settings that decide the images (JSON-serialisable); their hash is the run fingerprint."""
        config = self.cat_config()
        return {
            "model": self.model,
            "catprune": "dense" if config is None else config.to_dict(),
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "dtype": DTYPES[self.dtype],
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def fingerprint(self) -> str:
        return fingerprint(self.settings())


def fingerprint(settings: dict) -> str:
    """A short stable hash of ``settings``.

    Example:
        >>> fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
        True
    """
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- generation
def _dtype(name: str) -> torch.dtype:
    return getattr(torch, DTYPES[name])


def _generate(pipe, encode, batch: Batch, options: BatchOptions, device) -> tuple[list, float]:
    """One pipeline call for ``batch``: PIL images (one per item) and the seconds it took."""
    generators = [torch.Generator(device="cpu").manual_seed(item.seed) for item in batch.items]  # one per image
    kwargs = encode([item.prompt for item in batch.items], batch.negative_prompt)
    kwargs.update(num_inference_steps=batch.steps, generator=generators, output_type="pil")
    kwargs.update(set_call_kwargs(guidance_scale=batch.guidance_scale, height=options.height, width=options.width))
    cuda_sync(device)
    start = time.perf_counter()
    try:
        images = pipe(**kwargs).images
    except (ValueError, TypeError) as exc:  # the pipeline refused an input: say which lines
        lines = ", ".join(str(item.line) for item in batch.items)
        raise type(exc)(
            f"--prompts {options.prompts}, line(s) {lines}: the model refused the batch ({exc}). Fix or remove the "
            "line(s) and re-run the same command: finished images are kept."
        ) from exc
    cuda_sync(device)
    seconds = time.perf_counter() - start
    if len(images) != len(batch.items):
        raise RuntimeError(f"the pipeline returned {len(images)} images for {len(batch.items)} prompts.")
    return images, seconds


def _batch_stats(pipe, dense: bool, n: int) -> dict:
    """Per-image accounting of the last pipeline call (CFG rows included in the MACs)."""
    if dense:
        return {"tokens_computed": None, "tokens_dense": None, "macs": None, "macs_dense": None, "macs_ratio": 1.0}
    import catprune

    stats = catprune.stats(pipe)
    return {
        "tokens_computed": sum(s.computed for s in stats.steps),  # image tokens recomputed, summed over steps
        "tokens_dense": sum(s.tokens for s in stats.steps),
        "macs": stats.macs / n,
        "macs_dense": stats.macs_dense / n,
        "macs_ratio": stats.macs_ratio,
    }


def _write_item(out: Path, item: Item, batch: Batch, image, record: dict, written_before: int) -> None:
    """Image then sidecar, each atomically; an OSError says what is intact and how to resume."""
    png = out / f"{item.id}.png"
    try:
        atomic_write_bytes(png, encode_png(image))
        atomic_write_json(out / f"{item.id}.json", record)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OSError(
            exc.errno,
            f"--out: could not write {png.parent / item.id}.* for line {item.line} of the prompt file ({reason}). "
            f"Nothing partial was left; the {written_before} image(s) written before by this process are intact. "
            "Free space or fix the directory, then re-run the same command to resume.",
        ) from exc


@dataclass
class RunSummary:
    """What a run did, over all ranks."""

    items: int  # items in the prompt file
    done: int  # items finished in the directory at the end
    generated: int  # images written by this run
    skipped: int  # items already finished before this run started
    wall_s: float
    images_per_s: float
    macs: float  # MACs spent on the generated images (0 for dense)
    macs_dense: float  # MACs the dense model would have spent on them
    world_size: int

    @property
    def macs_saved(self) -> float:
        """Fraction of MACs saved against dense (0 for a dense run)."""
        return 1.0 - self.macs / self.macs_dense if self.macs_dense else 0.0

    def line(self, out) -> str:
        return (
            f"catprune generate: {self.done}/{self.items} images in {out} ({self.generated} generated, {self.skipped} "
            f"already done), {format_seconds(self.wall_s)} wall, {self.images_per_s:.2f} img/s over "
            f"{self.world_size} process(es), MACs saved {100 * self.macs_saved:.1f}%"
        )


def _manifest(options, run_fp, items, summary: RunSummary, finished: bool) -> dict:
    return {
        "format": FORMAT,
        "fingerprint": run_fp,
        "settings": options.settings(),
        "prompts": str(options.prompts),
        "finished": finished,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "world_size": summary.world_size,
        "counts": {
            "items": summary.items,
            "done": summary.done,
            "pending": summary.items - summary.done,
            "generated": summary.generated,
            "skipped_already_done": summary.skipped,
        },
        "wall_s": summary.wall_s,
        "images_per_s": summary.images_per_s,
        "macs": {"spent": summary.macs, "dense": summary.macs_dense, "saved_fraction": summary.macs_saved},
    }


def run_batch(options: BatchOptions, ctx: DistContext | None = None, stream=None) -> RunSummary:
    """Generate every item of ``options.prompts`` into ``options.out`` (this process's share when launched by
    torchrun / accelerate launch). Returns the run summary (over all ranks).

    Example:
        >>> summary = run_batch(BatchOptions("prompts.txt", "images", steps=4, start_step=2))  # doctest: +SKIP
        >>> summary.generated + summary.skipped == summary.items  # doctest: +SKIP
        True
    """
    stream = stream or sys.stderr
    options.validate()
    ctx = ctx or DistContext.from_env()
    device = ctx.resolve_device(options.device)
    ctx.init()
    try:
        return _run(options, ctx, device, stream)
    finally:
        ctx.close()


def _checked_items(options: BatchOptions, ctx: DistContext) -> list[Item]:
    """The prompt file's items, read and the directory prepared by rank 0 before anything is loaded; the other ranks
    get its items (so only rank 0 needs to read the prompt file) or its verdict, and stop too on an error."""
    error = None
    items: list[Item] = []
    if ctx.is_main:
        try:
            items = read_prompts(options.prompts, options.seed, options.on_error)
            prepare_directory(options)
        except (ValueError, TypeError, OSError) as exc:
            error = exc
    verdict, items = ctx.broadcast((None, items) if error is None else (str(error), []))
    if error is not None:
        raise error
    if verdict is not None:  # the other ranks stop too, naming rank 0's reason
        raise ValueError(f"rank {ctx.rank}: rank 0 stopped the run: {verdict}")
    return items


def _done_ids(out: Path, items: list[Item], batches: list[Batch], ctx: DistContext, run_fp: str) -> set[str]:
    """The ids already finished in ``out``: each rank checks a share of the items, everyone gets the union."""
    batch_of = {item.id: batch for batch in batches for item in batch.items}
    mine = [item.id for item in items[ctx.rank :: ctx.world_size] if item_done(out, item, batch_of[item.id], run_fp)]
    return {item_id for share in ctx.all_gather(mine) for item_id in share}


def _load_model(options: BatchOptions, device, config):
    """The pipeline and prompt encoder of ``options.model`` on ``device``, CAT Pruning applied unless dense."""
    from .models import load_generation_model

    pipe, encode = load_generation_model(options.model, device, _dtype(options.dtype))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if config is not None:
        import catprune

        catprune.apply(pipe, config)
    return pipe, encode


@dataclass
class _Writer:
    """Writes this process's images and sidecars and counts them (this process only; summed over ranks by the
    caller)."""

    out: Path
    run_fp: str
    model: str
    config_record: dict | str
    done_ids: set[str]
    generated: int = 0
    macs: float = 0.0
    macs_dense: float = 0.0

    def counts(self) -> list:
        return [self.generated, self.macs, self.macs_dense]

    def write(self, batch: Batch, images: list, seconds: float, accounting: dict, on_image=None) -> None:
        """The batch's images not finished before, each with its sidecar; ``on_image()`` after each one written."""
        for item, image in zip(batch.items, images, strict=True):
            if item.id in self.done_ids:
                continue  # finished by an earlier run; regenerated only because its batch was incomplete
            record = {
                "format": FORMAT,
                "fingerprint": self.run_fp,
                **expected_fields(item, batch),
                "line": item.line,
                "model": self.model,
                "catprune": self.config_record,
                "width": image.width,
                "height": image.height,
                "batch_index": batch.index,
                "batch_size": len(batch.items),
                "batch_seconds": seconds,
                "seconds": seconds / len(batch.items),
                **accounting,
            }
            _write_item(self.out, item, batch, image, record, self.generated)
            self.generated += 1
            if accounting["macs"] is not None:
                self.macs += accounting["macs"]
                self.macs_dense += accounting["macs_dense"]
            if on_image is not None:
                on_image()


def _summary(totals, n_items: int, skipped: int, start: float, world_size: int) -> RunSummary:
    """The run summary from the counts summed over the ranks (generated, MACs, dense MACs)."""
    wall = time.perf_counter() - start
    generated = int(totals[0])
    return RunSummary(
        items=n_items,
        done=skipped + generated,
        generated=generated,
        skipped=skipped,
        wall_s=wall,
        images_per_s=generated / wall if wall > 0 else 0.0,
        macs=totals[1],
        macs_dense=totals[2],
        world_size=world_size,
    )


def _run(options: BatchOptions, ctx: DistContext, device, stream) -> RunSummary:
    start = time.perf_counter()
    run_fp = options.fingerprint()
    # 1. inputs and directory, checked by rank 0; 2. what is already done, checked by all ranks
    items = _checked_items(options, ctx)
    out = Path(options.out)
    batches = make_batches(items, options.batch_size, options.steps, options.guidance_scale)
    done_ids = _done_ids(out, items, batches, ctx, run_fp)
    pending = [b for b in batches if any(item.id not in done_ids for item in b.items)]
    to_write = sum(item.id not in done_ids for b in pending for item in b.items)

    # 3. the model, only when this rank has something to do
    config = options.cat_config()
    rounds = shard(pending, ctx.rank, ctx.world_size)  # this rank's batch (or None) in each round
    pipe = encode = None
    if any(batch is not None for batch in rounds):  # a rank with nothing to do never loads the model
        pipe, encode = _load_model(options, device, config)

    # 4. rounds of one batch per rank; counts summed over the ranks when a manifest is due and at the end
    progress = Progress(to_write, enabled=ctx.is_main and options.progress and to_write > 0, stream=stream)
    writer = _Writer(out, run_fp, options.model, "dense" if config is None else config.to_dict(), done_ids)
    planned = 0  # images the whole run should have written after the current round
    next_manifest = options.manifest_every
    on_image = None if ctx.distributed else (lambda: progress.update(1))  # distributed: counted per round below

    def summary(totals) -> RunSummary:
        return _summary(totals, len(items), len(done_ids), start, ctx.world_size)

    try:
        for round_index, batch in enumerate(rounds):
            round_batches = pending[round_index * ctx.world_size : (round_index + 1) * ctx.world_size]
            planned += sum(item.id not in done_ids for b in round_batches for item in b.items)
            if batch is not None:
                images, seconds = _generate(pipe, encode, batch, options, device)
                accounting = _batch_stats(pipe, config is None, len(batch.items))
                writer.write(batch, images, seconds, accounting, on_image)
                if ctx.distributed:
                    progress.update(sum(i.id not in done_ids for i in batch.items) * ctx.world_size)
            if planned >= next_manifest and planned < to_write:  # every rank reaches this at the same round
                while next_manifest <= planned:
                    next_manifest += options.manifest_every
                totals = ctx.sum(writer.counts())
                progress.set(int(totals[0]))
                if ctx.is_main:
                    atomic_write_json(out / "manifest.json", _manifest(options, run_fp, items, summary(totals), False))
        totals = ctx.sum(writer.counts())
        progress.set(int(totals[0]))
        ctx.barrier()
    finally:
        progress.close()
    result = summary(totals)
    if ctx.is_main:
        atomic_write_json(out / "manifest.json", _manifest(options, run_fp, items, result, True))
        print(result.line(out), file=stream, flush=True)
    return result


__all__ = ["BatchOptions", "RunSummary", "fingerprint", "item_done", "prepare_directory", "run_batch"]
