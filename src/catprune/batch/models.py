"""What a batch run generates with: any pipeline `catprune.load_pipeline` loads, or a random-weight benchmark
preset (``random:<preset>``, e.g. ``random:sd3-medium``) for speed measurements without downloads.

A random preset has no text encoders (see `catprune.bench`): each prompt becomes random prompt embeddings seeded
from a hash of its text, so the same prompt always gets the same embeddings, alone or in any batch.
"""

from __future__ import annotations

import hashlib

import torch

RANDOM_PREFIX = "random:"


def _text_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)


class PromptEncoder:
    """Keyword arguments of one pipeline call for a list of prompts (plain text for a real pipeline)."""

    def __call__(self, prompts: list[str], negative_prompt: str | None) -> dict:
        kwargs = {"prompt": list(prompts)}
        if negative_prompt is not None:
            kwargs["negative_prompt"] = negative_prompt
        return kwargs


class RandomEmbeddingEncoder(PromptEncoder):
    """Per-prompt random embeddings in the layout of a bench preset's family (batch-independent)."""

    def __init__(self, pipe, entry, device, dtype):
        from catprune.bench.families import family_of

        self.pipe, self.entry, self.device, self.dtype = pipe, entry, device, dtype
        self.family = family_of(entry)

    def __call__(self, prompts: list[str], negative_prompt: str | None) -> dict:
        rows = [
            self.family.inputs(
                self.pipe, self.entry, 1, self.family.cfg_default, self.device, self.dtype, _text_seed(p)
            )
            for p in prompts
        ]
        kwargs = {}
        for key, value in rows[0].items():
            if isinstance(value, torch.Tensor):
                kwargs[key] = torch.cat([row[key] for row in rows], dim=0)  # (B, ...) one row per prompt
            else:
                kwargs[key] = value
        return kwargs


def load_generation_model(name: str, device, dtype):
    """``(pipe, encoder)`` for ``--model name``: ``random:<preset>`` builds the bench preset with random weights,
    anything else goes through `catprune.load_pipeline` (``scenes``, ``shapes``, a hub id, a local folder).

    Example:
        >>> pipe, encode = load_generation_model("random:sd3-tiny", "cpu", torch.float32)  # doctest: +SKIP
        >>> sorted(encode(["a cat"], None))[:2]  # doctest: +SKIP
        ['guidance_scale', 'negative_pooled_prompt_embeds']
    """
    if name.startswith(RANDOM_PREFIX):
        from catprune.bench import build_pipeline

        preset = name[len(RANDOM_PREFIX) :]
        try:
            pipe, entry = build_pipeline(preset, device, dtype)
        except ValueError as exc:
            raise ValueError(f"--model: {exc} Use --model random:<preset>, e.g. random:sd3-medium.") from exc
        return pipe, RandomEmbeddingEncoder(pipe, entry, device, dtype)
    from catprune.models import load_pipeline

    return load_pipeline(name, device=device, dtype=dtype), PromptEncoder()
