"""Batches and shards.

A run is cut into *batches* once, from the prompt file alone: items are grouped by their per-item settings
(steps, guidance scale, negative prompt; items of different groups never share a pipeline call), and each group is
cut, in file order, into chunks of ``--batch-size``. The batches do not depend on the number of processes or on what
a previous run already wrote, so every image is computed in exactly the same pipeline call (same batch composition,
same per-item generators) whether the run is split over 1 or 64 processes, interrupted and resumed or not: the
output bytes are the same.

Sharding happens on the batches still to do: pending batch ``j`` goes to rank ``j % world_size``. Ranks then work
in lock-step *rounds* (round ``r`` is pending batches ``r * world_size .. r * world_size + world_size - 1``), which
lets them agree on progress counts at round boundaries with one cheap collective.
"""

from __future__ import annotations

from dataclasses import dataclass

from .prompts import Item


@dataclass(frozen=True)
class Batch:
    """Items generated together in one pipeline call, with the settings they share."""

    index: int  # position in the run's batch list (stable for a given prompt file and --batch-size)
    items: tuple[Item, ...]
    steps: int
    guidance_scale: float | None
    negative_prompt: str | None


def make_batches(items: list[Item], batch_size: int, steps: int, guidance_scale: float | None) -> list[Batch]:
    """Group ``items`` by settings and cut each group into batches of at most ``batch_size``, ordered by their
    first item's position in the file.

    Example:
        >>> from catprune.batch.prompts import Item
        >>> items = [Item(i, i + 1, str(i), "p", 0, num_inference_steps=s) for i, s in enumerate([None, 4, None, None])]
        >>> [([it.id for it in b.items], b.steps) for b in make_batches(items, batch_size=2, steps=28, guidance_scale=None)]
        [(['0', '2'], 28), (['1'], 4), (['3'], 28)]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size: expected an int >= 1 (items per pipeline call), got {batch_size!r}.")
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault(item.settings_key(steps, guidance_scale), []).append(item)
    chunks = []
    for key, members in groups.items():
        for start in range(0, len(members), batch_size):
            chunks.append((key, tuple(members[start : start + batch_size])))
    chunks.sort(key=lambda chunk: chunk[1][0].index)
    return [
        Batch(index=i, items=members, steps=key[0], guidance_scale=key[1], negative_prompt=key[2])
        for i, (key, members) in enumerate(chunks)
    ]


def shard(pending: list[Batch], rank: int, world_size: int) -> list[Batch | None]:
    """The batches of ``rank``, one entry per round (``None`` in a round where this rank has none), so that every rank
    walks the same number of rounds.

    Example:
        >>> shard(list("abcde"), rank=1, world_size=2)
        ['b', 'd', None]
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world size {world_size}, got {rank}.")
    rounds = -(-len(pending) // world_size)
    return [pending[r * world_size + rank] if r * world_size + rank < len(pending) else None for r in range(rounds)]
