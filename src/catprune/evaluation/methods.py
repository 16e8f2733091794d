"""The methods an evaluation compares: dense references, fewer steps, CAT Pruning, ablations, baselines and peers.

A method is a name plus what it runs. Every catprune method (CAT, its ablations, the RAS-style baseline) is a
`CATConfig`: the same pruned step, caches and token budget, only ``selection`` differs. Peers are other libraries'
accelerators driven through their public API (today cache-dit's DBCache, the optional ``catprune[peers]`` extra).

Method specs, as the CLI takes them (``--methods``), comma-separated:

- ``dense`` or ``dense:STEPS``: the dense model (``dense`` = the evaluation's step count, the reference);
- ``cat:KEEP:START`` (e.g. ``cat:0.3:8``) and the same for ``random``, ``magnitude``, ``staleness``,
  ``no_clustering`` and ``ras`` (see `catprune.Selection`); ``KEEP`` and ``START`` default to 0.3 and 8;
- the keyword form ``cat:KEY=VALUE:...`` (e.g. ``cat:s=20:k=0.55:t=6:fd=2`` for 20 steps, keep 0.55, start 6, two
  final dense steps): ``s`` the steps (fewer than the evaluation's: pruning combined with fewer steps), ``k``
  keep_ratio, ``t`` start_step, ``ctx`` context (``r`` / ``reuse``, ``x`` / ``extrapolate``), ``cap``
  forecast_max_ratio, ``end`` keep_ratio_end, ``rf`` refresh_every, ``fd`` final_dense_steps, ``cd`` cache_dtype,
  or any `CATConfig` field by its full name;
- ``dbcache`` or ``dbcache:THRESHOLD`` (cache-dit's DBCache, F1B0, warm-up 8 steps);
- presets: ``default`` (the full comparison), ``quick`` (the smallest set that every comparison of the report
  needs) and ``pareto`` (fewer dense steps against the mixes of fewer steps, pruning and final dense steps that
  measured best per cost on the embedded models, docs/quality_per_cost.md).

Example:
    >>> [m.name for m in parse_methods("dense,dense:14,cat:0.3:8,ras", steps=28)]
    ['dense-28', 'dense-14', 'cat-a0.3-t8', 'ras-a0.3-t8']
    >>> parse_methods("cat:s=20:k=0.55:t=6:fd=2", steps=28)[1].name
    'cat-a0.55-t6-c76ba2-s20'
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass, field

from ..config import CATConfig, Selection, changed_fields
from .specs import SHORT_KEYS, keyword_fields


class Kind(str, enum.Enum):
    """How a method runs: the dense model, catprune with a CATConfig, or a peer library."""

    DENSE = "dense"
    CATPRUNE = "catprune"
    PEER = "peer"


#: Report groups, in display order.
GROUPS = ("reference", "fewer steps", "CAT", "ablation", "baseline", "peer")

#: The rule names of the ablations / baselines, with the group they are shown in.
_SELECTION_GROUP = {
    Selection.CAT: "CAT",
    Selection.RANDOM: "ablation",
    Selection.MAGNITUDE: "ablation",
    Selection.STALENESS: "ablation",
    Selection.NO_CLUSTERING: "ablation",
    Selection.RAS: "baseline",
    Selection.DRIFT: "CAT",
}

_DESCRIPTIONS = {
    Selection.CAT: "CAT Pruning: cluster-aware change magnitude + staleness",
    Selection.RANDOM: "ablation: k tokens uniformly at random per step",
    Selection.MAGNITUDE: "ablation: the k largest changes, no clusters, no staleness",
    Selection.STALENESS: "ablation: the k stalest tokens, no change signal",
    Selection.NO_CLUSTERING: "ablation: the CAT rule with one cluster (no spatial grouping)",
    Selection.RAS: "RAS-style baseline: std of the output x exp(starvation x age), top-k",
    Selection.DRIFT: "catprune's drift rule: the k largest predicted drifts, rate x (age + 1)",
}

DEFAULT_KEEP_RATIO = 0.3
DEFAULT_START_STEP = 8
DBCACHE_DEFAULTS = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08}


@dataclass(frozen=True)
class Method:
    """One method of an evaluation.

    Attributes:
        name: unique, file-system safe (``dense-28``, ``cat-a0.3-t8``, ``dbcache-r0.08``).
        kind: `Kind`.
        steps: denoising steps the method runs.
        group: report group (one of `GROUPS`).
        description: one line for the report.
        config: the CATConfig of a catprune method, else None.
        peer: the settings of a peer method (``{"library": "cache-dit", ...}``), else None.

    Example:
        >>> Method.dense(14, reference_steps=28).group
        'fewer steps'
    """

    name: str
    kind: Kind
    steps: int
    group: str
    description: str
    config: CATConfig | None = None
    peer: dict | None = field(default=None, compare=False, hash=False)

    @classmethod
    def dense(cls, steps: int, reference_steps: int) -> Method:
        """The dense model at ``steps`` steps (the reference when ``steps == reference_steps``)."""
        reference = steps == reference_steps
        return cls(
            name=f"dense-{steps}",
            kind=Kind.DENSE,
            steps=steps,
            group="reference" if reference else "fewer steps",
            description=f"dense model, {steps} steps" + (" (the reference)" if reference else ""),
        )

    @classmethod
    def catprune(cls, config: CATConfig, steps: int, reference_steps: int | None = None) -> Method:
        """A catprune method (CAT, an ablation or the RAS-style baseline) for ``config`` at ``steps`` steps; a
        ``reference_steps`` other than ``steps`` (pruning combined with fewer steps) adds ``-s<steps>`` to the name.

        Example:
            >>> Method.catprune(CATConfig(keep_ratio=0.5, start_step=4, selection="random"), 28).name
            'random-a0.5-t4'
            >>> Method.catprune(CATConfig(keep_ratio=0.5, start_step=6), 20, reference_steps=28).name
            'cat-a0.5-t6-s20'
        """
        sel = config.selection
        name = f"{sel.value}-a{config.keep_ratio:g}-t{config.start_step}"
        extra = {k: v for k, v in config.to_dict().items() if k not in ("keep_ratio", "start_step", "selection")}
        defaults = {k: v for k, v in CATConfig().to_dict().items() if k in extra}
        if extra != defaults:  # a non-default knob: keep names unique and honest
            name += "-" + hashlib.sha1(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:6]
        fewer = reference_steps is not None and steps != reference_steps
        name += f"-s{steps}" if fewer else ""
        others = " ".join(changed_fields(config))
        description = f"{_DESCRIPTIONS[sel]}; keep_ratio {config.keep_ratio:g}, start_step {config.start_step}"
        description += (f", {others}" if others else "") + (f"; {steps} steps" if fewer else "")
        return cls(
            name=name,
            kind=Kind.CATPRUNE,
            steps=steps,
            group=_SELECTION_GROUP[sel],
            description=description,
            config=config,
        )

    @classmethod
    def dbcache(cls, steps: int, threshold: float = 0.08, warmup: int = DEFAULT_START_STEP) -> Method:
        """cache-dit's DBCache (F1B0: the first block always computed, the others cached while the first block's
        residual changes by less than ``threshold``), ``warmup`` dense steps."""
        settings = {**DBCACHE_DEFAULTS, "residual_diff_threshold": threshold, "max_warmup_steps": warmup}
        return cls(
            name=f"dbcache-r{threshold:g}",
            kind=Kind.PEER,
            steps=steps,
            group="peer",
            description=f"cache-dit DBCache F1B0, residual threshold {threshold:g}, {warmup} warm-up steps",
            peer={"library": "cache-dit", "cache": "DBCache", **settings},
        )

    @property
    def is_reference(self) -> bool:
        return self.group == "reference"

    def fingerprint(self) -> dict:
        """Everything that determines this method's images (the generation cache is keyed on it)."""
        return {
            "name": self.name,
            "kind": self.kind.value,
            "steps": self.steps,
            "config": self.config.to_dict() if self.config is not None else None,
            "peer": self.peer,
        }

    def to_dict(self) -> dict:
        out = self.fingerprint()
        out.update(group=self.group, description=self.description)
        return out


