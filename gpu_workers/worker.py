"""The worker process: load the pipeline once, report ready, then run shards until told to stop.

It owns one device and one pipeline. Every shard gets exactly one reply (done or failed), so the
pool never waits for a shard that silently vanished while the worker lives on; a worker that dies
is the pool's business (it watches the process sentinel).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
from pathlib import Path
from typing import Any

from gpu_workers.messages import (
    ShardDone,
    ShardFailed,
    ShardStarted,
    ShardTask,
    StopWorker,
    WorkerConfig,
    WorkerReady,
    WorkerStartFailed,
)

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
OOM_DETAIL = "Image generation failed: CUDA out of memory"


def _prepare_device(config: WorkerConfig) -> None:
    """Pin the thread count on CPU: it changes the bytes (DESIGN.md section 6), so it is a
    setting of its own and never derived from how many workers share the cores."""
    import torch

    if config.device == "cpu":
        torch.set_num_threads(config.cpu_threads)
    else:
        torch.cuda.set_device(config.device)


def _load(config: WorkerConfig) -> Any:
    from gpu_workers.generation import generate_shard
    from gpu_workers.loading import load_pipeline

    pipe = load_pipeline(config.model, config.device, Path(config.model_cache))
    warm_up = ShardTask("warm-up", 0, 0, ("warm-up",), (0,), None, 0.0, steps=1)
    generate_shard(pipe, warm_up)
    return pipe


def _failure_detail(exc: BaseException) -> str:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return OOM_DETAIL
    return f"Image generation failed: {type(exc).__name__}: {exc}"


def _run_shard(pipe: Any, config: WorkerConfig, task: ShardTask, limit: Any) -> ShardDone | ShardFailed:
    from gpu_workers.generation import generate_fitting, truncation_warnings

    started = time.perf_counter()
    try:
        images = generate_fitting(pipe, task, limit)
        warnings = truncation_warnings(pipe, task.prompts)
    except Exception as exc:  # noqa: BLE001 - a failed shard must never take the worker down
        log.exception("worker %d: shard %s/%d failed", config.worker_id, task.request_id, task.shard_id)
        return ShardFailed(config.worker_id, task.request_id, task.shard_id, _failure_detail(exc))
    return ShardDone(
        worker_id=config.worker_id,
        request_id=task.request_id,
        shard_id=task.shard_id,
        images=tuple(images),
        warnings=warnings,
        seconds=time.perf_counter() - started,
    )


def _quiet_libraries() -> None:
    """Progress bars and import-time notices of diffusers/transformers would flood the server log."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _ignore_stop_signals() -> None:
    """The pool stops workers itself (StopWorker, then terminate, then kill). A TERM or Ctrl-C sent
    to the whole process group (systemd's default, a terminal) must not kill a worker in the middle
    of the API process's drain."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_main(config: WorkerConfig, tasks: Any, results: Any) -> None:
    """Entry point of the spawned process. ``tasks`` is its own queue, ``results`` the sending
    end of its own pipe (one writer, so no lock that a killed worker could leave held)."""
    _ignore_stop_signals()
    _quiet_libraries()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker-{config.worker_id} %(levelname)s %(message)s")
    parent = os.getppid()
    started = time.perf_counter()
    try:
        _prepare_device(config)
        pipe = _load(config)
    except Exception as exc:  # noqa: BLE001 - reported to the pool, which shows it in /health
        log.exception("worker %d could not load model %r", config.worker_id, config.model)
        results.send(WorkerStartFailed(config.worker_id, os.getpid(), config.device, f"{exc}"))
        results.close()
        return
    results.send(WorkerReady(config.worker_id, os.getpid(), config.device, config.model, time.perf_counter() - started))

    from gpu_workers.generation import BatchLimit

    limit = BatchLimit()

    while True:
        try:
            message = tasks.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if os.getppid() != parent:  # the API process is gone: nobody will read our results
                return
            continue
        if isinstance(message, StopWorker):
            break
        results.send(ShardStarted(config.worker_id, message.request_id, message.shard_id))
        results.send(_run_shard(pipe, config, message, limit))
    results.close()
