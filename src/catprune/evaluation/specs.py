"""The keyword language of CAT method specs, shared by ``catprune eval --methods`` (`methods.parse_methods`) and
``scripts/quality_sweep.py --rows``: ``KEY=VALUE`` items with short keys for the common `CATConfig` fields.

Example:
    >>> keyword_fields(["s=20", "k=0.55", "fd=2"], "cat:s=20:k=0.55:fd=2")
    {'s': 20, 'keep_ratio': 0.55, 'final_dense_steps': 2}
"""

from __future__ import annotations

#: short keys of the keyword form -> CATConfig fields (``s``, the steps, is the method's, not the config's)
SHORT_KEYS = {
    "k": "keep_ratio",
    "t": "start_step",
    "ctx": "context",
    "cap": "forecast_max_ratio",
    "end": "keep_ratio_end",
    "rf": "refresh_every",
    "sel": "selection",
    "cd": "cache_dtype",
    "fd": "final_dense_steps",
}
#: short context values of the keyword form
CONTEXTS = {"r": "reuse", "x": "extrapolate"}


def keyword_value(text: str):
    """A keyword-form value: ``none`` -> None, then int, float, a short context, or the text itself.

    Example:
        >>> [keyword_value(v) for v in ("none", "3", "0.5", "x", "fp8")]
        [None, 3, 0.5, 'extrapolate', 'fp8']
    """
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return CONTEXTS.get(text, text)


def keyword_fields(items: list[str], spec: str, who: str = "methods") -> dict:
    """``KEY=VALUE`` items as CATConfig field names (``s`` kept as the steps); ValueError naming ``who`` and the
    item.

    Example:
        >>> keyword_fields(["s=20", "k=0.5", "ctx=x", "cap=1"], "cat:...")
        {'s': 20, 'keep_ratio': 0.5, 'context': 'extrapolate', 'forecast_max_ratio': 1.0}
    """
    fields = {}
    for part in items:
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{who}: {spec!r}: expected KEY=VALUE items (e.g. 'k=0.3'), got {part!r}.")
        fields[SHORT_KEYS.get(key.strip(), key.strip())] = keyword_value(value.strip())
    if isinstance(fields.get("forecast_max_ratio"), int):
        fields["forecast_max_ratio"] = float(fields["forecast_max_ratio"])
    return fields


__all__ = ["CONTEXTS", "SHORT_KEYS", "keyword_fields", "keyword_value"]
