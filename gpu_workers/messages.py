"""Every message that crosses the boundary between the API process and a worker process.

They are frozen dataclasses of plain fields and bytes (PNG bytes, never tensors or exception
objects), so the whole protocol can be read in this one file and the same messages can later be
serialised explicitly to travel between boxes, not only pickled between local processes.

API process -> worker:  ``WorkerConfig`` (at spawn), then ``ShardTask`` ... ``StopWorker``
worker -> API process:  ``WorkerReady`` | ``WorkerStartFailed`` | ``ShardStarted`` | ``ShardDone`` | ``ShardFailed``
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.batch import DEFAULT_STEPS, IMAGE_HEIGHT, IMAGE_WIDTH
from contract.failures import FailureReason
from contract.formats import DEFAULT_ALLOWED_SIZES, DEFAULT_FORMAT


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process is started with (the spawn arguments)."""

    worker_id: int
    device: str
    model: str
    model_cache: str
    cpu_threads: int
    # Seconds a shard may run on the device before the worker gives up on itself (0: no limit).
    shard_timeout: float = 0.0
    # The speed settings (``gpu_workers.speed``: strings, "auto" decided by the device) ...
    dtype: str = "auto"
    channels_last: str = "auto"
    fuse_qkv: str = "auto"
    compile: str = "auto"
    compile_mode: str = "default"
    fp8: str = "off"
    warmup: str = "auto"
    # ... and what a full warm-up covers: every allowed size, every shard size up to max_batch.
    warmup_sizes: tuple[str, ...] = DEFAULT_ALLOWED_SIZES
    max_batch: int = 4


@dataclass(frozen=True)
class ShardTask:
    """A contiguous slice of one request's images, generated as one pipeline batch.

    ``prompts`` and ``seeds`` hold one entry per image (prompt-major order of the request), so
    the worker never needs to know how the request was laid out; ``first_index`` is the position
    of the shard's first image within its request.
    """

    request_id: str
    shard_id: int
    first_index: int
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    negative_prompt: str | None
    guidance_scale: float
    steps: int = DEFAULT_STEPS
    width: int = IMAGE_WIDTH
    height: int = IMAGE_HEIGHT
    # How the encode stage writes the images (``contract.formats``); quality None: the default.
    image_format: str = DEFAULT_FORMAT
    quality: int | None = None

    @property
    def size(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class StopWorker:
    """Sentinel that asks a worker to exit its loop after the shard it is running."""


@dataclass(frozen=True)
class WorkerReady:
    """The worker loaded its pipeline, warmed it up and now takes shards."""

    worker_id: int
    pid: int
    device: str
    model: str
    load_seconds: float
    # What /health calls the device ("NVIDIA H100 80GB HBM3", "cpu"): the API process never
    # imports torch to learn it.
    device_name: str = "cpu"


@dataclass(frozen=True)
class WorkerStartFailed:
    """The pipeline could not be loaded; ``error`` says why and how to fix it. The worker exits."""

    worker_id: int
    pid: int
    device: str
    error: str


@dataclass(frozen=True)
class ShardStarted:
    """The worker took this shard off its queue and runs it now. If the worker dies, only this
    shard is blamed; the ones still waiting in its queue go back without a mark."""

    worker_id: int
    request_id: str
    shard_id: int


@dataclass(frozen=True)
class ShardDone:
    """A shard's images as encoded bytes (the task's format), in the shard's order, and the receipt
    (JSON) written into each, which the job keeps too."""

    worker_id: int
    request_id: str
    shard_id: int
    images: tuple[bytes, ...]
    warnings: tuple[str, ...]
    seconds: float
    receipts: tuple[str, ...] = ()
    # The worker's peak device memory so far (CUDA: allocated bytes; CPU: the process's peak RSS).
    peak_memory_bytes: int = 0


@dataclass(frozen=True)
class ShardFailed:
    """A shard failed inside a living worker; ``error`` is readable text for the client and
    ``reason`` a ``contract.failures.FailureReason`` value."""

    worker_id: int
    request_id: str
    shard_id: int
    error: str
    reason: str = FailureReason.GENERATION.value


WorkerMessage = WorkerReady | WorkerStartFailed | ShardStarted | ShardDone | ShardFailed
