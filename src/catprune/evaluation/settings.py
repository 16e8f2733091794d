"""What an evaluation generates: `EvalSettings` (model, prompts, seeds, steps, how the pipeline is called).

Example:
    >>> settings = EvalSettings(num_prompts=200, steps=28)  # the scenes model (the default)
    >>> settings.folder_name(), reference_name(settings)
    ('scenes-p200-s28-seed0', 'dense-28')
    >>> EvalSettings(model="shapes", num_prompts=20, steps=8).folder_name()  # the fast embedded model
    'shapes-p20-s8-seed0'
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from ..models import DEFAULT_MODEL
from . import registry


@dataclass(frozen=True)
class EvalSettings:
    """What an evaluation generates: model, prompts, seeds, steps and how the pipeline is called.

    Fields:

    - ``model`` (str, default "scenes"): a registered model (see `catprune.evaluation.registry`: "scenes", the
      default, and "shapes", the fast alternative, are the embedded models) or a hub id / local pipeline folder.
    - ``num_prompts`` (int, default 200): prompts used (the first ``num_prompts`` of the prompt list).
    - ``prompt_seed`` (int or None, default None): seed of the model's prompt generator; None is the model's
      held-out set (`EvalModel.held_out_seed`: 20000 for shapes, 30000 for scenes). Ignored when ``prompts_file``
      is given.
    - ``prompts_file`` (str or None): a text file with one prompt per line (required for models without a prompt
      generator, e.g. hub models).
    - ``steps`` (int, default 28): denoising steps of the reference (dense) run.
    - ``seed`` (int, default 0): image ``j`` uses a generator seeded ``seed + j``, the same for every method.
    - ``guidance_scale`` (float or None): None uses the pipeline's default.
    - ``height``, ``width`` (int or None): None uses the pipeline's default.
    - ``batch_size`` (int, default 8): prompts per pipeline call (images do not depend on it up to float noise).
    - ``device`` (str, default "cpu"), ``dtype`` (str, default "float32").

    Example:
        >>> EvalSettings(num_prompts=20, steps=8, guidance_scale=4.0).folder_name()
        'scenes-p20-s8-seed0-g4'
    """

    model: str = DEFAULT_MODEL
    num_prompts: int = 200
    prompt_seed: int | None = None
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
        elif self.prompt_seed is not None and self.prompt_seed != self.eval_model.held_out_seed:
            parts.append(f"ps{self.prompt_seed}")
        if self.guidance_scale is not None:
            parts.append(f"g{self.guidance_scale:g}")
        if self.height is not None or self.width is not None:
            parts.append(f"{self.height or 'H'}x{self.width or 'W'}")
        if self.dtype != "float32":
            parts.append(self.dtype)
        return "-".join(str(p) for p in parts)

    @property
    def eval_model(self) -> registry.EvalModel:
        """The model's evaluation plug-in (loader, prompt generator, adherence scorer)."""
        return registry.resolve(self.model)

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
        generator = self.eval_model.prompts
        if generator is None:
            raise ValueError(
                f"EvalSettings.prompts_file: the model {self.model!r} has no held-out prompt set (registered: "
                f"{', '.join(registry.registered())}), so a prompt file is needed (one prompt per line). Pass "
                "--prompts FILE."
            )
        seed = self.prompt_seed if self.prompt_seed is not None else self.eval_model.held_out_seed
        return list(generator(self.num_prompts, 0 if seed is None else seed))

    def image_key(self) -> dict:
        """The fields that determine the images (a change invalidates the generation cache)."""
        d = dataclasses.asdict(self)
        for timing_only in ("batch_size",):
            d.pop(timing_only)
        return d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def reference_name(settings: EvalSettings) -> str:
    """The name of the reference method (dense at the evaluation's step count)."""
    return f"dense-{settings.steps}"


def set_call_kwargs(**values) -> dict:
    """The pipeline-call keyword arguments among ``values`` that are set: None leaves the pipeline's default.

    Example:
        >>> set_call_kwargs(guidance_scale=None, height=64, width=None)
        {'height': 64}
    """
    return {name: value for name, value in values.items() if value is not None}


__all__ = ["EvalSettings", "reference_name", "set_call_kwargs"]
