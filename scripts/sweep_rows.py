"""The rows of ``scripts/quality_sweep.py``: what each row runs, its name, the presets, and the row-spec language.

A row is dense at some step count, CAT Pruning with a `CATConfig` at some step count (fewer than the reference's
allowed: pruning combined with fewer steps), the planner's pick for a speed-up, or the oracle bound of the error
decomposition (``scripts/decompose_error.py``: the selected tokens get their exact dense outputs).

Row specs (``--rows``), comma-separated; ``KEY=VALUE`` items are separated by ``:``:

- ``dense:N``: the dense model with N steps;
- ``cat:k=0.3:t=8``: CAT Pruning; keys ``s`` (steps, default the reference's), ``k`` (keep_ratio), ``t``
  (start_step), ``ctx`` (context: ``reuse``, ``r``, ``extrapolate``, ``x``), ``cap`` (forecast_max_ratio, ``none``
  for uncapped), ``end`` (keep_ratio_end), ``rf`` (refresh_every), ``sel`` (selection), ``cd`` (cache_dtype:
  ``bf16``, ``fp16``, ``fp8``), ``fd`` (final_dense_steps), or any `CATConfig` field
  by its full name; unset fields keep the library defaults (today ``context="reuse"``, cap 0.5);
- ``plan:2``: what ``catprune.plan(pipe, speedup=2, num_inference_steps=REFERENCE)`` picks;
- ``oracle:k=0.3:t=8``: the decomposition's oracle bound at that keep ratio and start step (context reuse);
- a preset name: ``pareto`` (the quality-per-cost grid of docs/quality_per_cost.md).

Example:
    >>> [r.name for r in parse_rows("dense:15,cat:k=0.3:t=8:ctx=r,cat:s=20:k=0.5:t=6:ctx=x:cap=1,plan:2", 28)]
    ['dense-15', 'r-k0.3-t8', 'x1-k0.5-t6-s20', 'plan-2x']
"""

from __future__ import annotations

from dataclasses import dataclass

from catprune import CATConfig
from catprune.evaluation import specs
from catprune.evaluation.methods import PARETO_AT_28

#: the selection rule's knobs in row names (``-ms0.5`` = magnitude_share 0.5), so rows that differ only there differ
TUNING_KEYS = {
    "magnitude_share": "ms",
    "staleness_decay": "sd",
    "cluster_feature_weight": "cfw",
    "num_clusters": "nc",
    "kmeans_iters": "ki",
    "cluster_share_weights": "csw",
    "ras_starvation": "rs",
    "seed": "seed",
}

#: The quality-per-cost grid, in priority order (a time budget drops rows from the end).
PRESETS = {
    "pareto": (
        "dense:8,dense:9,dense:10,dense:12,dense:14,dense:15,dense:18,dense:20,dense:24",  # fewer dense steps
        "cat:k=0.3:t=8:ctx=r,cat:k=0.5:t=8:ctx=r",  # the paper (context reuse)
        "cat:k=0.3:t=8:ctx=x,cat:k=0.38:t=6:ctx=x,cat:k=0.4:t=5:ctx=x,cat:k=0.42:t=4:ctx=x,cat:k=0.5:t=8:ctx=x",  # forecast, MACs ~0.5 and 0.65
        "cat:k=0.36:t=5:ctx=x,cat:k=0.3:t=7:ctx=x",  # forecast just under MACs 0.5 (what the planner can pick for 2x)
        "cat:k=0.3:t=8:cap=1:ctx=x,cat:k=0.38:t=6:cap=1:ctx=x",  # forecast cap 1.0 (the library default is 0.5)
        "cat:k=0.5:t=8:end=0.15:ctx=x,cat:k=0.2:t=8:rf=7:ctx=x",  # keep-ratio schedule, refresh steps (MACs ~0.5)
        "cat:s=20:k=0.5:t=8:ctx=x",  # fewer steps and pruning (MACs ~0.5; s=20 k=0.5 t=6 with the mixes below)
        "cat:s=18:k=0.7:t=5:ctx=r",  # fewer steps and pruning with reuse (MACs ~0.54; s=20 k=0.6 t=6 below)
        "cat:k=0.2:t=4:ctx=x,cat:k=0.15:t=5:ctx=x,cat:s=18:k=0.3:t=5:ctx=x,cat:s=16:k=0.4:t=4:ctx=x,cat:s=14:k=0.5:t=4:ctx=x",  # MACs ~0.33
        ",".join(PARETO_AT_28),  # the mixes that measured best per cost (evaluation.methods.PARETO_AT_28)
        "plan:2,plan:3",  # the planner's picks
        "oracle:k=0.3:t=8",  # the decomposition's bound at the paper's operating point
    ),
}


