"""The one worker loop (``gpu_workers.worker_loop.serve``) in a thread, with a fake pipeline and a
fake transport: its pipelining, its one reply per shard, its watchdog. No processes: the local and
the Redis transports around it are tested with real processes elsewhere."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from contract.states import WorkerState
from gpu_workers.messages import ShardDone, ShardFailed, ShardTask, WorkerConfig
from gpu_workers.worker_loop import Taken, serve

CONFIG = WorkerConfig(7, "cpu", "fake", "/nonexistent", 1)


@dataclass
class FakeOutput:
    images: list[Any]


class FakePipeline:
    """A device that takes ``seconds`` per call; records when each call started and ended."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds
        self.calls: list[tuple[str, float, float]] = []
        self.release = threading.Event()

    def __call__(self, prompt: list[str], **kwargs: Any) -> FakeOutput:
        started = time.monotonic()
        if any("FAIL" in p for p in prompt):
            raise RuntimeError("deliberate")
        if any("HANG" in p for p in prompt):
            self.release.wait(30)
        time.sleep(self.seconds)
        self.calls.append((prompt[0], started, time.monotonic()))
        return FakeOutput([Image.new("RGB", (32, 16), (len(p) % 256, 0, 0)) for p in prompt])


@dataclass
class ListSource:
    shards: list[ShardTask]
    taken: list[float] = field(default_factory=list)

    def take(self) -> Taken | None:
        if not self.shards:
            return None
        self.taken.append(time.monotonic())
        return Taken(self.shards.pop(0), receipt=f"receipt-{len(self.taken)}")

    def stopping(self) -> bool:
        return not self.shards


@dataclass
class SlowSink:
    """Sending a reply takes ``seconds`` (a slow link); records every call."""

    seconds: float = 0.0
    started_at: list[str] = field(default_factory=list)
    replies: list[tuple[Any, ShardDone | ShardFailed | None, float]] = field(default_factory=list)
    states: list[WorkerState] = field(default_factory=list)

    def started(self, taken: Taken) -> None:
        assert taken.task is not None
        self.started_at.append(taken.task.prompts[0])

    def finished(self, taken: Taken, reply: ShardDone | ShardFailed | None) -> None:
        time.sleep(self.seconds)
        self.replies.append((taken.receipt, reply, time.monotonic()))

    def state(self, state: WorkerState, images_done: int) -> None:
        self.states.append(state)


def shard(shard_id: int, prompt: str) -> ShardTask:
    return ShardTask("req", shard_id, shard_id * 2, (prompt, prompt), (shard_id, shard_id + 1), None, 0.0)


def test_every_shard_gets_one_reply_in_order_and_a_failure_does_not_stop_the_loop() -> None:
    pipe = FakePipeline()
    source = ListSource([shard(0, "a"), shard(1, "FAIL b"), shard(2, "c")])
    sink = SlowSink()
    assert serve(pipe, CONFIG, source, sink) == 4
    assert [receipt for receipt, _, _ in sink.replies] == ["receipt-1", "receipt-2", "receipt-3"]
    done, failed, last = (reply for _, reply, _ in sink.replies)
    assert isinstance(done, ShardDone) and len(done.images) == 2 and done.images[0].startswith(b"\x89PNG")
    assert done.worker_id == 7 and done.seconds >= pipe.seconds
    assert isinstance(failed, ShardFailed) and failed.error == "Image generation failed: RuntimeError: deliberate"
    assert isinstance(last, ShardDone) and last.shard_id == 2
    assert sink.started_at == ["a", "FAIL b", "c"]
    assert sink.states[-1] == WorkerState.READY and WorkerState.BUSY in sink.states


def test_the_device_never_waits_for_sending() -> None:
    """Sending a reply takes four times as long as a shard on the device: the device still runs
    the next shards back to back instead of waiting for each reply to leave."""
    pipe = FakePipeline(seconds=0.05)
    source = ListSource([shard(i, f"p{i}") for i in range(3)])
    sink = SlowSink(seconds=0.2)
    serve(pipe, CONFIG, source, sink)
    first_reply_sent = sink.replies[0][2]
    third_call_started = pipe.calls[2][1]
    assert third_call_started < first_reply_sent, "the device waited for a reply to be sent"
    gaps = [pipe.calls[i + 1][1] - pipe.calls[i][2] for i in range(2)]
    assert max(gaps) < 0.05, f"the device idled between shards: {gaps}"


def test_the_watchdog_gives_up_on_a_shard_past_the_shard_timeout() -> None:
    pipe = FakePipeline()
    timed_out: list[str] = []

    def on_timeout(label: str) -> None:
        timed_out.append(label)
        pipe.release.set()  # a real worker ends its process here; the test lets the call return

    config = WorkerConfig(7, "cpu", "fake", "/nonexistent", 1, shard_timeout=0.4)
    source = ListSource([ShardTask("stuck", 3, 0, ("HANG",), (1,), None, 0.0), shard(4, "after")])
    started = time.monotonic()
    serve(pipe, config, source, SlowSink(), on_timeout=on_timeout)
    assert timed_out == ["stuck/3"]
    assert 0.4 <= time.monotonic() - started < 5


def test_a_shard_the_source_answered_never_reaches_the_device() -> None:
    pipe = FakePipeline()
    refused = ShardFailed(7, "req", 0, "Image generation failed: wrong model")

    class Refusing(ListSource):
        def take(self) -> Taken | None:
            taken = super().take()
            if taken is not None and taken.task is not None and taken.task.shard_id == 0:
                taken.reply = refused
            return taken

    sink = SlowSink()
    serve(pipe, CONFIG, Refusing([shard(0, "refused"), shard(1, "fine")]), sink)
    assert [call[0] for call in pipe.calls] == ["fine"]
    assert sink.replies[0][1] is refused and sink.started_at == ["fine"]
