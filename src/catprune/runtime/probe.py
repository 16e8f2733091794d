"""The diffusers pipeline conventions the runtime relies on, in one place."""

from __future__ import annotations

import weakref

import torch

from ..config import CFGMode
from .contract import CallInfo


class PipelineProbe:
    """What the runtime reads from the pipeline it was applied to (nothing when applied to a bare transformer).

    - ``step_index``: diffusers schedulers set it to None in ``set_timesteps`` and count it up in ``step``, so it is
      None at the first transformer call of every generation.
    - ``cfg_batch``: whether a batch is ``[unconditional rows; conditional rows]`` of classifier-free guidance, read
      from ``do_classifier_free_guidance`` or, for pipelines that keep that decision in a local variable
      (PixArtSigmaPipeline), from the two halves of the latents being equal.

    The pipeline is held weakly: the runtime hangs off the transformer, which the pipeline owns.

    Example:
        >>> PipelineProbe(None).step_index()
        (False, None)
    """

    def __init__(self, pipe=None):
        self._pipe = weakref.ref(pipe) if pipe is not None else None

    @property
    def pipe(self):
        """The pipeline, or None (applied to a bare transformer, or the pipeline was garbage-collected)."""
        return self._pipe() if self._pipe is not None else None

    def step_index(self) -> tuple[bool, int | None]:
        """(whether the pipeline's scheduler tracks a step index, its value)."""
        scheduler = getattr(self.pipe, "scheduler", None)
        if scheduler is None or not hasattr(type(scheduler), "step_index"):
            return False, None
        return True, scheduler.step_index

    def _schedule(self):
        """``scheduler.timesteps`` as the scheduler holds it (a tensor, array or list), None without a pipeline."""
        return getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)

    def timesteps(self) -> torch.Tensor | None:
        """The pipeline scheduler's timesteps of the current generation (``scheduler.timesteps``), or None."""
        timesteps = self._schedule()
        return timesteps if isinstance(timesteps, torch.Tensor) else None

    def num_steps(self) -> int | None:
        """Inference steps of the current generation (``len(scheduler.timesteps)``), None without a pipeline."""
        timesteps = self._schedule()
        return len(timesteps) if timesteps is not None else None

    def cfg_batch(self, info: CallInfo) -> bool:
        """Whether this call's batch is a CFG batch (CFGMode.AUTO); False without a pipeline or with an odd batch.

        May cost one host sync per generation (the latent halves comparison).
        """
        pipe, batch = self.pipe, info.batch
        if pipe is None or batch % 2:
            return False
        flag = getattr(pipe, "do_classifier_free_guidance", None)
        if flag is not None:
            return bool(flag)
        x = info.arguments.get("hidden_states")
        return isinstance(x, torch.Tensor) and torch.equal(x[: batch // 2], x[batch // 2 :])

    def shared_rows(self, mode: CFGMode, info: CallInfo) -> bool:
        """Whether the CFG rows of one sample share a selection under ``mode``; ValueError if ``shared`` is asked
        of an odd batch."""
        if mode is CFGMode.PER_ROW:
            return False
        if mode is CFGMode.AUTO:
            return self.cfg_batch(info)
        if info.batch % 2:
            raise ValueError(
                f"CATConfig.cfg: 'shared' expects an even batch [unconditional rows, conditional rows], got "
                f"{info.batch} rows. Use cfg='per_row' or cfg='auto'."
            )
        return True
