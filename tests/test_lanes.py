"""`adapters.lanes.Lanes` bookkeeping without a GPU: the waits each call makes, which stream is current, and how long
a tensor handed from one lane to the other stays referenced (a tensor freed too early would let the caching
allocator give its memory to the writer lane while the reader may still run). The real streams are checked on CUDA
by tests/test_kernels.py (SD3 with and without the lane, bit for bit)."""

import gc
import weakref

import pytest
import torch

from catprune.adapters.lanes import Lanes


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


@pytest.fixture
def streams(monkeypatch):
    log = []
    main, side = FakeStream("main", log), FakeStream("side", log)
    current = {"stream": main}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: current["stream"])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: current.update(stream=s))
    return main, side, current, log


def alive(ref):
    gc.collect()
    return ref() is not None


def test_waits_and_current_stream(streams):
    main, side, current, log = streams
    lanes = Lanes(side)
    lanes.fork()
    assert current["stream"] is side and log == ["side waits main"]
    lanes.back()
    assert current["stream"] is main and log == ["side waits main"]  # back does not wait
    lanes.meet()
    assert current["stream"] is main and log[-1] == "main waits side"
    lanes.fork()
    lanes.back()
    lanes.finish()
    assert current["stream"] is main and log[-1] == "main waits side" and lanes.main is None


def test_handed_tensors_live_until_the_lanes_meet_again(streams):
    _, side, _, _ = streams
    lanes = Lanes(side)
    image = torch.zeros(3)  # an image-lane tensor the text lane reads
    to_side = weakref.ref(image)
    lanes.fork(image)
    del image
    lanes.back()
    assert alive(to_side)  # the text lane may still be reading it
    text = torch.ones(3)  # a text-lane tensor the image lane reads
    to_main = weakref.ref(text)
    lanes.meet(text)
    del text
    assert not alive(to_side)  # the image lane waited for the text lane: its memory may be reused
    assert alive(to_main)  # the image lane may still be reading it
    lanes.fork()
    assert not alive(to_main)  # the text lane now runs after the image lane's reads
    lanes.back()
    kept = torch.ones(2)
    last = weakref.ref(kept)
    lanes.meet(kept)
    del kept
    lanes.finish()
    assert not alive(last) and lanes.main is None


def test_off_and_cpu_lanes_do_nothing(monkeypatch):
    def fail(*_):
        raise AssertionError("a lane that is off must not touch CUDA streams")

    monkeypatch.setattr(torch.cuda, "current_stream", fail)
    monkeypatch.setattr(torch.cuda, "set_stream", fail)
    for lanes in (Lanes.off(), Lanes.for_device(torch.device("cpu")), Lanes.for_device("cuda", enabled=False)):
        x = torch.zeros(1)
        lanes.fork(x)
        lanes.back()
        lanes.meet(x)
        lanes.finish()
        assert lanes.side is None and not lanes._to_side and not lanes._to_main


def test_two_lanes_only_on_the_current_cuda_device(monkeypatch):
    import catprune.adapters.lanes as lanes_module

    side = FakeStream("side", [])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(lanes_module, "device_stream", lambda role, index: side if index == 0 else None)
    assert Lanes.for_device("cuda").side is side and Lanes.for_device("cuda:0").side is side
    assert Lanes.for_device("cuda:1").side is None  # another device than the current one: one lane


def test_a_step_that_fails_on_the_text_lane_gives_the_caller_its_stream_back(streams):
    """The runtime runs each step under `keeping_stream`: when a step raises after an adapter switched to its
    second stream (a failure between `Lanes.fork` and `Lanes.back`), the caller's stream is current again and the
    error still propagates; a step that succeeds or fails on the caller's stream changes nothing."""
    from catprune.runtime.backends import keeping_stream

    main, side, current, _ = streams
    with pytest.raises(RuntimeError, match="text lane"), keeping_stream("cuda"):
        Lanes(side).fork()
        raise RuntimeError("out of memory on the text lane")
    assert current["stream"] is main
    with keeping_stream("cuda"):
        current["stream"] = side  # no error: whatever the body leaves stays
    assert current["stream"] is side
    with keeping_stream("cpu"):  # not CUDA: no stream is read
        pass