@dataclass(frozen=True)
class Row:
    """One row: ``kind`` is dense, cat, plan or oracle; ``speedup`` only for plan rows."""

    name: str
    kind: str
    steps: int
    config: CATConfig | None = None
    speedup: float | None = None

    @property
    def method(self) -> str:
        """dense, cat-reuse, cat-forecast (context extrapolate), planner or oracle."""
        if self.kind == "cat":
            return "cat-reuse" if self.config.context.value == "reuse" else "cat-forecast"
        return {"plan": "planner"}.get(self.kind, self.kind)


def _num(text: str) -> str:
    return f"{float(text):g}"


def row_name(steps: int, config: CATConfig | None, reference: int) -> str:
    """The name of a dense or CAT row, from what it runs.

    ``r`` / ``x`` = context reuse / extrapolate (``x1``: forecast cap 1, ``xnocap``: uncapped, ``x`` = the default
    cap 0.5), ``k`` keep ratio (``k0.5e0.15``: schedule to 0.15), ``t`` start step, ``rf`` refresh period, ``fd``
    final dense steps, the selection rule and its knobs when not the defaults (`TUNING_KEYS`), ``s`` steps when not
    the reference's, then the cache dtype when set (``-fp8``).

    Example:
        >>> row_name(20, CATConfig(keep_ratio=0.5, keep_ratio_end=0.15, refresh_every=7), 28)
        'r-k0.5e0.15-t8-rf7-s20'
        >>> row_name(20, CATConfig(keep_ratio=0.4, keep_ratio_end=0.8, final_dense_steps=2), 28)
        'r-k0.4e0.8-t8-fd2-s20'
        >>> row_name(28, CATConfig(magnitude_share=0.5, cluster_share_weights=(2, 1)), 28)
        'r-k0.3-t8-ms0.5-csw2/1'
    """
    if config is None:
        return f"dense-{steps}"
    c, default = config, CATConfig()
    tag = "r" if c.context.value == "reuse" else "x"
    if tag == "x" and c.forecast_max_ratio != default.forecast_max_ratio:
        tag += "nocap" if c.forecast_max_ratio is None else f"{c.forecast_max_ratio:g}"
    name = f"{tag}-k{c.keep_ratio:g}" + (f"e{c.keep_ratio_end:g}" if c.keep_ratio_end is not None else "")
    name += f"-t{c.start_step}" + (f"-rf{c.refresh_every}" if c.refresh_every is not None else "")
    name += f"-fd{c.final_dense_steps}" if c.final_dense_steps else ""
    if c.selection.value != "cat":
        name += f"-{c.selection.value}"
    for field, short in TUNING_KEYS.items():  # the selection rule's knobs, when not the defaults
        value = getattr(c, field)
        if value != getattr(default, field):
            name += f"-{short}{'/'.join(f'{v:g}' for v in value) if isinstance(value, tuple) else f'{value:g}'}"
    name += f"-s{steps}" if steps != reference else ""
    return name + (f"-{c.cache_dtype.value}" if c.cache_dtype is not None else "")


def _fields(items: list[str], item: str) -> dict:
    return specs.keyword_fields(items, item, who="rows")


