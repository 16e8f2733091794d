"""torch.distributed glue: rank / world size from the launcher's environment, the process group, and the few
collectives the batch run needs.

``torchrun`` and ``accelerate launch`` set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` (and do the multi-node rendezvous). With ``WORLD_SIZE`` unset or 1 nothing is initialised and every
collective is a no-op, so a plain ``catprune generate --prompts ...`` is a one-process run.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch


def _env_int(env, name: str, default: int) -> int:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}: expected an int (set by torchrun / accelerate launch), got {value!r}."
        ) from None


@dataclass
class DistContext:
    """This process's place in the run.

    Example:
        >>> ctx = DistContext.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
        >>> ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed
        (1, 2, False, True)
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" or "nccl" once initialised
    owns_group: bool = False  # whether we initialised the process group (and so destroy it)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls, env=None) -> DistContext:
        env = os.environ if env is None else env
        world, rank = _env_int(env, "WORLD_SIZE", 1), _env_int(env, "RANK", 0)
        local = _env_int(env, "LOCAL_RANK", 0)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(
                f"RANK / WORLD_SIZE: expected 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}."
            )
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def resolve_device(self, requested: str) -> torch.device:
        """The device of this rank: ``auto`` / ``cuda`` mean ``cuda:LOCAL_RANK`` when CUDA is there (one GPU per
        rank), else the CPU; an explicit ``cuda:N`` is refused in a multi-process run (every rank would share it)."""
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(requested)
        if device.type == "cuda":
            if device.index is not None and self.distributed:
                raise ValueError(
                    f"--device: expected 'cuda' or 'auto' in a {self.world_size}-process run (each rank takes "
                    f"cuda:LOCAL_RANK), got {requested!r}. Pass --device cuda, and choose GPUs with "
                    "CUDA_VISIBLE_DEVICES."
                )
            if device.index is None:
                device = torch.device("cuda", self.local_rank if self.distributed else torch.cuda.current_device())
            torch.cuda.set_device(device)
        self.device = device
        return device

    def init(self, timeout_s: float = 1800.0) -> None:
        """Join the process group (NCCL on CUDA, gloo otherwise) when the run has several processes."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            self.backend = dist.get_backend()
            return
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        kwargs = {"device_id": self.device} if self.backend == "nccl" else {}
        dist.init_process_group(self.backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        self.owns_group = True

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False

    # ------------------------------------------------------------------ collectives (no-ops in one process)
    def _peer_failed(self, exc: Exception) -> ConnectionError:
        return ConnectionError(
            f"rank {self.rank}: another process of the run stopped ({type(exc).__name__}: {str(exc)[:200]}); its own "
            "error is printed by that process. Images already written are complete: re-run the same command to resume."
        )

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            try:
                dist.barrier()
            except RuntimeError as exc:
                raise self._peer_failed(exc) from exc

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0)
        except RuntimeError as exc:
            raise self._peer_failed(exc) from exc
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as exc:
            raise self._peer_failed(exc) from exc
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (one small all_reduce)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        device = self.device if self.backend == "nccl" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=device)  # (len(values),)
        try:
            dist.all_reduce(tensor)
        except RuntimeError as exc:
            raise self._peer_failed(exc) from exc
        return tensor.cpu().tolist()
