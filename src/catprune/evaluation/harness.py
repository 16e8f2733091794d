"""The evaluation harness: a generation phase that caches images, timings and MACs on disk, and a scoring phase
that reads only that cache (so scoring can be re-run, or extended with new metrics, without generating again).

Layout of an evaluation folder (named after the settings, see `EvalSettings.folder_name`)::

    settings.json                     the settings that produced the images
    generation/<method>/method.json   the method (its fingerprint keys the cache)
    generation/<method>/batches.json  per batch: images, wall-clock seconds, MACs, peer statistics
    generation/<method>/images/00017.png      image of prompt 17 (seed = settings.seed + 17)
    generation/<method>/tokens.npz    catprune methods: per image, how many steps computed each token
    scores.json                       per method, per image: PSNR, SSIM, adherence, ...
    results.json, results.csv, report.html, plots/, grids/, heatmaps/   (see `catprune.evaluation.report`)

Timing: the wall-clock of one pipeline call (text encoding, every denoising step, decoding) divided by the images
in the batch, CUDA synchronised before and after. Methods are interleaved batch by batch (batch 0 of every method,
then batch 1, ...) so that a slow-down of the machine touches every method alike, and every method runs one untimed
warm-up image first.

Example:
    >>> settings = EvalSettings(model="shapes", num_prompts=200, steps=28)
    >>> settings.folder_name()
    'shapes-p200-s28-seed0'
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import api
from .methods import Kind, Method, method_from_dict
from .peers import DBCachePeer, PeerUnavailable

#: Caption seed of the shapes model's held-out caption set (never seen in training, see the adherence module).
SHAPES_PROMPT_SEED = 20_000

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class EvalSettings:
    """What an evaluation generates: model, prompts, seeds, steps and how the pipeline is called.

    Fields:

    - ``model`` (str, default "shapes"): "shapes" (the embedded model) or a hub id / local pipeline folder.
    - ``num_prompts`` (int, default 200): prompts used (the first ``num_prompts`` of the prompt list).
    - ``prompt_seed`` (int, default 20000): seed of the shapes captions (``random_captions(n, prompt_seed)``; 20000
      is the held-out set of the shapes model). Ignored when ``prompts_file`` is given.
    - ``prompts_file`` (str or None): a text file with one prompt per line (required for hub models).
    - ``steps`` (int, default 28): denoising steps of the reference (dense) run.
    - ``seed`` (int, default 0): image ``j`` uses a generator seeded ``seed + j``, the same for every method.
    - ``guidance_scale`` (float or None): None uses the pipeline's default.
    - ``height``, ``width`` (int or None): None uses the pipeline's default.
    - ``batch_size`` (int, default 8): prompts per pipeline call (images do not depend on it up to float noise).
    - ``device`` (str, default "cpu"), ``dtype`` (str, default "float32").

    Example:
        >>> EvalSettings(num_prompts=20, steps=8, guidance_scale=4.0).folder_name()
        'shapes-p20-s8-seed0-g4'
    """

    model: str = "shapes"
    num_prompts: int = 200
    prompt_seed: int = SHAPES_PROMPT_SEED
    prompts_file: str | None = None
    steps: int = 28
    seed: int = 0
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self):
        def need(name, ok, expected, fix):
            if not ok:
                got = getattr(self, name)
                raise ValueError(f"EvalSettings.{name}: expected {expected}, got {got!r}. {fix}")

        for name in ("num_prompts", "steps", "batch_size"):
            value = getattr(self, name)
            need(name, isinstance(value, int) and not isinstance(value, bool) and value >= 1, "an int >= 1", "")
        need("seed", isinstance(self.seed, int) and self.seed >= 0, "an int >= 0", "Pass e.g. seed=0.")
        need(
            "guidance_scale",
            self.guidance_scale is None
            or (isinstance(self.guidance_scale, (int, float)) and self.guidance_scale >= 0),
            "None or a float >= 0",
            "Pass e.g. guidance_scale=4.0, or None for the pipeline's default.",
        )
        need("dtype", self.dtype in ("float32", "bfloat16", "float16"), "'float32', 'bfloat16' or 'float16'", "")

    def folder_name(self) -> str:
        """The output folder's name: everything that determines the images, readable."""
        model = Path(self.model).name if os.sep in self.model else self.model.replace("/", "--")
        parts = [model, f"p{self.num_prompts}", f"s{self.steps}", f"seed{self.seed}"]
        if self.prompts_file is not None:
            parts.append(Path(self.prompts_file).stem)
        elif self.prompt_seed != SHAPES_PROMPT_SEED:
            parts.append(f"ps{self.prompt_seed}")
        if self.guidance_scale is not None:
            parts.append(f"g{self.guidance_scale:g}")
        if self.height is not None or self.width is not None:
            parts.append(f"{self.height or 'H'}x{self.width or 'W'}")
        if self.dtype != "float32":
            parts.append(self.dtype)
        return "-".join(str(p) for p in parts)

    def prompts(self) -> list[str]:
        """The evaluation's prompts (the first ``num_prompts``)."""
        if self.prompts_file is not None:
            path = Path(self.prompts_file)
            if not path.is_file():
                raise ValueError(
                    f"EvalSettings.prompts_file: expected a text file with one prompt per line, got {str(path)!r} "
                    "which does not exist."
                )
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if len(lines) < self.num_prompts:
                raise ValueError(
                    f"EvalSettings.num_prompts: expected at most the {len(lines)} prompts of {path}, got "
                    f"{self.num_prompts}. Pass --num-prompts {len(lines)} or add prompts."
                )
            return lines[: self.num_prompts]
        if not self.is_shapes:
            raise ValueError(
                f"EvalSettings.prompts_file: the model {self.model!r} is not the shapes model, so a prompt file is "
                "needed (one prompt per line). Pass --prompts FILE."
            )
        from ..models.shapes.world import random_captions

        return random_captions(self.num_prompts, seed=self.prompt_seed)

    @property
    def is_shapes(self) -> bool:
        """The embedded shapes model, or a saved ShapesPipeline folder (scored with adherence)."""
        if self.model == "shapes":
            return True
        index = _read_json(Path(self.model) / "model_index.json") if Path(self.model).is_dir() else None
        return bool(index and index.get("_class_name") == "ShapesPipeline")

    def image_key(self) -> dict:
        """The fields that determine the images (a change invalidates the generation cache)."""
        d = dataclasses.asdict(self)
        for timing_only in ("batch_size",):
            d.pop(timing_only)
        return d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- small helpers
