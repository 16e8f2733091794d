"""`CATConfig`: the one validated configuration object of catprune."""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from dataclasses import dataclass, field


class CFGMode(str, enum.Enum):
    """How classifier-free-guidance rows of one sample share a token selection.

    - ``AUTO``: when catprune is applied to a pipeline, read the pipeline's ``do_classifier_free_guidance`` at the
      start of every generation and use ``SHARED`` when it is on; applied to a bare transformer, use ``PER_ROW``.
    - ``SHARED``: the batch is ``[unconditional rows, conditional rows]`` (the diffusers convention); row ``b`` and
      row ``b + B/2`` share one selection scored on the conditional row (as in the paper's reference).
    - ``PER_ROW``: every batch row selects its own tokens.
    """

    AUTO = "auto"
    SHARED = "shared"
    PER_ROW = "per_row"


class Selection(str, enum.Enum):
    """Which tokens a pruned step recomputes. ``CAT`` is the method; the others exist for ablations and baselines
    at the same token budget k (the same caches and the same pruned step, only the choice differs).

    - ``CAT``: cluster-aware change magnitude plus staleness (docs/method.md step 4).
    - ``RANDOM``: k tokens uniformly at random each step (seeded).
    - ``MAGNITUDE``: the k largest changes ``||n_i - n_ref||``; no clusters, no staleness.
    - ``STALENESS``: the k stalest tokens (lowest f); no change signal.
    - ``NO_CLUSTERING``: the CAT rule with a single cluster (magnitude + staleness, no spatial grouping).
    - ``RAS``: a region-adaptive baseline in the manner of RAS (Liu et al., 2025): per-token score is the spread
      (std over channels) of the current output, multiplied by ``exp(ras_starvation * age)`` so starved tokens
      come back; the k highest scores are recomputed.
    - ``DRIFT``: catprune's extension: the k tokens whose reused output is predicted to be furthest from fresh at
      the next step, ``rate * (age + 1)``: a token's drift rate is how far its output moved between its last two
      computations, per step between them (`catprune.algorithm.update_rate`). A token left out grows in priority
      every step, so it comes back without a staleness counter; one whose output did not move at all between its
      last two computations is recomputed only when the budget has room. No clustering.
    """

    CAT = "cat"
    RANDOM = "random"
    MAGNITUDE = "magnitude"
    STALENESS = "staleness"
    NO_CLUSTERING = "no_clustering"
    RAS = "ras"
    DRIFT = "drift"


class Backend(str, enum.Enum):
    """How steps execute. Only speed changes; compiled / graphed numerics match eager within the dtype's tolerance.

    - ``EAGER``: plain PyTorch (dense steps are the model's own forward: bit-identical to dense when not pruning).
    - ``COMPILE``: dense and pruned steps through ``torch.compile`` (static shapes: one graph each).
    - ``CUDAGRAPH``: dense and pruned steps captured once as CUDA graphs and replayed (CUDA only).
    - ``COMPILE_CUDAGRAPH``: compiled kernels captured in CUDA graphs (CUDA only); usually the fastest.
    The cache-filling steps (the capture, start_step - 1, and with the forecast the reference step before it) run as
    full-selection pruned steps through the compile and graph backends (`catprune.runtime.StepRunner`), eagerly
    with hooks on the eager backend; calls with ControlNet residuals or LoRA scales fall back to eager.
    """

    EAGER = "eager"
    COMPILE = "compile"
    CUDAGRAPH = "cudagraph"
    COMPILE_CUDAGRAPH = "compile+cudagraph"

    @classmethod
    def parse(cls, value, who: str, fix: str) -> Backend:
        """``Backend(value)``, or a ValueError that names ``who`` (e.g. ``"StepRunner: backend"``), the choices, what
        was received and ``fix``.

        Example:
            >>> Backend.parse("cudagraph", "f: backend", "")
            <Backend.CUDAGRAPH: 'cudagraph'>
        """
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(b.value) for b in cls)
            raise ValueError(f"{who}: expected a catprune.Backend or one of {choices}, got {value!r}. {fix}") from None


