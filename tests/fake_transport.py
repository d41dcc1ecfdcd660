"""A transport whose "workers" are asyncio tasks in the test's own process.

The engine the service sees is the real ``gpu_workers.scheduler.Scheduler`` (fair queue, retries,
failure reasons); only the workers are fake: each shard "runs" for ``seconds_per_shard`` and
returns tiny PNGs whose colour comes from the seed, so equal seeds give equal bytes. Prompts steer
what happens to a shard, as ``tests/pipelines.py`` does for real workers:

- ``FAIL``: the shard fails inside a living worker (reason ``generation``);
- ``LOSE``: the way to the workers goes away with the shard (reason ``transport_lost``);
- ``SLOW``: the shard takes ``slow_seconds`` instead.
"""

from __future__ import annotations

import asyncio
import io
import random
from dataclasses import dataclass, field

from PIL import Image

from contract.formats import quality_for
from contract.states import WorkerState
from gpu_workers.encoding import encode
from gpu_workers.receipts import WorkerFacts, receipt, receipt_text
from gpu_workers.messages import ShardDone, ShardFailed, ShardTask
from gpu_workers.scheduler import EngineConfig, Scheduler, TransportEvents, WorkerStatus

FAIL = "FAIL"
LOSE = "LOSE"
SLOW = "SLOW"


def fake_picture(seed: int, size: int = 8) -> Image.Image:
    """``size`` x ``size``: one colour from the seed, or (larger) noise from the seed, which does not
    compress: about 1 MB at 600 x 600 as PNG, for tests that fill a disk."""
    if size <= 8:
        return Image.new("RGB", (size, size), (seed % 256, (seed // 256) % 256, 99))
    return Image.frombytes("RGB", (size, size), random.Random(seed).randbytes(size * size * 3))


def fake_png(seed: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    fake_picture(seed, size).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def fake_images(shard: ShardTask, size: int) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
    """A PNG shard as plain fake PNGs (the bytes older tests compare); another format through the
    real encode stage, receipts inside (``gpu_workers.encoding``), at the task's size."""
    if shard.image_format == "png":
        return tuple(fake_png(seed, size) for seed in shard.seeds), ()
    facts = WorkerFacts.unknown("fake")
    quality = quality_for(shard.image_format, shard.quality)
    fields = [receipt(shard, offset, facts, quality) for offset in range(shard.size)]
    images = tuple(
        encode(fake_picture(seed).resize((shard.width, shard.height)), shard.image_format, quality, fields[offset])
        for offset, seed in enumerate(shard.seeds)
    )
    return images, tuple(receipt_text(f) for f in fields)


@dataclass
class FakeTransport:
    workers_count: int = 1
    seconds_per_shard: float = 0.05
    slow_seconds: float = 1.0
    png_size: int = 8
    problem: str | None = None
    ready: bool = True
    sent: list[ShardTask] = field(default_factory=list)
    _events: TransportEvents | None = None
    _running: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, events: TransportEvents) -> None:
        self._events = events

    async def stop(self, timeout: float) -> None:
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    def has_room(self) -> bool:
        return self.ready and len(self._running) < self.workers_count

    def send(self, shard: ShardTask) -> None:
        self.sent.append(shard)
        task = asyncio.create_task(self._run(shard))
        self._running.add(task)

    def workers(self) -> list[WorkerStatus]:
        state = WorkerState.READY if self.ready else WorkerState.STARTING
        return [
            WorkerStatus(i, 1000 + i, "cpu", "cpu", "fake", state, 0, 0, 0, None) for i in range(self.workers_count)
        ]

    async def _run(self, shard: ShardTask) -> None:
        assert self._events is not None
        slow = any(SLOW in prompt for prompt in shard.prompts)
        await asyncio.sleep(self.slow_seconds if slow else self.seconds_per_shard)
        self._running.discard(asyncio.current_task())  # type: ignore[arg-type]  # its room is free now
        if any(FAIL in prompt for prompt in shard.prompts):
            self._events.shard_failed(ShardFailed(0, shard.request_id, shard.shard_id, "Image generation failed: RuntimeError: deliberate"))
        elif any(LOSE in prompt for prompt in shard.prompts):
            self._events.transport_lost("broker: the connection to Redis was lost (a test)")
        else:
            images, receipts = fake_images(shard, self.png_size)
            self._events.shard_done(ShardDone(0, shard.request_id, shard.shard_id, images, (), self.seconds_per_shard, receipts))


def fake_engine(transport: FakeTransport, max_batch: int = 2) -> Scheduler:
    return Scheduler(EngineConfig(devices=("cpu",), model="fake", model_cache="/nonexistent", max_batch=max_batch), transport)