def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def load_images(paths: Sequence[Path]) -> torch.Tensor:
    """Load PNGs into a float tensor (N, 3, H, W) in [0, 1].

    Example:
        >>> load_images([]).shape
        torch.Size([0, 3, 0, 0])
    """
    from PIL import Image

    if not paths:
        return torch.zeros(0, 3, 0, 0)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)


def _sync(device) -> None:
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()


def machine_info(device: str) -> dict:
    """Where the timings were measured (CPU model and threads, GPU name)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "device": str(device),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# ------------------------------------------------------------------------------------------ per-call observers
class _CallObserver:
    """Temporary forward hooks on the transformer: counts calls, computes the dense MACs of a call once, and for
    catprune methods counts per image how many steps computed each image token (for the selection heat maps).

    The counts are read from the catprune runtime: before a call, ``runtime.idx_rows`` (B, k) is the selection that
    a pruned call will compute; after the call, the last `StepRecord` says whether it was pruned. Dense and capture
    steps compute every token. Conditional rows (the last ``n_images`` rows under CFG) are the images' own rows.
    """

    def __init__(self, transformer: torch.nn.Module, n_images: int, record_tokens: bool):
        self.transformer = transformer
        self.n_images = n_images
        self.record_tokens = record_tokens
        self.calls = 0
        self.dense_macs_per_call: int | None = None
        self.counts: torch.Tensor | None = None  # (n, M) steps that computed each token
        self.grid: tuple[int, int] | None = None
        self._pending = None
        self._handles = [
            transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
            transformer.register_forward_hook(self._post),
        ]

    def _runtime(self):
        return getattr(self.transformer.__dict__.get("forward"), "__catprune_runtime__", None)

    def _pre(self, module, args, kwargs):
        if self.dense_macs_per_call is None:
            with contextlib.suppress(Exception):  # MACs are informative; an unknown model just has none
                from ..adapters import adapter_for

                adapter = adapter_for(module)
                info = adapter.inspect_call(args, kwargs)
                self.dense_macs_per_call = int(adapter.macs(info, info.num_tokens))
                self.grid = tuple(info.grid)
        runtime = self._runtime()
        self._pending = None
        if self.record_tokens and runtime is not None:
            idx = runtime.idx_rows
            # idx_rows is a persistent buffer that the step overwrites in place with the next selection: copy it
            self._pending = (runtime.stats, len(runtime.stats.steps), idx.clone() if idx is not None else None)
        return None

    def _post(self, module, args, output):
        self.calls += 1
        if not self.record_tokens or self.grid is None:
            return None
        m = self.grid[0] * self.grid[1]
        if self.counts is None:  # on the model's device: no host sync inside the timed generation
            device = next(module.parameters()).device
            self.counts = torch.zeros(self.n_images, m, dtype=torch.int32, device=device)
        runtime = self._runtime()
        pruned_idx = None
        if runtime is not None and self._pending is not None:
            stats_before, len_before, idx_before = self._pending
            recorded = runtime.stats is not stats_before or len(runtime.stats.steps) > len_before
            if recorded and runtime.stats.steps and runtime.stats.steps[-1].phase == "pruned":
                pruned_idx = idx_before
        if pruned_idx is None:
            self.counts += 1  # a dense or capture step computes every token
        else:
            rows = pruned_idx[-self.n_images :].to(self.counts.device, torch.long)  # (n, k) the images' own rows
            self.counts.scatter_add_(1, rows, torch.ones_like(rows, dtype=torch.int32))  # (n, M)
        return None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# --------------------------------------------------------------------------------------------- generation
@dataclass
class MethodCache:
    """The on-disk generation cache of one method."""

    root: Path
    method: Method

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def image_path(self, index: int) -> Path:
        return self.images_dir / f"{index:05d}.png"

    def batches(self) -> list[dict]:
        return _read_json(self.root / "batches.json", default=[]) or []

    def tokens(self) -> dict | None:
        path = self.root / "tokens.npz"
        if not path.is_file():
            return None
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    def done_starts(self) -> set[int]:
        return {b["start"] for b in self.batches() if all(self.image_path(i).is_file() for i in b["indices"])}

    def status(self) -> dict | None:
        return _read_json(self.root / "status.json")


def _open_cache(root: Path, method: Method, image_key: dict, force: bool) -> MethodCache:
    cache = MethodCache(root / "generation" / method.name, method)
    stored = _read_json(cache.root / "method.json")
    expected = {"method": method.to_dict(), "settings": image_key}
    if force or stored != expected:
        if cache.root.exists():
            shutil.rmtree(cache.root)
        cache.images_dir.mkdir(parents=True, exist_ok=True)
        _write_json(cache.root / "method.json", expected)
    return cache


def _call_pipe(pipe, prompts: list[str], seeds: list[int], steps: int, settings: EvalSettings, device) -> torch.Tensor:
    generators = [torch.Generator(device=torch.device(device)).manual_seed(s) for s in seeds]
    kwargs = dict(num_inference_steps=steps, generator=generators, output_type="pt")
    if settings.guidance_scale is not None:
        kwargs["guidance_scale"] = settings.guidance_scale
    if settings.height is not None:
        kwargs["height"] = settings.height
    if settings.width is not None:
        kwargs["width"] = settings.width
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
        """(images, seconds, record) for one batch."""
        n = len(prompts)
        observer = _CallObserver(self.pipe.transformer, n, record_tokens and self.method.kind is Kind.CATPRUNE)
        try:
            with self.applied():
                _sync(device)
                start = time.perf_counter()
                images = _call_pipe(self.pipe, prompts, seeds, self.method.steps, settings, device)
                _sync(device)
                seconds = time.perf_counter() - start
                record = {"seconds": seconds, "transformer_calls": observer.calls}
                dense_call = observer.dense_macs_per_call
                record["dense_macs_per_call"] = dense_call
                if self.method.kind is Kind.CATPRUNE:
                    stats = api.stats(self.pipe)
                    record.update(macs=stats.macs, pruned_steps=stats.pruned_steps)
                    if not stats.steps and dense_call is not None:  # pruning disabled: every call dense
                        record["macs"] = dense_call * observer.calls
                elif self.method.kind is Kind.PEER:
                    peer_stats = self.peer.stats()
                    record["peer"] = peer_stats
                    if dense_call is not None:
                        blocks = len(self.pipe.transformer.transformer_blocks)
                        cached = len(peer_stats["cached_steps"])
                        share = min(1.0, peer_stats["computed_blocks_on_cached_steps"] / blocks)
                        # estimate: a cached step runs only the Fn/Bn blocks (embedding and head MACs neglected)
                        record["macs"] = int(dense_call * ((observer.calls - cached) + cached * share))
                        record["macs_estimated"] = True
                elif dense_call is not None:
                    record["macs"] = dense_call * observer.calls
        finally:
            observer.close()
        counts = observer.counts.cpu() if observer.counts is not None else None
        return images.float().cpu(), seconds, record, counts, observer.grid


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
        pipe: a ready pipeline (tests, notebooks); by default ``catprune.models.load_pipeline(settings.model)``.
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
        >>> settings = EvalSettings(num_prompts=2, steps=4, batch_size=2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     out = generate(settings, parse_methods("cat:0.5:2", 4), d, pipe=pipe, log=lambda s: None)
        ...     sorted(p.name for p in (out / "generation").iterdir())
        ['cat-a0.5-t2', 'dense-4']
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(methods)
    _check_methods(methods, settings)
    stored = _read_json(out / "settings.json")
    if stored is not None and stored.get("image_key") != settings.image_key() and not force:
        changed = sorted(
            k for k in settings.image_key() if stored.get("image_key", {}).get(k) != settings.image_key()[k]
        )
        raise ValueError(
            f"generate: out_dir: {out} holds images of other settings (differing: {', '.join(changed)}). Use another "
            "output folder, or pass force=True (--force) to regenerate."
        )
    prompts = settings.prompts()
    device = settings.device
    if pipe is None:
        from ..models import load_pipeline

        pipe = load_pipeline(settings.model, device=device, dtype=getattr(torch, settings.dtype))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    _write_json(
        out / "settings.json",
        {"settings": settings.to_dict(), "image_key": settings.image_key(), "machine": machine_info(device)},
    )
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")

    caches: dict[str, MethodCache] = {}
    runners: dict[str, _MethodRunner] = {}
    for method in methods:
        cache = _open_cache(out, method, settings.image_key(), force)
        runner = _MethodRunner(pipe, method)
        if method.kind is Kind.PEER:
            try:
                runner.peer.check(pipe)
            except PeerUnavailable as exc:
                log(f"[eval] {method.name}: skipped: {exc}")
                _write_json(cache.root / "status.json", {"skipped": True, "reason": str(exc)})
                continue
        _write_json(cache.root / "status.json", {"skipped": False})
        caches[method.name] = cache
        runners[method.name] = runner

    starts = list(range(0, len(prompts), settings.batch_size))
    todo = {name: [s for s in starts if s not in cache.done_starts()] for name, cache in caches.items()}
    total = sum(len(v) for v in todo.values())
    log(
        f"[eval] {len(prompts)} prompts x {len(caches)} methods, {settings.steps} steps, batch {settings.batch_size}, "
        f"device {device}: {total} batches to generate -> {out}"
    )
    if warmup and total:
        for name, runner in runners.items():
            if todo[name]:
                try:
                    runner.run(prompts[:1], [settings.seed], settings, device, record_tokens=False)
                except Exception as exc:
                    if runner.method.kind is not Kind.PEER:
                        raise
                    _skip(caches, runners, todo, name, _peer_failure(exc), log)
    token_counts = {name: _load_counts(caches[name], len(prompts)) for name in caches}
    done, started = 0, time.perf_counter()
    for start in starts:
        for name in list(runners):
            if start not in todo.get(name, []):
                continue
            cache, runner = caches[name], runners[name]
            indices = list(range(start, min(start + settings.batch_size, len(prompts))))
            try:
                images, seconds, record, counts, grid = runner.run(
                    [prompts[i] for i in indices], [settings.seed + i for i in indices], settings, device, True
                )
            except Exception as exc:
                if runner.method.kind is not Kind.PEER:
                    raise
                _skip(caches, runners, todo, name, _peer_failure(exc), log)
                continue
            for i, image in zip(indices, images, strict=True):
                _save_png(image, cache.image_path(i))
            if counts is not None:
                tc = token_counts[name]
                if tc["counts"] is None:
                    tc["counts"] = np.zeros((len(prompts), counts.shape[1]), dtype=np.int16)
                tc["counts"][indices] = counts.numpy().astype(np.int16)
                tc["grid"] = grid
                np.savez_compressed(cache.root / "tokens.npz", counts=tc["counts"], grid=np.array(grid))
            batches = [b for b in cache.batches() if b["start"] != start]
            batches.append({"start": start, "indices": indices, **record})
            _write_json(cache.root / "batches.json", sorted(batches, key=lambda b: b["start"]))
            done += 1
            elapsed = time.perf_counter() - started
            log(
                f"[eval] {done}/{total} {name} images {indices[0]}-{indices[-1]}: {seconds / len(indices):.3f} s/image"
                f" (elapsed {elapsed / 60:.1f} min, eta {elapsed / done * (total - done) / 60:.1f} min)"
            )
    return out


def _peer_failure(exc: Exception) -> str:
    """A peer library failing on this model is reported, not fatal: the other methods still run."""
    return str(exc) if isinstance(exc, PeerUnavailable) else f"failed on this model: {type(exc).__name__}: {exc}"


def _skip(caches, runners, todo, name, reason, log) -> None:
    log(f"[eval] {name}: skipped: {reason}")
    _write_json(caches[name].root / "status.json", {"skipped": True, "reason": reason})
    runners.pop(name, None)
    todo[name] = []


def _load_counts(cache: MethodCache, n: int) -> dict:
    data = cache.tokens()
    if data is None or data["counts"].shape[0] != n:
        return {"counts": None, "grid": None}
    return {"counts": data["counts"], "grid": tuple(int(g) for g in data["grid"])}


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
        if m.kind is not Kind.DENSE and m.steps != settings.steps:
            raise ValueError(
                f"generate: methods: {m.name} runs {m.steps} steps; accelerated methods must run settings.steps "
                f"({settings.steps}). Build them with the evaluation's step count."
            )


def reference_name(settings: EvalSettings) -> str:
    """The name of the reference method (dense at the evaluation's step count)."""
    return f"dense-{settings.steps}"


# ------------------------------------------------------------------------------------------------ scoring
def load_generation(out_dir: str | os.PathLike) -> tuple[EvalSettings, list[MethodCache], dict[str, str]]:
    """Read an evaluation folder: (settings, the methods' caches, {skipped method: reason})."""
    out = Path(out_dir)
    stored = _read_json(out / "settings.json")
    if stored is None:
        raise ValueError(
            f"score: out_dir: expected an evaluation folder with settings.json (written by the generation phase), "
            f"got {str(out)!r}. Run `catprune eval --phase generate` first."
        )
    settings = EvalSettings(**stored["settings"])
    caches, skipped = [], {}
    root = out / "generation"
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        meta = _read_json(folder / "method.json")
        if meta is None:
            continue
        cache = MethodCache(folder, method_from_dict(meta["method"]))
        status = cache.status() or {}
        if status.get("skipped"):
            skipped[cache.method.name] = status.get("reason", "")
        else:
            caches.append(cache)
    return settings, caches, skipped


def score(
    out_dir: str | os.PathLike, log: Log = _print, only: Sequence[str] | None = None, device: str | None = None
) -> dict:
    """Scoring phase: per method and image, fidelity to the reference (PSNR, SSIM, LPIPS if available) and, on the
    shapes model, adherence to the caption; on other models CLIP score and FID where their weights are available.
    Reads only the generation cache. Writes and returns ``scores.json``.

    Args:
        out_dir: the evaluation folder.
        only: score only these methods (default: every method with complete images).
        device: where the metrics run (default: the generation's device if it is available here, else the CPU;
            the adherence checker is much faster on a GPU).

    Example:
        >>> import tempfile
        >>> from catprune.models.shapes import build_random_shapes_pipeline
        >>> from catprune.evaluation.methods import parse_methods
        >>> pipe = build_random_shapes_pipeline(num_layers=1, attention_head_dim=8, num_attention_heads=2)
        >>> settings = EvalSettings(num_prompts=2, steps=4, batch_size=2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = generate(settings, parse_methods("dense:2", 4), d, pipe=pipe, log=lambda s: None)
        ...     scores = score(d, log=lambda s: None)
        >>> sorted(scores["methods"]), scores["methods"]["dense-4"]["per_image"]["psnr"][0]
        (['dense-2', 'dense-4'], inf)
    """
    from . import metrics

    out = Path(out_dir)
    settings, caches, skipped = load_generation(out)
    prompts = settings.prompts()
    n = len(prompts)
    if device is None:
        device = (
            settings.device if torch.device(settings.device).type != "cuda" or torch.cuda.is_available() else "cpu"
        )
    ref_name = reference_name(settings)
    by_name = {c.method.name: c for c in caches}
    complete = {name: c for name, c in by_name.items() if all(c.image_path(i).is_file() for i in range(n))}
    for name in sorted(set(by_name) - set(complete)):
        log(f"[eval] {name}: images incomplete, not scored (run the generation phase again to finish it)")
    if only is not None:
        complete = {k: v for k, v in complete.items() if k in set(only) | {ref_name}}
    reference = None
    if ref_name in complete:
        reference = load_images([complete[ref_name].image_path(i) for i in range(n)]).to(device)  # (n, 3, H, W)
    if reference is None:
        log(f"[eval] reference {ref_name} missing: fidelity metrics (PSNR, SSIM, LPIPS) skipped")

    statuses = {"lpips": metrics.lpips_status()}
    if settings.is_shapes:
        statuses["clip_score"] = metrics.MetricStatus("clip_score", False, "not used on the shapes model")
        statuses["fid"] = metrics.MetricStatus("fid", False, "not used on the shapes model")
    else:
        statuses["clip_score"] = metrics.clip_status()
        statuses["fid"] = metrics.fid_status()
    for status in statuses.values():
        if not status.available:
            log(f"[eval] {status.name}: {status.reason}")

    results: dict[str, dict] = {}
    for name, cache in complete.items():
        images = load_images([cache.image_path(i) for i in range(n)]).to(device)  # (n, 3, H, W)
        per_image: dict[str, list] = {}
        summary: dict[str, float | None] = {}
        if reference is not None:
            p = metrics.psnr(images, reference)
            s = metrics.ssim(images, reference)
            per_image["psnr"] = p.tolist()
            per_image["ssim"] = s.tolist()
            summary["psnr"] = metrics.finite_mean(p.tolist())
            summary["psnr_identical"] = int(torch.isinf(p).sum())
            summary["ssim"] = float(s.mean())
            if statuses["lpips"].available:
                lp = metrics.lpips(images.cpu(), reference.cpu())
                per_image["lpips"] = lp.tolist()
                summary["lpips"] = float(lp.mean())
            if statuses["fid"].available and name != ref_name:
                summary["fid_to_reference"] = metrics.fid(reference.cpu(), images.cpu())
        if settings.is_shapes:
            from .adherence import check_adherence

            report = check_adherence(images, prompts)
            colour = [0] * n
            shape = [0] * n
            objects = [0] * n
            for obj in report.objects:
                colour[obj.image_index] += int(obj.colour_at_cell)
                shape[obj.image_index] += int(obj.shape)
                objects[obj.image_index] += 1
            per_image["colour_at_cell"] = [c / max(1, o) for c, o in zip(colour, objects, strict=True)]
            per_image["shape"] = [s_ / max(1, o) for s_, o in zip(shape, objects, strict=True)]
            summary["colour_at_cell"] = report.colour_at_cell
            summary["shape"] = report.shape
            summary["adherence"] = 0.5 * (report.colour_at_cell + report.shape)
            summary["num_objects"] = report.num_objects
        if statuses["clip_score"].available:
            cs = metrics.clip_score(images.cpu(), prompts)
            per_image["clip_score"] = cs.tolist()
            summary["clip_score"] = float(cs.mean())
        results[name] = {"summary": summary, "per_image": per_image}
        log(f"[eval] scored {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in summary.items()))

    scores = {
        "reference": ref_name if reference is not None else None,
        "num_prompts": n,
        "metrics": {k: v.to_dict() for k, v in statuses.items()},
        "skipped_methods": skipped,
        "methods": results,
    }
    _write_json(out / "scores.json", scores)
    return scores


def _fmt(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def timing_summary(cache: MethodCache) -> dict:
    """Wall-clock and MACs per image of a method, from its cached batches."""
    batches = cache.batches()
    images = sum(len(b["indices"]) for b in batches)
    seconds = sum(b["seconds"] for b in batches)
    macs = [b.get("macs") for b in batches]
    out = {
        "images": images,
        "seconds_per_image": seconds / images if images else None,
        "macs_per_image": sum(macs) / images if images and all(m is not None for m in macs) else None,
        "macs_estimated": any(b.get("macs_estimated") for b in batches),
        "dense_macs_per_call": next(
            (b.get("dense_macs_per_call") for b in batches if b.get("dense_macs_per_call")), None
        ),
    }
    per_batch = [b["seconds"] / len(b["indices"]) for b in batches if b["indices"]]
    if len(per_batch) > 1:
        mean = sum(per_batch) / len(per_batch)
        var = sum((x - mean) ** 2 for x in per_batch) / (len(per_batch) - 1)
        out["seconds_per_image_batch_std"] = math.sqrt(var)
    peers = [b["peer"] for b in batches if b.get("peer")]
    if peers:
        out["cached_steps_per_call"] = sum(len(p["cached_steps"]) for p in peers) / len(peers)
    return out


__all__ = [
    "EvalSettings",
    "MethodCache",
    "generate",
    "load_generation",
    "load_images",
    "machine_info",
    "reference_name",
    "score",
    "timing_summary",
]