class Context(str, enum.Enum):
    """What the computed tokens of a pruned step attend to for the tokens that step does not compute.

    - ``REUSE``: their keys/values from the step that last computed them (the paper's behaviour, exactly).
    - ``EXTRAPOLATE``: a per-token first-order forecast in time from their last two computations,
      ``K1 + (K1 - K0) * (t - t1) / (t1 - t0)`` (docs/method.md, "Context forecast"). Costs one extra K/V copy per
      block plus one shared working buffer, and one elementwise pass (a lerp) over the cache per block; no MACs.
    """

    REUSE = "reuse"
    EXTRAPOLATE = "extrapolate"


class CacheDtype(str, enum.Enum):
    """How the caches a pruned step reads (per-block K/V, and K0 when forecasting) are stored; ``None`` in
    `CATConfig.cache_dtype` keeps them in the model's compute dtype. Values are dequantised at use, into one working
    buffer shared by the blocks; the tokens a step computes always attend with their fresh, unrounded values.

    - ``BF16`` / ``FP16``: a cast (useful when the model runs in float32; on a 16-bit model they change nothing).
    - ``FP8``: ``torch.float8_e4m3fn`` with one float32 scale per token row (absmax over the channels / 448), so a
      row's rounding never depends on other rows or other samples of the batch.
    """

    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"

    @property
    def torch_dtype(self):
        """The storage ``torch.dtype`` (imports torch)."""
        import torch

        names = {"bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn"}
        return getattr(torch, names[self.value], None)  # None: this torch has no such dtype


#: torch dtype names accepted for CATConfig.cache_dtype, by the CacheDtype they mean
_CACHE_TORCH_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float8_e4m3fn": "fp8"}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Upper bounds of the integer fields (documented in the field table): beyond them a value is a typo, not a setting.
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value
MAX_KMEANS_ITERS = 1_000


