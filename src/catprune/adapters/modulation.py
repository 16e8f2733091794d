"""The modulation vectors of a step: every adaptive norm's ``Linear(SiLU(temb))``, computed in the step or read
from rows the runtime computed for several steps at once.

Why: the shifts, scales and gates of an MMDiT's adaptive layer norms depend on the step's timestep and pooled text
(and Flux's guidance) only, never on the tokens. Computed in the step, they are one GEMV per norm over the batch's
2 rows, and those GEMVs read all of the norms' weights every step: SD3-medium's 47 norms read 1.3 GB (0.47 ms on an
H200), SD3.5-large's 75 read 5.3 GB, FLUX.1-dev's 77 read 6.5 GB. Computed for several steps at once, the weights
are read once for all of them (docs/design.md decision 40).

`Modulations` is the adapter's half: which linears, their concatenated outputs for N rows of step inputs, and the
per-step lookup (`Conditioning`) the block code reads them through. The runtime's half (which steps, from which
timesteps) is `catprune.runtime.modulation`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .ops import modulate


class Conditioning:
    """One step's modulation inputs as the block code reads them: ``cond(linear)`` is ``linear(SiLU(temb))``,
    computed here from ``temb`` or, when the runtime passed precomputed rows, a view of them.

    Example:
        >>> lin = torch.nn.Linear(2, 4)
        >>> cond = Conditioning(temb=torch.zeros(1, 2))
        >>> torch.equal(cond(lin), lin(torch.zeros(1, 2)))
        True
    """

    def __init__(self, temb: torch.Tensor | None = None, outputs: dict[int, torch.Tensor] | None = None):
        self.act = F.silu(temb) if temb is not None else None  # every norm's SiLU of the same temb: once
        self.outputs = outputs

    def handed(self) -> tuple[torch.Tensor, ...]:
        """The tensors the step computed here that a second CUDA stream reads (`Lanes.fork`): SiLU(temb), if any."""
        return () if self.act is None else (self.act,)

    def __call__(self, linear: torch.nn.Linear, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``linear``'s output (N, out_features); ``dtype``: cast SiLU(temb) first (AdaLayerNormContinuous does)."""
        if self.outputs is not None:
            return self.outputs[id(linear)]
        return linear(self.act if dtype is None else self.act.to(dtype))

    def continuous_norm(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """diffusers' ``AdaLayerNormContinuous(x, temb)`` (B, N, D): its linear's (scale, shift) over SiLU(temb)
        cast to x's dtype, applied as one fused modulation."""
        scale, shift = self(norm.linear, x.dtype).chunk(2, dim=1)
        return modulate(norm.norm(x), shift, scale)  # CAT: fused modulation


class Modulations:
    """The modulation linears of a model, in a fixed order, and the step-embedding function before them.

    ``linears``: every ``Linear`` whose input is SiLU(temb); ``embed(*inputs) -> temb (N, D)``: the model's step
    embedding from the step inputs named ``inputs``, in that order (e.g. timestep and pooled text).
    """

    def __init__(self, linears: list[torch.nn.Linear], embed: Callable[..., torch.Tensor], inputs: tuple[str, ...]):
        self.linears = list(linears)
        self.embed = embed
        self.inputs = inputs  # the step inputs the embedding reads ("timestep" first)
        self.widths = [lin.out_features for lin in self.linears]
        self._ids = [id(lin) for lin in self.linears]

    def _embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.embed(*(inputs.get(name) for name in self.inputs))  # (N, D)

    def rows(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Every linear's output for N rows of step inputs, concatenated: (N, W). One GEMM per linear, whatever N."""
        act = F.silu(self._embed(inputs))  # (N, D)
        return torch.cat([lin(act) for lin in self.linears], dim=1)  # (N, W)

    def conditioning(self, modulation: torch.Tensor | None, **inputs: torch.Tensor) -> Conditioning:
        """The block code's `Conditioning` of one step: the precomputed (B, W) ``modulation`` row if given, else the
        step embedding of ``inputs``."""
        if modulation is None:
            return Conditioning(temb=self._embed(inputs))
        return Conditioning(outputs=dict(zip(self._ids, modulation.split(self.widths, dim=1), strict=True)))
