"""A generation's modulation rows: the adapter's modulation vectors (every adaptive norm's ``Linear(SiLU(temb))``,
`Adapter.modulation_rows`) computed for several steps at once and handed to each full-selection or pruned step as
its ``modulation`` input, so that a step reads none of the modulation weights (docs/design.md decision 40).

Which rows: at the scheduler's step i, the rows of steps i .. i + chunk - 1 are computed in one call: step i's from
the call's own timestep, the later ones from ``scheduler.timesteps`` through `Adapter.scheduled_timesteps` (how the
family's pipelines turn a scheduler timestep into the transformer's input). The other inputs (pooled text,
guidance) are the call's own; a later call whose inputs are other tensors, or were written in place, gets its rows
computed anew. Without a pipeline scheduler every step computes its own row (chunk 1).

Checks: once per generation the call's timestep is compared with the scheduled one (one host sync); if they
differ, every step computes its own row. The timestep each later step receives is also compared on the device with
the one its row was computed for; that comparison is read one chunk later without a host sync, and a mismatch is
reported as a warning naming the steps, after which every step computes its own row.
"""

from __future__ import annotations

import warnings

import torch

from .contract import Adapter, CallInfo
from .probe import PipelineProbe


def _source(t: torch.Tensor | None) -> tuple | None:
    """What identifies a step input between calls without reading it: its memory, layout and version counter."""
    if t is None:
        return None
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t._version)


class ModulationRows:
    """The modulation rows of one generation, ``chunk`` steps at a time; see the module docstring.

    ``row(inputs, info)`` returns the (B, W) row of the current step from the step's `Adapter.fast_inputs`.
    """

    def __init__(self, adapter: Adapter, probe: PipelineProbe, chunk: int):
        self.adapter, self.probe, self.chunk = adapter, probe, chunk
        self.rows: torch.Tensor | None = None  # (n * B, W) the rows of steps first .. first + n - 1
        self.timesteps: torch.Tensor | None = None  # (n * B,) the timesteps they were computed for
        self.seen: torch.Tensor | None = None  # (n * B,) the timesteps the steps received
        self.first, self.count, self.used, self.sources = 0, 0, 0, None
        self.scheduled: bool | None = None  # whether calls follow the scheduler (None: not checked yet)
        self._pending = None  # (event or None, flag tensor, steps) of the last comparison not yet read
        self._most = 0

    def nbytes(self) -> int:
        """The most bytes this generation's rows (and their timesteps) have held at once."""
        return self._most

    def _held(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.timesteps, self.seen) if t is not None)

    def row(self, inputs: dict[str, torch.Tensor], info: CallInfo) -> torch.Tensor:
        names = self.adapter.modulation_inputs
        b, timestep = info.batch, inputs[names[0]]
        sources = tuple(_source(inputs.get(name)) for name in names[1:])
        _, index = self.probe.step_index()
        self._read_pending()
        j = index - self.first if index is not None else -1
        if self.rows is not None and 0 <= j < self.count and sources == self.sources:
            self.seen[j * b : (j + 1) * b].copy_(timestep)  # checked against the row's timestep at the next chunk
            self.used = max(self.used, j + 1)
            return self.rows[j * b : (j + 1) * b]  # (B, W)
        self._compare()
        timesteps = self._timesteps(timestep, index, info)  # (n * B,)
        n = timesteps.shape[0] // b
        others = {name: inputs[name] for name in names[1:] if inputs.get(name) is not None}
        batched = {name: x.repeat(n, *[1] * (x.dim() - 1)) for name, x in others.items()}  # (n * B, ...)
        self.rows = self.adapter.modulation_rows(**{names[0]: timesteps}, **batched)  # (n * B, W)
        self.timesteps, self.seen = timesteps, timesteps.clone()
        self._most = max(self._most, self._held())
        self.first, self.count, self.used, self.sources = index if index is not None else -1, n, 1, sources
        return self.rows[:b]

    def _timesteps(self, timestep: torch.Tensor, index: int | None, info: CallInfo) -> torch.Tensor:
        """The timesteps of the next rows: this call's, then the scheduler's next ones while they are trusted."""
        schedule = self.probe.timesteps()
        if index is None or schedule is None or self.chunk <= 1 or self.scheduled is False:
            return timestep
        later = schedule[index : index + self.chunk].to(timestep.device)
        scheduled = self.adapter.scheduled_timesteps(later, info).to(timestep.dtype)  # (n, B)
        if self.scheduled is None:  # once per generation: does the pipeline pass the scheduler's timesteps?
            self.scheduled = bool(torch.equal(scheduled[0], timestep))
            if not self.scheduled:
                return timestep
        return torch.cat([timestep, scheduled[1:].reshape(-1)])  # (n * B,)

    def _compare(self) -> None:
        """Compare the timesteps the used rows' steps received with the rows' own, read later (no host sync)."""
        b = self.seen.shape[0] // self.count if self.used > 1 else 0
        if not b:
            return
        flag = (self.seen[b : self.used * b] != self.timesteps[b : self.used * b]).any()
        steps = (self.first + 1, self.first + self.used - 1)
        if flag.device.type != "cuda":
            self._pending = (None, flag, steps)
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (event, host, steps)

    def _read_pending(self) -> None:
        if self._pending is None:
            return
        event, flag, steps = self._pending
        if event is not None and not event.query():
            return
        self._pending = None
        if bool(flag):
            self.scheduled, self.rows, self.count, self.used = False, None, 0, 0  # nor the rows computed since
            warnings.warn(
                f"catprune: the transformer's timestep at steps {steps[0]}-{steps[1]} was not the pipeline "
                "scheduler's, so those steps used modulation vectors of the scheduler's timesteps. From now on "
                "every step computes its own. For a pipeline that passes other timesteps than scheduler.timesteps, "
                "apply catprune with runner=catprune.runtime.StepRunner(config.backend, modulation_chunk=1).",
                RuntimeWarning,
                stacklevel=3,
            )