@dataclass(frozen=True)
class CATConfig:
    """Configuration of CAT Pruning (Cluster-Aware Token Pruning).

    Every field is validated at construction; the object is immutable (use ``dataclasses.replace`` to derive one).
    Numeric fields accept numpy scalars and store them as Python ``int`` / ``float``.

    Fields (type, default, meaning, and which way it trades speed for quality):

    - ``keep_ratio`` (float in (0, 1], default 0.3): alpha, the fraction of image tokens recomputed per pruned step,
      ``k = round(keep_ratio * M)``. Lower is faster and drifts further from the dense image. ``1.0`` disables
      pruning: outputs are bit-identical to the dense model.
    - ``start_step`` (int >= 2, default 8): t0, the number of full (dense) warm-up steps before pruning starts.
      Steps ``0 .. start_step-1`` are dense; the reference output is taken at step ``start_step - 2``. Higher is
      slower and closer to dense. A value >= the number of inference steps disables pruning (bit-identical output).
    - ``num_clusters`` (int >= 1 or None, default None): C, spatial clusters for cluster-aware selection. ``None``
      picks ``round(20 * M / 4096)`` clamped to ``[2, M]`` (20 clusters at SD3's 1024px, 4096 tokens), so that a
      cluster covers about the same number of tokens at every resolution. At most the image token count (checked
      at the first call).
    - ``cluster_feature_weight`` (float >= 0, default 0.05): w, weight of the model's per-token output against the
      normalised grid position in the clustering features. 0 gives purely spatial clusters.
    - ``kmeans_iters`` (int in [1, 1000], default 10): fixed number of Lloyd iterations (fixed so the cost is static).
    - ``staleness_decay`` (float in [0, 1), default 0.5): gamma in ``f <- gamma * f + 1[selected]``. Higher keeps a
      longer memory of past selections.
    - ``magnitude_share`` (float in [0, 1], default 0.25): rho, the share of k chosen by cluster-aware change
      magnitude; the rest goes to the stalest tokens. Higher follows the content more, lower refreshes evenly.
    - ``cluster_share_weights`` (tuple of positive floats, default (3, 2, 1)): how the magnitude part is divided over
      the clusters ranked by change: rank 0 gets 3 parts, rank 1 two, every further rank the last value.
    - ``cfg`` (CFGMode, default AUTO): how classifier-free-guidance rows share selections; see `CFGMode`.
    - ``seed`` (int in [0, 2**63 - 1], default 0): seed of the k-means initialisation (and of ``Selection.RANDOM``).
    - ``selection`` (Selection, default CAT): the token-choice rule; CAT is the paper's, DRIFT catprune's extension, the
      others ablations / baselines.
    - ``ras_starvation`` (float >= 0, default 0.1): starvation weight of ``Selection.RAS`` only.
    - ``backend`` (Backend, default EAGER): execution of the steps (eager, compile, cudagraph, compile+cudagraph).
    - ``context`` (Context, default REUSE): what computed tokens attend to for the tokens a pruned step does not
      compute: their last keys/values (``REUSE``: the paper's behaviour exactly) or a per-token linear forecast of
      them in time (``EXTRAPOLATE``: no extra MACs; at keep 0.3 +4.8 dB PSNR to dense on ``shapes``, -1.2 dB on
      the shipped ``scenes`` model at keep 0.3, +1.4 dB with 20 steps, keep 0.55 and two final dense steps,
      docs/quality_per_cost.md; on an H200 it makes the SD3-medium pruned step 14% slower at keep 0.55 and the cache
      twice as large, docs/measurements.md, so at equal GPU time reuse is better).
    - ``keep_ratio_end`` (float in (0, 1] or None, default None): a keep-ratio schedule: pruned step j of n keeps
      ``keep_ratio + (keep_ratio_end - keep_ratio) * j / (n - 1)`` of the tokens (linear; None: constant
      ``keep_ratio``). n comes from the pipeline's scheduler; on a bare transformer the progress is read from the
      timestep instead (``1 - t / t_capture``). E.g. 0.5 -> 0.2 spends more tokens early, when the image changes most.
    - ``refresh_every`` (int >= 1 or None, default None): every n-th pruned step runs dense instead and refreshes
      all caches (and the forecast slopes). Smaller is slower and closer to dense; None never refreshes.
    - ``forecast_max_ratio`` (float > 0 or None, default 0.5): with ``context="extrapolate"``, the cap of the
      extrapolation ratio ``(t - t1) / (t1 - t0)``: a token left out for many steps is forecast at most this many of
      its last step lengths ahead (None: no cap; uncapped loses 5 dB at keep 0.2 on ``shapes``; 1.0 is best on
      ``shapes``, 0.5 on ``scenes``). No speed effect.
    - ``cache_dtype`` (CacheDtype or None, default None): storage of the K/V caches (and K0 when forecasting):
      None keeps the model's compute dtype (today's behaviour, bit for bit); ``"bf16"`` / ``"fp16"`` cast (for
      a float32 model); ``"fp8"`` is float8_e4m3fn with a per-token scale, half of a 16-bit cache. Also accepts
      ``torch.bfloat16``, ``torch.float16``, ``torch.float8_e4m3fn``. Less memory; rounding of the cached
      (unselected) tokens' K/V only.
    - ``final_dense_steps`` (int >= 0, default 0): the last n inference steps run dense (every token computed). With
      a shifted flow-matching schedule the last steps are the longest and a stale output moves the image most there
      (docs/quality_per_cost.md). Higher is slower and closer to dense. The step count comes from the pipeline's
      scheduler: a value > 0 needs catprune applied to a pipeline, not to a bare transformer. The keep-ratio
      schedule spans the pruned steps before them.

    Example:
        >>> from catprune import CATConfig
        >>> CATConfig(keep_ratio=0.3, start_step=8).keep_ratio
        0.3
    """

    keep_ratio: float = 0.3
    start_step: int = 8
    num_clusters: int | None = None
    cluster_feature_weight: float = 0.05
    kmeans_iters: int = 10
    staleness_decay: float = 0.5
    magnitude_share: float = 0.25
    cluster_share_weights: tuple[float, ...] = field(default=(3.0, 2.0, 1.0))
    cfg: CFGMode = CFGMode.AUTO
    seed: int = 0
    selection: Selection = Selection.CAT
    ras_starvation: float = 0.1
    backend: Backend = Backend.EAGER
    context: Context = Context.REUSE
    keep_ratio_end: float | None = None
    refresh_every: int | None = None
    forecast_max_ratio: float | None = 0.5
    cache_dtype: CacheDtype | None = None
    final_dense_steps: int = 0

    def _fail(self, name, expected, fix, error=ValueError):
        got = getattr(self, name)
        raise error(f"CATConfig.{name}: expected {expected}, got {got!r} ({type(got).__name__}). {fix}")

    def _normalise_numbers(self) -> None:
        """numpy / torch scalars become Python numbers, so that to_dict() is JSON-serialisable and values compare
        and hash like the plain ones."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (bool, str, enum.Enum)) or value is None:
                continue
            if _is_int(value) and type(value) is not int and f.type in ("int", "int | None"):
                object.__setattr__(self, f.name, int(value))
            elif _is_real(value) and type(value) is not float and f.type in ("float", "float | None"):
                object.__setattr__(self, f.name, float(value))

    def _parse_enum(self, name, enum_cls, fix) -> None:
        try:
            object.__setattr__(self, name, enum_cls(getattr(self, name)))
        except ValueError:
            choices = ", ".join(repr(m.value) for m in enum_cls)
            self._fail(name, f"a {enum_cls.__name__} or one of {choices}", fix)

    def __post_init__(self):
        fail = self._fail
        self._normalise_numbers()
        if not _is_real(self.keep_ratio):
            fail("keep_ratio", "a float in (0, 1]", "Pass e.g. keep_ratio=0.3.", TypeError)
        if not (0.0 < float(self.keep_ratio) <= 1.0) or math.isnan(self.keep_ratio):
            fail("keep_ratio", "a float in (0, 1]", "Use 1.0 to disable pruning, e.g. 0.3 to keep 30% of tokens.")
        if not _is_int(self.start_step):
            fail("start_step", "an int >= 2", "Pass e.g. start_step=8.", TypeError)
        if self.start_step < 2:
            fail(
                "start_step",
                "an int >= 2 (the reference output is taken at step start_step - 2)",
                "Use start_step=2 or more; the paper uses 8.",
            )

        if self.num_clusters is not None:
            if not _is_int(self.num_clusters):
                fail(
                    "num_clusters",
                    "an int >= 1 or None",
                    "Pass e.g. num_clusters=20, or None for automatic.",
                    TypeError,
                )
            if self.num_clusters < 1:
                fail("num_clusters", "an int >= 1 or None", "Use None to pick a value from the token count.")
        if not _is_real(self.cluster_feature_weight):
            fail("cluster_feature_weight", "a float >= 0", "Pass e.g. 0.05.", TypeError)
        if not (self.cluster_feature_weight >= 0.0 and math.isfinite(self.cluster_feature_weight)):
            fail("cluster_feature_weight", "a finite float >= 0", "Pass e.g. 0.05.")
        if not _is_int(self.kmeans_iters):
            fail("kmeans_iters", "an int >= 1", "Pass e.g. 10.", TypeError)
        if not 1 <= self.kmeans_iters <= MAX_KMEANS_ITERS:
            fail("kmeans_iters", f"an int in [1, {MAX_KMEANS_ITERS}]", "Pass e.g. 10 (k-means converges in a few).")
        if not _is_real(self.staleness_decay):
            fail("staleness_decay", "a float in [0, 1)", "Pass e.g. 0.5.", TypeError)
        if not (0.0 <= self.staleness_decay < 1.0):
            fail("staleness_decay", "a float in [0, 1)", "Pass e.g. 0.5.")
        if not _is_real(self.magnitude_share):
            fail("magnitude_share", "a float in [0, 1]", "Pass e.g. 0.25.", TypeError)
        if not (0.0 <= self.magnitude_share <= 1.0):
            fail("magnitude_share", "a float in [0, 1]", "Pass e.g. 0.25.")
        weights = self.cluster_share_weights
        if not isinstance(weights, (tuple, list)) or not weights or not all(_is_real(w) for w in weights):
            fail("cluster_share_weights", "a non-empty tuple of positive floats", "Pass e.g. (3, 2, 1).", TypeError)
        if not all(w > 0 and math.isfinite(w) for w in weights):
            fail("cluster_share_weights", "a non-empty tuple of positive floats", "Pass e.g. (3, 2, 1).")
        object.__setattr__(self, "cluster_share_weights", tuple(float(w) for w in weights))
        self._parse_enum("cfg", CFGMode, "Pass e.g. cfg='auto'.")
        self._parse_enum("selection", Selection, "Pass e.g. selection='cat'.")
        self._parse_enum("backend", Backend, "Pass e.g. backend='cudagraph' on a GPU.")
        if not _is_real(self.ras_starvation):
            fail("ras_starvation", "a finite float >= 0", "Pass e.g. 0.1.", TypeError)
        if not (self.ras_starvation >= 0 and math.isfinite(self.ras_starvation)):
            fail("ras_starvation", "a finite float >= 0", "Pass e.g. 0.1.")
        if not _is_int(self.seed):
            fail("seed", "an int >= 0", "Pass e.g. seed=0.", TypeError)
        if not 0 <= self.seed <= MAX_SEED:
            fail("seed", "an int in [0, 2**63 - 1]", "Pass e.g. seed=0.")
        object.__setattr__(self, "keep_ratio", float(self.keep_ratio))
        self._validate_schedule()

    def _validate_schedule(self) -> None:
        self._parse_enum("context", Context, "Pass e.g. context='extrapolate' (or 'reuse' for the paper's rule).")
        end = self.keep_ratio_end
        if end is not None:
            if not _is_real(end):
                self._fail("keep_ratio_end", "a float in (0, 1] or None", "Pass e.g. keep_ratio_end=0.2.", TypeError)
            if not (0.0 < float(end) <= 1.0):
                self._fail(
                    "keep_ratio_end", "a float in (0, 1] or None", "Use None for a constant keep_ratio, or e.g. 0.2."
                )
            object.__setattr__(self, "keep_ratio_end", float(end))
        every = self.refresh_every
        if every is not None:
            if not _is_int(every):
                self._fail("refresh_every", "an int >= 1 or None", "Pass e.g. refresh_every=5.", TypeError)
            if every < 1:
                self._fail("refresh_every", "an int >= 1 or None", "Use None to never refresh, or e.g. 5.")
        cap = self.forecast_max_ratio
        if cap is not None:
            if not _is_real(cap):
                self._fail("forecast_max_ratio", "a float > 0 or None", "Pass e.g. 1.0.", TypeError)
            if not (cap > 0 and math.isfinite(cap)):
                self._fail("forecast_max_ratio", "a finite float > 0 or None", "Use None for no cap, or e.g. 1.0.")
            object.__setattr__(self, "forecast_max_ratio", float(cap))
        final = self.final_dense_steps
        if not _is_int(final):
            self._fail("final_dense_steps", "an int >= 0", "Pass e.g. final_dense_steps=2.", TypeError)
        if final < 0:
            self._fail("final_dense_steps", "an int >= 0", "Use 0 to prune up to the last step, or e.g. 2.")
        self._validate_cache_dtype()

    def _validate_cache_dtype(self) -> None:
        value = self.cache_dtype
        if value is None:
            return
        expected = "None or one of 'bf16', 'fp16', 'fp8' (or torch.bfloat16, torch.float16, torch.float8_e4m3fn)"
        fix = "Pass e.g. cache_dtype='fp8', or None to keep the model's dtype."
        if type(value).__name__ == "dtype":  # a torch.dtype: one of the three, else a wrong value
            value = _CACHE_TORCH_NAMES.get(str(value), str(value))
        elif not isinstance(value, str):
            self._fail("cache_dtype", expected, fix, TypeError)
        try:
            parsed = CacheDtype(value)
        except ValueError:
            self._fail("cache_dtype", expected, fix)
        if parsed.torch_dtype is None:
            import torch

            self._fail(
                "cache_dtype",
                "a storage dtype this torch provides",
                f"torch {torch.__version__} has no torch.float8_e4m3fn: use torch >= 2.1 for 'fp8', or 'bf16'.",
            )
        object.__setattr__(self, "cache_dtype", parsed)

    @property
    def pruning_enabled(self) -> bool:
        """False when ``keep_ratio == 1`` (and ``keep_ratio_end`` is None or 1): every step is dense and outputs are
        bit-identical to the dense model."""
        return self.keep_ratio < 1.0 or (self.keep_ratio_end is not None and self.keep_ratio_end < 1.0)

    def tokens_kept(self, num_tokens: int, progress: float = 0.0) -> int:
        """k: image tokens recomputed per pruned step for a grid of ``num_tokens`` tokens (at least 1), at
        ``progress`` in [0, 1] through the pruned steps (only matters with ``keep_ratio_end``).

        Example:
            >>> CATConfig(keep_ratio=0.5, keep_ratio_end=0.25).tokens_kept(16, 1.0)
            4
        """
        ratio = self.keep_ratio
        if self.keep_ratio_end is not None:
            ratio += (self.keep_ratio_end - ratio) * min(1.0, max(0.0, progress))
        return max(1, min(num_tokens, round(ratio * num_tokens)))

    def clusters_for(self, num_tokens: int) -> int:
        """C: clusters for a grid of ``num_tokens`` tokens. Raises ValueError if ``num_clusters`` exceeds it."""
        if self.num_clusters is None:
            return max(1, min(num_tokens, max(2, round(20 * num_tokens / 4096))))
        if self.num_clusters > num_tokens:
            raise ValueError(
                f"CATConfig.num_clusters: expected at most the number of image tokens ({num_tokens}) at this "
                f"resolution, got {self.num_clusters}. Use a smaller num_clusters or None for automatic."
            )
        return self.num_clusters

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of the fields."""
        out = dataclasses.asdict(self)
        out["cfg"] = self.cfg.value
        out["selection"] = self.selection.value
        out["backend"] = self.backend.value
        out["context"] = self.context.value
        out["cluster_share_weights"] = list(self.cluster_share_weights)
        out["cache_dtype"] = None if self.cache_dtype is None else self.cache_dtype.value
        return out


