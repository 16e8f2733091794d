"""The generation phase: images, timings, MACs and token selections of every method, cached on disk (see
`catprune.evaluation.store` for the layout), so that an interrupted run resumes and scoring never generates.

Timing: the wall-clock of one pipeline call (text encoding, every denoising step, decoding) divided by the images
in the batch, CUDA synchronised before and after. Methods are interleaved batch by batch (batch 0 of every method,
then batch 1, ...) so that a slow-down of the machine touches every method alike, and every method runs one untimed
warm-up image first. Every phase reports progress through ``log``.

Example:
    >>> import tempfile
    >>> from catprune.models.shapes import build_random_shapes_pipeline
    >>> from catprune.evaluation.methods import parse_methods
    >>> pipe = build_random_shapes_pipeline(num_layers=1, attention_head_dim=8, num_attention_heads=2)
    >>> lines = []
    >>> settings = EvalSettings(model="shapes", num_prompts=1, steps=2)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = generate(settings, parse_methods("dense", 2), d, pipe=pipe, log=lines.append)  # before, after
    >>> [line.split(":")[0] for line in lines if "warm-up" in line]
    ['[eval] warm-up 1/1 dense-2', '[eval] warm-up 1/1 dense-2']
    >>> lines[-1].startswith("[eval] generate 1/1 dense-2 images 0-0")
    True
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import api
from . import registry
from .files import read_json, save_png, write_json, write_text
from .introspect import selection_counts, watch
from .machine import cuda_sync, environment
from .methods import Kind, Method
from .peers import DBCachePeer, PeerUnavailable
from .settings import EvalSettings, set_call_kwargs
from .store import MethodCache, load_counts, open_cache

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


def _call_pipe(pipe, prompts: list[str], seeds: list[int], steps: int, settings: EvalSettings, device) -> torch.Tensor:
    generators = [torch.Generator(device=torch.device(device)).manual_seed(s) for s in seeds]
    optional = set_call_kwargs(guidance_scale=settings.guidance_scale, height=settings.height, width=settings.width)
    kwargs = dict(num_inference_steps=steps, generator=generators, output_type="pt", **optional)
    images = pipe(prompts, **kwargs).images
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2)
    return images  # (n, 3, H, W) in [0, 1]


class _MethodRunner:
    """Puts a method on the pipeline for one call and takes it off again (nothing stays applied)."""

    def __init__(self, pipe, method: Method):
        self.pipe = pipe
        self.method = method
        self.peer = DBCachePeer(method.peer) if method.kind is Kind.PEER else None

    @contextlib.contextmanager
    def applied(self):
        if self.method.kind is Kind.CATPRUNE:
            api.apply(self.pipe, self.method.config)
            try:
                yield
            finally:
                api.remove(self.pipe)
        elif self.method.kind is Kind.PEER:
            self.peer.enable(self.pipe)
            try:
                yield
            finally:
                self.peer.disable()
        else:
            yield

    def run(self, prompts, seeds, settings, device, record_tokens: bool):
        """(images, seconds, record, token counts (n, M) or None, token grid) for one batch."""
        n = len(prompts)
        catprune_method = self.method.kind is Kind.CATPRUNE
        with watch(self.pipe, selections=record_tokens and catprune_method) as watched, self.applied():
            cuda_sync(device)
            start = time.perf_counter()
            images = _call_pipe(self.pipe, prompts, seeds, self.method.steps, settings, device)
            cuda_sync(device)
            seconds = time.perf_counter() - start
            dense_call = watched.dense_macs_per_call
            record = {"seconds": seconds, "transformer_calls": watched.calls, "dense_macs_per_call": dense_call}
            if catprune_method:
                selections = watched.step_selections()
                record.update(macs=watched.macs(), pruned_steps=sum(s is not None for s in selections))
            elif self.method.kind is Kind.PEER:
                record.update(self._peer_record(dense_call, watched.calls))
            elif dense_call is not None:
                record["macs"] = watched.macs()
        counts = None
        if record_tokens and catprune_method and watched.grid is not None:
            counts = selection_counts(watched.step_selections(), n, watched.grid[0] * watched.grid[1])
        return images.float().cpu(), seconds, record, counts, watched.grid

    def _peer_record(self, dense_call: int | None, calls: int) -> dict:
        peer_stats = self.peer.stats()
        record = {"peer": peer_stats}
        if dense_call is not None:
            blocks = len(self.pipe.transformer.transformer_blocks)
            cached = len(peer_stats["cached_steps"])
            share = min(1.0, peer_stats["computed_blocks_on_cached_steps"] / blocks)
            # estimate: a cached step runs only the Fn/Bn blocks (embedding and head MACs neglected)
            record["macs"] = int(dense_call * ((calls - cached) + cached * share))
            record["macs_estimated"] = True
        return record


class _Run:
    """The state of one generation phase: prompts, caches and runners of the methods still to run."""

    def __init__(self, settings: EvalSettings, out: Path, pipe, log: Log):
        self.settings, self.out, self.pipe, self.log = settings, out, pipe, log
        self.prompts = settings.prompts()
        self.caches: dict[str, MethodCache] = {}
        self.runners: dict[str, _MethodRunner] = {}
        self.todo: dict[str, list[int]] = {}
        self.starts = list(range(0, len(self.prompts), settings.batch_size))

    def open(self, methods: Sequence[Method], force: bool) -> None:
        for method in methods:
            cache = open_cache(self.out, method, self.settings.image_key(), force)
            runner = _MethodRunner(self.pipe, method)
            if method.kind is Kind.PEER:
                try:
                    runner.peer.check(self.pipe)
                except PeerUnavailable as exc:
                    self.log(f"[eval] {method.name}: skipped: {exc}")
                    cache.set_status(True, str(exc))
                    continue
            cache.set_status(False)
            self.caches[method.name] = cache
            self.runners[method.name] = runner
            self.todo[method.name] = [s for s in self.starts if s not in cache.done_starts()]

    def skip(self, name: str, exc: Exception) -> None:
        """A peer library failing on this model is reported, not fatal: the other methods still run."""
        reason = str(exc) if isinstance(exc, PeerUnavailable) else f"failed on this model: {type(exc).__name__}: {exc}"
        self.log(f"[eval] {name}: skipped: {reason}")
        self.caches[name].set_status(True, reason)
        self.runners.pop(name, None)
        self.todo[name] = []

    def warm_up(self) -> None:
        pending = [name for name in self.runners if self.todo[name]]
        for i, name in enumerate(pending, start=1):
            started = time.perf_counter()
            self.log(f"[eval] warm-up {i}/{len(pending)} {name}: one untimed image ...")
            try:
                self.runners[name].run(
                    self.prompts[:1], [self.settings.seed], self.settings, self.settings.device, False
                )
            except Exception as exc:
                if self.runners[name].method.kind is not Kind.PEER:
                    raise
                self.skip(name, exc)
                continue
            self.log(f"[eval] warm-up {i}/{len(pending)} {name}: done in {time.perf_counter() - started:.1f} s")

    def generate(self) -> None:
        token_counts = {name: load_counts(self.caches[name], len(self.prompts)) for name in self.caches}
        total = sum(len(v) for v in self.todo.values())
        done, started = 0, time.perf_counter()
        for start in self.starts:
            for name in list(self.runners):
                if start not in self.todo.get(name, []):
                    continue
                indices = list(range(start, min(start + self.settings.batch_size, len(self.prompts))))
                try:
                    images, seconds, record, counts, grid = self.runners[name].run(
                        [self.prompts[i] for i in indices],
                        [self.settings.seed + i for i in indices],
                        self.settings,
                        self.settings.device,
                        True,
                    )
                except Exception as exc:
                    if self.runners[name].method.kind is not Kind.PEER:
                        raise
                    self.skip(name, exc)
                    continue
                self._store(name, start, indices, images, record, counts, grid, token_counts[name])
                done += 1
                elapsed = time.perf_counter() - started
                self.log(
                    f"[eval] generate {done}/{total} {name} images {indices[0]}-{indices[-1]}: "
                    f"{seconds / len(indices):.3f} s/image (elapsed {elapsed / 60:.1f} min, "
                    f"eta {elapsed / done * (total - done) / 60:.1f} min)"
                )

    def _store(self, name, start, indices, images, record, counts, grid, tc) -> None:
        cache = self.caches[name]
        for i, image in zip(indices, images, strict=True):
            save_png(image, cache.image_path(i))
        if counts is not None:
            if tc["counts"] is None:
                tc["counts"] = np.zeros((len(self.prompts), counts.shape[1]), dtype=np.int16)
            tc["counts"][indices] = counts.numpy().astype(np.int16)
            tc["grid"] = grid
            cache.save_tokens(tc["counts"], grid)
        cache.record_batch(start, indices, record)


def generate(
    settings: EvalSettings,
    methods: Sequence[Method],
    out_dir: str | os.PathLike,
    pipe=None,
    force: bool = False,
    warmup: bool = True,
    log: Log = _print,
) -> Path:
    """Generation phase: images, timings and MACs of every method for every prompt, cached under ``out_dir``.

    Batches already in the cache (same method, same settings) are skipped, so an interrupted run resumes. A peer
    that cannot run here is recorded as skipped (``status.json``) with its reason.

    Args:
        settings: the `EvalSettings`.
        methods: the methods (see `catprune.evaluation.methods`); the reference ``dense-<steps>`` must be one.
        out_dir: the evaluation folder (use ``root / settings.folder_name()``).
        pipe: a ready pipeline (tests, notebooks); by default the model's loader (`catprune.evaluation.registry`).
        force: regenerate everything.
        warmup: run one untimed image per method before timing.
        log: where progress lines go.

    Returns:
        ``out_dir`` as a Path.

    Example:
        >>> from catprune.models.shapes import build_random_shapes_pipeline
        >>> from catprune.evaluation.methods import parse_methods
        >>> import tempfile
        >>> pipe = build_random_shapes_pipeline(num_layers=1, attention_head_dim=8, num_attention_heads=2)
        >>> settings = EvalSettings(model="shapes", num_prompts=2, steps=4, batch_size=2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     out = generate(settings, parse_methods("cat:0.5:2", 4), d, pipe=pipe, log=lambda s: None)
        ...     sorted(p.name for p in (out / "generation").iterdir())
        ['cat-a0.5-t2', 'dense-4']
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(methods)
    _check_methods(methods, settings)
    _check_folder(out, settings, force)
    device = settings.device
    settings.prompts()  # fail on a bad prompt setting before loading a model
    if pipe is None:
        log(f"[eval] loading the pipeline of {settings.model!r} on {device} ({settings.dtype}) ...")
        pipe = registry.load_pipeline(settings.model, device, getattr(torch, settings.dtype))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    run = _Run(settings, out, pipe, log)
    write_json(
        out / "settings.json",
        {"settings": settings.to_dict(), "image_key": settings.image_key(), "machine": environment(device)},
    )
    write_text(out / "prompts.txt", "\n".join(run.prompts) + "\n")
    run.open(methods, force)
    total = sum(len(v) for v in run.todo.values())
    log(
        f"[eval] {len(run.prompts)} prompts x {len(run.caches)} methods, {settings.steps} steps, batch "
        f"{settings.batch_size}, device {device}: {total} batches to generate -> {out}"
    )
    if warmup and total:
        run.warm_up()
    run.generate()
    return out


def _check_folder(out: Path, settings: EvalSettings, force: bool) -> None:
    stored = read_json(out / "settings.json")
    if stored is not None and stored.get("image_key") != settings.image_key() and not force:
        changed = sorted(
            k for k in settings.image_key() if stored.get("image_key", {}).get(k) != settings.image_key()[k]
        )
        raise ValueError(
            f"generate: out_dir: {out} holds images of other settings (differing: {', '.join(changed)}). Use another "
            "output folder, or pass force=True (--force) to regenerate."
        )


def _check_methods(methods: Sequence[Method], settings: EvalSettings) -> None:
    if not methods:
        raise ValueError(
            "generate: methods: expected at least one method, got none. Pass e.g. parse_methods('quick')."
        )
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"generate: methods: expected unique names, got {names}.")
    for m in methods:
        if m.kind is Kind.DENSE and m.steps > settings.steps:
            raise ValueError(
                f"generate: methods: {m.name} runs {m.steps} steps, more than the reference's {settings.steps}. "
                "Fewer-steps baselines must run at most settings.steps steps."
            )
        if m.kind is Kind.CATPRUNE and m.steps > settings.steps:
            raise ValueError(
                f"generate: methods: {m.name} runs {m.steps} steps, more than the reference's {settings.steps}. "
                "CAT methods run at most settings.steps steps (fewer: pruning combined with fewer steps)."
            )
        if m.kind is Kind.PEER and m.steps != settings.steps:
            raise ValueError(
                f"generate: methods: {m.name} runs {m.steps} steps; peer methods must run settings.steps "
                f"({settings.steps}). Build them with the evaluation's step count."
            )


__all__ = ["Log", "generate"]
