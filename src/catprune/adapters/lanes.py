"""Two CUDA streams for the two token streams of an MMDiT block: the image tokens on the current stream, the text
tokens on a second one, so that the text stream's small GEMMs fill the SMs the pruned image stream leaves idle.

Why: a pruned SD3-medium step at keep 0.3 runs its image GEMMs over ~2.5k rows (CFG batch 2), which leaves the last
wave of every GEMM mostly empty, and its text stream (2 x 333 rows, unchanged by pruning) as a chain of GEMMs that
fill a third of the SMs each. The two streams are independent within a block except at the joint attention, so the
block is split there: the text stream's output projection, feed-forward and the next block's text Q/K/V run beside
the image stream's output projection, feed-forward and next Q/K/V.

How memory stays safe across streams without ``record_stream`` (whose frees are deferred to the end of a CUDA graph
capture, growing the graph's pool): a tensor one lane hands to the other is kept referenced here until the lanes
have met again after its reader, so the caching allocator cannot give its memory to the writer lane's next kernels
while the reader may still run. Under a CUDA graph capture the fork / join waits become the graph's edges.

`Lanes.off()` runs everything on the current stream through the same calls (the graph breaks of torch.compile fall
at the same places), which is what the A/B measurement and the equality test compare against.
"""

from __future__ import annotations

import torch

from ..runtime.backends import device_stream


class Lanes:
    """The image lane (the current stream) and the text lane of one pruned step; see the module docstring.

    ``fork(*handed)``: the text lane waits for the image lane's work so far and becomes current; ``handed`` are
    image-lane tensors the text lane reads. ``back()``: the image lane becomes current again, without waiting.
    ``meet(*handed)``: the image lane waits for the text lane's work so far; ``handed`` are text-lane tensors the
    image lane reads. ``finish()``: meet and let go of everything. Every call is a torch.compile graph break and
    does nothing on a CPU or with `Lanes.off`.

    Example:
        >>> lanes = Lanes.off()
        >>> lanes.fork(); lanes.back(); lanes.meet(); lanes.finish()
    """

    def __init__(self, side: torch.cuda.Stream | None):
        self.side = side
        self.main: torch.cuda.Stream | None = None
        self._to_side: list[torch.Tensor] = []  # image-lane tensors the text lane reads: kept until the next meet
        self._to_main: list[torch.Tensor] = []  # text-lane tensors the image lane reads: kept until the next fork

    @staticmethod
    @torch.compiler.disable
    def for_device(device: torch.device, enabled: bool = True) -> Lanes:
        """Two lanes on a CUDA ``device`` when ``enabled`` and it is the current device, else one (`off`): streams
        are per device, and switching the current stream of another device would also switch the current device."""
        device = torch.device(device)
        if not enabled or device.type != "cuda":
            return Lanes(None)
        current = torch.cuda.current_device()
        if device.index is not None and device.index != current:
            return Lanes(None)
        return Lanes(device_stream("text lane", current))

    @staticmethod
    def off() -> Lanes:
        return Lanes(None)

    @torch.compiler.disable
    def fork(self, *handed: torch.Tensor) -> None:
        if self.side is None:
            return
        self.main = torch.cuda.current_stream()
        self.side.wait_stream(self.main)
        self._to_main.clear()  # the text lane's next kernels now run after the image lane's reads of these
        self._to_side.extend(handed)
        torch.cuda.set_stream(self.side)

    @torch.compiler.disable
    def back(self) -> None:
        if self.side is not None and self.main is not None:
            torch.cuda.set_stream(self.main)

    @torch.compiler.disable
    def meet(self, *handed: torch.Tensor) -> None:
        if self.side is None or self.main is None:
            return
        self.main.wait_stream(self.side)
        self._to_side.clear()  # the image lane's next kernels now run after the text lane's reads of these
        self._to_main.extend(handed)

    @torch.compiler.disable
    def finish(self) -> None:
        self.meet()
        self._to_main.clear()
        self.main = None


__all__ = ["Lanes"]