def _config(fields: dict, item: str) -> CATConfig:
    try:
        return CATConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rows: {item!r}: {exc}") from None


def parse_rows(spec: str, reference: int) -> list[Row]:
    """Rows of a comma-separated spec (see the module docstring), duplicates dropped, order kept."""
    rows: list[Row] = []
    for item in (i.strip() for i in spec.split(",")):
        if not item:
            continue
        if item in PRESETS:
            rows += parse_rows(",".join(PRESETS[item]), reference)
            continue
        head, *rest = item.split(":")
        if head == "dense" and len(rest) == 1:
            rows.append(Row(f"dense-{int(rest[0])}", "dense", int(rest[0])))
        elif head == "plan" and len(rest) == 1:
            rows.append(Row(f"plan-{_num(rest[0])}x", "plan", reference, speedup=float(rest[0])))
        elif head in ("cat", "oracle"):
            fields = _fields(rest, item)
            steps = int(fields.pop("s", reference))
            if head == "oracle":
                fields.setdefault("context", "reuse")
            config = _config(fields, item)
            name = row_name(steps, config, reference)
            rows.append(Row(f"oracle-{name.split('-', 1)[1]}" if head == "oracle" else name, head, steps, config))
        else:
            raise ValueError(
                f"rows: unknown item {item!r}; expected dense:N, cat:KEY=VALUE:..., plan:SPEEDUP, "
                f"oracle:KEY=VALUE:... or a preset ({', '.join(PRESETS)})."
            )
    unique: dict[str, Row] = {}
    for row in rows:
        unique.setdefault(row.name, row)
    return list(unique.values())


def legacy_rows(reference: int = 28) -> dict[str, Row]:
    """The named rows docs/quality_per_cost.md's 8-prompt tables were measured with (``--only``). ``x`` rows pin
    ``forecast_max_ratio=1.0`` (the best cap on shapes); ``cat-x5-0.3`` is the forecast with the default cap 0.5."""
    table: dict[str, tuple[int, CATConfig | None]] = {f"dense-{n}": (n, None) for n in (8, 12, 15, 20)}
    x = dict(context="extrapolate", forecast_max_ratio=1.0)
    for keep in (0.2, 0.3, 0.4, 0.5):
        table[f"cat-r-{keep}"] = (reference, CATConfig(keep_ratio=keep, start_step=8, context="reuse"))
        table[f"cat-x-{keep}"] = (reference, CATConfig(keep_ratio=keep, start_step=8, **x))
    table["cat-x-0.33"] = (reference, CATConfig(keep_ratio=0.33, start_step=8, **x))
    for context, tag in (("extrapolate", "x"), ("reuse", "r")):  # schedules and refreshes at MACs ~0.5
        cap = dict(context=context, forecast_max_ratio=1.0)
        table[f"cat-{tag}-0.5to0.15"] = (reference, CATConfig(keep_ratio=0.5, keep_ratio_end=0.15, **cap))
        table[f"cat-{tag}-0.2-refresh7"] = (reference, CATConfig(keep_ratio=0.2, refresh_every=7, **cap))
    table["cat-x-0.15to0.5"] = (reference, CATConfig(keep_ratio=0.15, keep_ratio_end=0.5, **x))
    for keep, start in ((0.3, 6), (0.38, 6), (0.25, 10), (0.2, 11), (0.4, 5), (0.42, 4), (0.35, 7)):  # start vs keep
        for context, tag in (("extrapolate", "x"), ("reuse", "r")):
            config = CATConfig(keep_ratio=keep, start_step=start, context=context, forecast_max_ratio=1.0)
            table[f"cat-{tag}-{keep}-start{start}"] = (reference, config)
    table["cat-x5-0.3"] = (reference, CATConfig(keep_ratio=0.3, start_step=8, context="extrapolate"))  # cap 0.5
    return {name: Row(name, "dense" if c is None else "cat", s, c) for name, (s, c) in table.items()}


__all__ = ["PRESETS", "Row", "legacy_rows", "parse_rows", "row_name"]