def estimated_macs_ratio(steps: int, keep_ratio: float = DEFAULT_KEEP_RATIO, start_step: int = DEFAULT_START_STEP):
    """CAT's MACs relative to dense, estimated before anything runs: ``start_step`` full steps, then pruned steps
    charged ``keep_ratio`` of a dense step. A lower bound: a pruned step also pays for the tokens it does not
    recompute (attention keys, text tokens), so the measured ratio is a little higher (0.512 instead of 0.500 on
    the shapes model at 28 steps, keep 0.3, start 8).

    Example:
        >>> estimated_macs_ratio(28, 0.3, 8)
        0.5
    """
    start = min(start_step, steps)
    return (start + (steps - start) * keep_ratio) / steps


def matched_steps(steps: int, keep_ratio: float = DEFAULT_KEEP_RATIO, start_step: int = DEFAULT_START_STEP) -> int:
    """The dense step count whose MACs ratio (``s / steps``) is closest to CAT's estimated ratio (ties: the
    costlier), for any reference step count.

    Example:
        >>> matched_steps(28), matched_steps(8, 0.3, 4), matched_steps(50)
        (14, 5, 21)
    """
    if steps < 2:
        return 1
    ratio = estimated_macs_ratio(steps, keep_ratio, start_step)
    return min(range(1, steps), key=lambda s: (abs(s / steps - ratio), -s))


