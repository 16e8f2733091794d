"""Word-level tokenizer over the closed vocabulary of the shapes caption grammar."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .world import CELLS, COLOURS, MAX_OBJECTS, SHAPES, SIZES, VOCABULARY, SceneBatch

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)


# Why SchedulerMixin: DiffusionPipeline.save_pretrained / from_pretrained only save and load components whose class
# derives from one of diffusers' LOADABLE_CLASSES, and transformers (home of PreTrainedTokenizer) is not a catprune
# dependency. SchedulerMixin is the one loadable base that stores a config json and nothing else, and it is not an
# nn.Module, so pipe.to(), pipe.device and pipe.dtype never see the tokenizer. It is never used as a scheduler.
class ShapesTokenizer(SchedulerMixin, ConfigMixin):
    """Split a caption into words and map them to ids: ``<bos> word ... <eos> <pad> ...`` (fixed length).

    Words are lower-cased and split on whitespace; every word must be in the vocabulary of the caption grammar
    (``a small red circle at the top left``), otherwise a ``ValueError`` lists the unknown words and the vocabulary.
    The empty prompt is valid (``<bos> <eos>``): it is the unconditional input of classifier-free guidance.

    Example:
        >>> tok = ShapesTokenizer()
        >>> batch = tok(["a small red circle at the top", ""])
        >>> batch["input_ids"].shape, batch["attention_mask"][1, :3].tolist()
        (torch.Size([2, 24]), [1, 1, 0])
    """

    config_name = "tokenizer_config.json"
    _compatibles = []
    #: Wording of the input errors; a tokenizer for another caption world (``ScenesTokenizer``) overrides these.
    world_name = "shapes"
    caption_hint = "Write captions like 'a small red circle at the top left' (two objects joined by ' and ')."
    max_objects_hint = "Use at most two objects."

    def vocabulary_hint(self) -> str:
        """The sentence of the unknown-word error that says which words exist (and where the list is)."""
        return f"The embedded {self.world_name} model knows only these words: {', '.join(self.vocabulary)}."

    @register_to_config
    def __init__(self, vocabulary: Sequence[str] = VOCABULARY, max_length: int = 24):
        words = list(vocabulary)
        if len(set(words)) != len(words) or set(words) & set(SPECIAL_TOKENS):
            raise ValueError(f"vocabulary must hold distinct words and none of {list(SPECIAL_TOKENS)}, got {words}.")
        if not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"max_length must be an int >= 3 (room for <bos>, a word and <eos>), got {max_length!r}.")
        self.tokens = list(SPECIAL_TOKENS) + words
        self.token_to_id = {token: i for i, token in enumerate(self.tokens)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self._scene_tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def vocabulary(self) -> list[str]:
        """The caption words (without the special tokens)."""
        return self.tokens[len(SPECIAL_TOKENS) :]

    def words(self, prompt: str) -> list[str]:
        """The words of a prompt (lower-cased, split on whitespace)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__} ({prompt!r}).")
        return prompt.lower().split()

    def check(self, prompts: str | Sequence[str], argument: str = "prompt") -> None:
        """Raise ``ValueError`` if a prompt has words outside the vocabulary or too many words.

        Example:
            >>> ShapesTokenizer().check("a small red dragon")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: prompt 'a small red dragon' has words outside the shapes vocabulary: ['dragon']. ...
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        limit = self.config.max_length - 2
        for prompt in prompts:
            words = self.words(prompt)
            unknown = sorted({w for w in words if w not in self.token_to_id or w in SPECIAL_TOKENS})
            if unknown:
                raise ValueError(
                    f"{argument} {prompt!r} has words outside the {self.world_name} vocabulary: {unknown}. "
                    f"{self.vocabulary_hint()} {self.caption_hint}"
                )
            if len(words) > limit:
                raise ValueError(
                    f"{argument} {prompt!r} has {len(words)} words; the {self.world_name} tokenizer takes at most "
                    f"{limit} (max_length={self.config.max_length} including <bos> and <eos>). {self.max_objects_hint}"
                )

    def __call__(self, prompts: str | Sequence[str], argument: str = "prompt") -> dict[str, torch.Tensor]:
        """Token ids and attention mask, each (B, max_length) long.

        ``argument`` names the caller's argument in error messages (e.g. ``negative_prompt``).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        self.check(prompts, argument)
        length = self.config.max_length
        ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)  # (B, L)
        for i, prompt in enumerate(prompts):
            row = [self.bos_token_id] + [self.token_to_id[w] for w in self.words(prompt)] + [self.eos_token_id]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def encode_scenes(self, scenes: SceneBatch, drop: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of the scenes' captions, built with tensor ops on the scenes' device.

        Gives the same result as ``self(scenes.captions)`` without building strings, so training can sample,
        caption and render on the GPU with no host round trip. Rows where ``drop`` (B,) is True get the empty
        caption (caption dropout for classifier-free guidance).

        Example:
            >>> from catprune.models.shapes.world import sample_scenes
            >>> tok, scenes = ShapesTokenizer(), sample_scenes(8, generator=0)
            >>> torch.equal(tok.encode_scenes(scenes)["input_ids"], tok(scenes.captions)["input_ids"])
            True
        """
        device = scenes.present.device
        t = self.token_to_id
        b = len(scenes)
        if device not in self._scene_tables:  # built once per device: a per-step copy would stall the GPU
            cell_words = [cell.split() + [PAD] * (2 - len(cell.split())) for cell in CELLS]
            self._scene_tables[device] = (
                torch.tensor([t[w] for w in SIZES], device=device),
                torch.tensor([t[w] for w in COLOURS], device=device),
                torch.tensor([t[w] for w in SHAPES], device=device),
                torch.tensor([[t[w] for w in words] for words in cell_words], device=device),  # (9, 2)
            )
        size_ids, colour_ids, shape_ids, cell_ids = self._scene_tables[device]

        def const(word: str) -> torch.Tensor:
            return torch.full((b, MAX_OBJECTS), t[word], device=device)

        words = torch.stack(
            [
                const("a"),
                size_ids[scenes.size],
                colour_ids[scenes.colour],
                shape_ids[scenes.shape],
                const("at"),
                const("the"),
                cell_ids[scenes.cell, 0],
                cell_ids[scenes.cell, 1],
                const("and"),
            ],
            dim=2,
        )  # (B, K, 9)
        valid = scenes.present.unsqueeze(2).expand(-1, -1, 9).clone()  # (B, K, 9)
        valid[:, :, 7] &= words[:, :, 7] != self.pad_token_id  # one-word cells
        joined = torch.zeros(b, MAX_OBJECTS, dtype=torch.bool, device=device)
        joined[:, :-1] = scenes.present[:, 1:]  # "and" after an object that another one follows
        valid[:, :, 8] &= joined
        return self._pack(words, valid, drop)  # (B, 1+9K) before packing

    def _pack(
        self, words: torch.Tensor, valid: torch.Tensor, drop: torch.Tensor | None, truncate: bool = False
    ) -> dict[str, torch.Tensor]:
        """``encode_scenes``'s result from per-object word ids and their validity, each (B, K, W): the valid words
        moved to the front after ``<bos>``, then ``<eos>`` and padding. Rows where ``drop`` (B,) is True keep only
        ``<bos>``. ``truncate`` cuts captions longer than ``max_length`` (else they fail)."""
        b, device = words.shape[0], words.device
        ids = torch.cat([torch.full((b, 1), self.bos_token_id, device=device), words.view(b, -1)], dim=1)
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=device), valid.view(b, -1)], dim=1)
        if drop is not None:
            valid[:, 1:] &= ~drop.view(b, 1)
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # valid tokens first, in order
        ids, valid = ids.gather(1, order), valid.gather(1, order)
        count = valid.sum(dim=1, keepdim=True)  # (B, 1), <bos> + words
        length = self.config.max_length
        keep = min(ids.shape[1], length) if truncate else ids.shape[1]
        out = torch.full((b, length), self.pad_token_id, dtype=torch.long, device=device)  # (B, L)
        out[:, :keep] = torch.where(valid, ids, torch.full_like(ids, self.pad_token_id))[:, :keep]
        out.scatter_(1, count.clamp(max=length - 1) if truncate else count, self.eos_token_id)
        positions = torch.arange(length, device=device).view(1, length)
        return {"input_ids": out, "attention_mask": (positions <= count).long()}

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Ids back to a caption (special tokens dropped).

        Example:
            >>> tok = ShapesTokenizer()
            >>> tok.decode(tok("a large blue square at the center")["input_ids"][0])
            'a large blue square at the center'
        """
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return " ".join(self.tokens[i] for i in ids if i >= len(SPECIAL_TOKENS))
