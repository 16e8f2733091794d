"""Batch generation: a prompt file into a directory of images, resumable, sharded over torch.distributed ranks.

Modules: `prompts` (prompt files), `plan` (batches and shards), `io` (atomic files), `dist` (torch.distributed
glue), `progress`, `models` (pipelines and random-weight presets), `runner` (`run_batch`). The command line is
``catprune generate --prompts FILE --out DIR`` (`catprune.cli.batch_cmd`).

Example:
    >>> from catprune.batch import BatchOptions, run_batch
    >>> run_batch(BatchOptions(prompts="prompts.txt", out="images", steps=4, start_step=2))  # doctest: +SKIP
"""

from .dist import DistContext
from .plan import Batch, make_batches, shard
from .prompts import Item, PromptFileError, derive_seed, read_prompts
from .runner import BatchOptions, RunSummary, item_done, run_batch

__all__ = [
    "Batch",
    "BatchOptions",
    "DistContext",
    "Item",
    "PromptFileError",
    "RunSummary",
    "derive_seed",
    "item_done",
    "make_batches",
    "read_prompts",
    "run_batch",
    "shard",
]