def matched_fewer_steps(steps: int, keep_ratio: float = DEFAULT_KEEP_RATIO, start_step: int = DEFAULT_START_STEP):
    """The fewer-steps runs that match CAT's cost: `matched_steps` and the next costlier count. The estimate is a
    lower bound and the comparison needs a dense run at equal or higher MACs than CAT's measured ones, so both run.

    Example:
        >>> matched_fewer_steps(28), matched_fewer_steps(8, 0.3, 4), matched_fewer_steps(2)
        ([15, 14], [6, 5], [1])
    """
    s = matched_steps(steps, keep_ratio, start_step)
    return sorted({min(s + 1, max(1, steps - 1)), s}, reverse=True)


def _cat_start(steps: int) -> int:
    return min(DEFAULT_START_STEP, max(2, steps // 2))


def default_methods(steps: int = 28) -> list[Method]:
    """The full comparison at ``steps`` steps: dense (reference), dense with fewer steps, CAT at several keep
    ratios and start steps, the four ablations and the RAS-style baseline at CAT's main budget (keep 0.3, start 8),
    and cache-dit's DBCache (skipped at run time when cache-dit is not installed or does not support the model).

    The fewer-steps list spans 10/28 to 20/28 of the steps and always includes `matched_fewer_steps` (the dense
    runs of CAT's main configuration's cost), so that the report can compare CAT with dense at equal cost.

    Example:
        >>> [m.name for m in default_methods(28)][:4]
        ['dense-28', 'dense-20', 'dense-16', 'dense-15']
    """
    start = min(DEFAULT_START_STEP, max(2, steps - 1))
    fewer = {max(1, round(steps * f)) for f in (20 / 28, 16 / 28, 15 / 28, 14 / 28, 10 / 28)}
    fewer |= set(matched_fewer_steps(steps, DEFAULT_KEEP_RATIO, start))
    methods = [Method.dense(steps, steps)] + [
        Method.dense(s, steps) for s in sorted(fewer, reverse=True) if s != steps
    ]
    for keep, t0 in ((0.3, start), (0.2, start), (0.5, start), (0.3, max(2, start // 2)), (0.3, min(steps - 1, 12))):
        methods.append(Method.catprune(CATConfig(keep_ratio=keep, start_step=t0), steps))
    for selection in (Selection.RANDOM, Selection.MAGNITUDE, Selection.STALENESS, Selection.NO_CLUSTERING):
        methods.append(Method.catprune(CATConfig(keep_ratio=0.3, start_step=start, selection=selection), steps))
    methods.append(Method.catprune(CATConfig(keep_ratio=0.3, start_step=start, selection=Selection.RAS), steps))
    methods.append(Method.dbcache(steps, warmup=start))
    return _unique(methods)


#: The selection rules of the quick preset: CAT, the three ablations its comparison needs, the RAS-style baseline.
QUICK_SELECTIONS = (Selection.CAT, Selection.RANDOM, Selection.MAGNITUDE, Selection.STALENESS, Selection.RAS)


def quick_methods(steps: int = 28) -> list[Method]:
    """The smallest set that every comparison of the report needs: dense, the dense runs matching CAT's cost
    (`matched_fewer_steps`), CAT, the random, magnitude and staleness ablations and the RAS-style baseline, all at
    keep 0.3 and start step ``min(8, max(2, steps // 2))``.

    Example:
        >>> [m.name for m in quick_methods(8)][:4]
        ['dense-8', 'dense-6', 'dense-5', 'cat-a0.3-t4']
        >>> [m.name.split("-")[0] for m in quick_methods(8)][4:]
        ['random', 'magnitude', 'staleness', 'ras']
    """
    start = _cat_start(steps)
    fewer = [Method.dense(s, steps) for s in matched_fewer_steps(steps, DEFAULT_KEEP_RATIO, start) if s != steps]
    return _unique(
        [Method.dense(steps, steps), *fewer]
        + [
            Method.catprune(CATConfig(keep_ratio=DEFAULT_KEEP_RATIO, start_step=start, selection=s), steps)
            for s in QUICK_SELECTIONS
        ]
    )


#: (steps, keyword spec) of the `pareto` preset at 28 steps: the rows that measured best per cost on the embedded
#: models (docs/quality_per_cost.md); scaled to other step counts by `pareto_methods`
PARETO_AT_28 = (
    "cat:s=17:k=0.55:t=6:fd=2:ctx=x:sel=drift",
    "cat:s=18:k=0.55:t=7:fd=2:ctx=x:sel=drift",
    "cat:s=13:k=0.4:t=4:fd=1:ctx=x:sel=drift",
    "cat:s=14:k=0.25:end=0.55:t=4:fd=1:ctx=x:sel=drift",
    "cat:s=28:k=0.3:t=8:ctx=x:sel=drift",
    "cat:s=17:k=0.45:t=8:fd=2:magnitude_share=0.6:ctx=x:sel=no_clustering",
    "cat:s=17:k=0.55:t=7:fd=2:magnitude_share=0.85:ctx=x:sel=no_clustering",
    "cat:s=17:k=0.55:t=6:fd=2:ctx=x:sel=no_clustering",
    "cat:s=18:k=0.55:t=7:fd=2:ctx=x:sel=no_clustering",
    "cat:s=18:k=0.5:t=8:fd=2:ctx=x:sel=no_clustering",
    "cat:s=14:k=0.25:end=0.55:t=4:fd=1:sel=no_clustering",
    "cat:s=20:k=0.55:t=6:fd=2",
    "cat:s=20:k=0.55:t=6:fd=2:ctx=x",
    "cat:s=20:k=0.6:t=6",
    "cat:s=20:k=0.5:t=6:ctx=x",
    "cat:s=14:k=0.3:end=0.6:t=4:fd=1",
    "cat:s=14:k=0.25:end=0.55:t=4:fd=1",
    "cat:s=14:k=0.3:end=0.6:t=4:fd=2",
)


def pareto_methods(steps: int = 28) -> list[Method]:
    """Dense at 8..24 of 28 steps (scaled), CAT's default, and the `PARETO_AT_28` mixes, their step counts, start
    steps and final dense steps scaled to ``steps`` (at 28: as listed).

    Example:
        >>> [m.name for m in pareto_methods(28)][:3]
        ['dense-28', 'dense-24', 'dense-20']
        >>> pareto_methods(14)[-1].steps, pareto_methods(14)[-1].config.start_step
        (7, 2)
    """
    scale = steps / 28

    def scaled(n: int, low: int) -> int:
        return max(low, round(n * scale))

    fewer = sorted({min(steps - 1, scaled(n, 1)) for n in (8, 9, 10, 12, 14, 15, 16, 18, 20, 24)}, reverse=True)
    methods = [Method.dense(steps, steps)] + [Method.dense(n, steps) for n in fewer if n >= 1]
    methods.append(Method.catprune(CATConfig(start_step=_cat_start(steps)), steps))
    for spec in PARETO_AT_28:
        fields = keyword_fields(spec.split(":")[1:], spec)
        n = min(steps, scaled(fields.pop("s"), 3))
        fields["start_step"] = min(n - 1, scaled(fields["start_step"], 2))
        final = round(fields.get("final_dense_steps", 0) * scale)
        fields["final_dense_steps"] = min(n - fields["start_step"] - 1, final)
        methods.append(Method.catprune(CATConfig(**fields), n, reference_steps=steps))
    return _unique(methods)


PRESETS = {"default": default_methods, "quick": quick_methods, "pareto": pareto_methods}



def _unique(methods: list[Method]) -> list[Method]:
    seen, out = set(), []
    for m in methods:
        if m.name not in seen:
            seen.add(m.name)
            out.append(m)
    return out


def _number(text: str, kind, what: str, spec: str):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(
            f"methods: {spec!r}: expected {what} after ':', got {text!r}. Write e.g. 'cat:0.3:8' or 'dense:14'."
        ) from None


def parse_methods(spec: str | list[str], steps: int) -> list[Method]:
    """Parse a comma-separated method spec (see the module docstring) into methods at ``steps`` steps.

    The reference ``dense-STEPS`` is always included (fidelity is measured against it) and comes first.

    Raises:
        ValueError: naming the item that could not be parsed and the accepted forms.

    Example:
        >>> [m.name for m in parse_methods("quick,no_clustering:0.3:4", steps=8)][-1]
        'no_clustering-a0.3-t4'
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    selections = {s.value: s for s in Selection}
    methods: list[Method] = [Method.dense(steps, steps)]
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        head, *args = item.split(":")
        head = head.strip().lower()
        if head in PRESETS and not args:
            methods.extend(PRESETS[head](steps))
        elif head == "dense":
            if len(args) > 1:
                raise ValueError(f"methods: {item!r}: expected 'dense' or 'dense:STEPS', e.g. 'dense:14'.")
            n = _number(args[0], int, "an int number of steps", item) if args else steps
            if not 1 <= n <= steps:
                raise ValueError(
                    f"methods: {item!r}: expected a step count in [1, {steps}] (the evaluation's steps), got {n}."
                )
            methods.append(Method.dense(n, steps))
        elif head in selections and any("=" in a for a in args):
            methods.append(_keyword_method(head, args, item, steps))
        elif head in selections:
            if len(args) > 2:
                raise ValueError(f"methods: {item!r}: expected '{head}:KEEP_RATIO:START_STEP', e.g. '{head}:0.3:8'.")
            keep = _number(args[0], float, "a keep ratio", item) if args else DEFAULT_KEEP_RATIO
            start = _number(args[1], int, "an int start step", item) if len(args) > 1 else DEFAULT_START_STEP
            try:
                config = CATConfig(keep_ratio=keep, start_step=start, selection=selections[head])
            except (ValueError, TypeError) as exc:
                raise ValueError(f"methods: {item!r}: {exc}") from None
            methods.append(Method.catprune(config, steps))
        elif head == "dbcache":
            if len(args) > 1:
                raise ValueError(f"methods: {item!r}: expected 'dbcache' or 'dbcache:THRESHOLD', e.g. 'dbcache:0.08'.")
            threshold = _number(args[0], float, "a residual threshold", item) if args else 0.08
            methods.append(Method.dbcache(steps, threshold, warmup=min(DEFAULT_START_STEP, steps)))
        else:
            accepted = ", ".join(
                ["dense[:STEPS]", *(f"{s}[:KEEP:START]" for s in selections), "cat:KEY=VALUE:...", "dbcache[:THR]"]
            )
            raise ValueError(
                f"methods: unknown method {item!r}. Accepted: {accepted}, or a preset ({', '.join(PRESETS)})."
            )
    return _unique(methods)


def _keyword_method(head: str, args: list[str], item: str, steps: int) -> Method:
    """A catprune method of the keyword form (``cat:s=20:k=0.55:t=6:fd=2``)."""
    fields = keyword_fields(args, item)
    n = fields.pop("s", steps)
    if not isinstance(n, int) or not 2 <= n <= steps:
        raise ValueError(
            f"methods: {item!r}: s: expected an int step count in [2, {steps}] (the evaluation's), got {n!r}."
        )
    fields.setdefault("selection", head)
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(CATConfig)})
    if unknown:
        keys = ", ".join(["s", *SHORT_KEYS])
        raise ValueError(f"methods: {item!r}: unknown key {unknown[0]!r}; expected {keys} or a CATConfig field name.")
    try:
        config = CATConfig(**fields)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"methods: {item!r}: {exc}") from None
    return Method.catprune(config, n, reference_steps=steps)


def method_from_dict(data: dict) -> Method:
    """Rebuild a method from `Method.to_dict` (used when re-scoring a cached generation)."""
    config = data.get("config")
    if config is not None:
        config = dict(config)
        config["cluster_share_weights"] = tuple(config["cluster_share_weights"])
        config = CATConfig(**config)
    return Method(
        name=data["name"],
        kind=Kind(data["kind"]),
        steps=int(data["steps"]),
        group=data["group"],
        description=data["description"],
        config=config,
        peer=data.get("peer"),
    )


__all__ = [
    "GROUPS",
    "Kind",
    "Method",
    "PARETO_AT_28",
    "PRESETS",
    "QUICK_SELECTIONS",
    "default_methods",
    "estimated_macs_ratio",
    "matched_fewer_steps",
    "matched_steps",
    "method_from_dict",
    "parse_methods",
    "pareto_methods",
    "quick_methods",
]
