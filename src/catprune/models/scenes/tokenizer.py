"""Word-level tokenizer over the closed vocabulary of the scenes caption grammar (``ShapesTokenizer`` reused)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.configuration_utils import register_to_config

# SchedulerMixin is imported for diffusers' loader: DiffusionPipeline.from_pretrained looks the loadable base classes
# up as attributes of the component's module (see ShapesTokenizer for why the tokenizer is a SchedulerMixin).
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from ..shapes.tokenizer import PAD, ShapesTokenizer
from ..shapes.world import CELLS
from .world import GRAMMAR_WORDS, OBJECT_NAMES, VOCABULARY, SceneBatch, article


class ScenesTokenizer(ShapesTokenizer):
    """``ShapesTokenizer`` over the scenes vocabulary: ``<bos> word ... <eos> <pad> ...`` (32 ids by default).

    Unknown words raise a ``ValueError`` that lists them and says where the vocabulary is; the empty prompt is the
    unconditional input of classifier-free guidance.

    Example:
        >>> tok = ScenesTokenizer()
        >>> tok.decode(tok("an owl at the top left and a delivery truck at the center")["input_ids"][0])
        'an owl at the top left and a delivery truck at the center'
    """

    world_name = "scenes"
    caption_hint = (
        "Write captions like 'an owl at the top left and a delivery truck at the center' (1 to 3 objects joined by "
        "' and ')."
    )
    max_objects_hint = "Use at most three objects."

    @register_to_config
    def __init__(self, vocabulary: Sequence[str] = VOCABULARY, max_length: int = 32):
        super().__init__(vocabulary=vocabulary, max_length=max_length)

    def vocabulary_hint(self) -> str:
        return (
            f"The embedded scenes model knows the words {', '.join(GRAMMAR_WORDS)}, the cell words of "
            f"{', '.join(CELLS)}, and the words of its {len(OBJECT_NAMES)} object names, listed in "
            "catprune.models.scenes.OBJECT_NAMES (file catprune/models/scenes/atlas/atlas.json)."
        )

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._scene_tables:  # built once per device: a per-step copy would stall the GPU
            t = self.token_to_id
            width = max(len(n.split()) for n in OBJECT_NAMES) + 1
            rows = [[t[article(n)]] + [t[w] for w in n.split()] for n in OBJECT_NAMES]
            names = torch.tensor([r + [t[PAD]] * (width - len(r)) for r in rows], device=device)  # (N, 1 + words)
            cells = torch.tensor(
                [[t[w] for w in c.split()] + [t[PAD]] * (2 - len(c.split())) for c in CELLS], device=device
            )  # (9, 2)
            self._scene_tables[device] = (names, cells)
        return self._scene_tables[device]

    def encode_scenes(self, scenes: SceneBatch, drop: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of the scenes' captions, built with tensor ops on the scenes' device.

        Same result as ``self(scenes.captions)`` without building strings (no host round trip in training). Rows
        where ``drop`` (B,) is True get the empty caption (caption dropout for classifier-free guidance).

        Example:
            >>> from catprune.models.scenes.world import sample_scenes
            >>> tok, scenes = ScenesTokenizer(), sample_scenes(8, generator=0)
            >>> torch.equal(tok.encode_scenes(scenes)["input_ids"], tok(scenes.captions)["input_ids"])
            True
        """
        device = scenes.present.device
        t = self.token_to_id
        names, cells = self._tables(device)
        b, k = scenes.obj.shape

        def const(word: str) -> torch.Tensor:
            return torch.full((b, k, 1), t[word], device=device)

        words = torch.cat(
            [names[scenes.obj], const("at"), const("the"), cells[scenes.cell], const("and")], dim=2
        )  # (B, K, W)
        valid = (words != self.pad_token_id) & scenes.present.unsqueeze(2)  # (B, K, W)
        joined = torch.zeros(b, k, dtype=torch.bool, device=device)
        joined[:, :-1] = scenes.present[:, 1:]  # "and" after an object that another one follows
        valid[:, :, -1] &= joined
        return self._pack(words, valid, drop, truncate=True)