def changed_fields(config: CATConfig) -> list[str]:
    """``name=value`` of every field but ``keep_ratio``, ``start_step`` and ``backend`` that differs from its
    default.

    Example:
        >>> changed_fields(CATConfig(keep_ratio=0.5, context="extrapolate", final_dense_steps=2))
        ["context='extrapolate'", 'final_dense_steps=2']
    """
    default, words = CATConfig(), []
    for f in dataclasses.fields(CATConfig):
        value = getattr(config, f.name)
        if f.name in ("keep_ratio", "start_step", "backend") or value == getattr(default, f.name):
            continue
        value = value.value if isinstance(value, enum.Enum) else value
        words.append(f"{f.name}={value:g}" if isinstance(value, float) else f"{f.name}={value!r}")
    return words


def describe_config(config: CATConfig) -> str:
    """``keep_ratio=.. start_step=..`` and every other field that differs from its default (the backend aside), as
    keyword arguments one can paste into `CATConfig`.

    Example:
        >>> describe_config(CATConfig(keep_ratio=0.5, start_step=6, context="extrapolate", final_dense_steps=2))
        "keep_ratio=0.5 start_step=6 context='extrapolate' final_dense_steps=2"
    """
    head = [f"keep_ratio={config.keep_ratio:g}", f"start_step={config.start_step}"]
    return " ".join(head + changed_fields(config))
