"""A local worker process: load the pipeline once, report ready, then serve shards from its own
queue until told to stop.

The loop itself is ``gpu_workers.worker_loop.serve`` (the same for workers on other boxes); this
module is the local transport's end of it (a ``multiprocessing`` queue in, a pipe out) and what
every worker process does before its loop: pin the device, quiet the libraries, load and warm up.
A worker that dies is the pool's business (it watches the process sentinel).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any

from contract.states import WorkerState
from gpu_workers.messages import (
    ShardDone,
    ShardFailed,
    ShardStarted,
    StopWorker,
    WorkerConfig,
    WorkerReady,
    WorkerStartFailed,
)
from gpu_workers.receipts import WorkerFacts, worker_facts
from gpu_workers.worker_loop import EXIT_SHARD_TIMEOUT, POLL_SECONDS, Taken, serve

__all__ = ["EXIT_SHARD_TIMEOUT", "load_for_worker", "quiet_libraries", "worker_main"]

log = logging.getLogger(__name__)


def _prepare_device(config: WorkerConfig) -> str:
    """Pin the thread count on CPU: it changes the bytes (DESIGN.md section 6), so it is a
    setting of its own and never derived from how many workers share the cores. Returns the
    device's name for /health."""
    import torch

    if config.device == "cpu":
        torch.set_num_threads(config.cpu_threads)
        return "cpu"
    # The API process counted devices through NVML without torch (gpu_workers.devices); this is the
    # check by the library that will use the device, with a message that says what to change.
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (torch.device(config.device).index or 0) >= visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError(
            f"{config.device} is not a CUDA device this worker can use: torch {torch.__version__} sees {visible} "
            f"(CUDA_VISIBLE_DEVICES={shown!r}); fix --devices or CUDA_VISIBLE_DEVICES"
        )
    torch.cuda.set_device(config.device)
    return torch.cuda.get_device_name(config.device)


def load_for_worker(config: WorkerConfig) -> tuple[Any, WorkerFacts]:
    """Pin the device, load the pipeline in the configured precision, apply the speed settings and
    warm it up (``gpu_workers.speed``): ``(pipeline, the worker's facts)``, whose ``device_name``
    /health shows and which go into every image's receipt."""
    from gpu_workers import speed
    from gpu_workers.generation import generate_images
    from gpu_workers.loading import load_pipeline

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components...": no variable turns it off
    device_name = _prepare_device(config)
    pipe, report = speed.prepare(
        config, device_name, lambda dtype: load_pipeline(config.model, config.device, Path(config.model_cache), dtype), generate_images
    )
    return pipe, worker_facts(config.model, Path(config.model_cache), device_name, report.plan)


def quiet_libraries() -> None:
    """Progress bars and import-time notices of diffusers/transformers would flood the server log
    (hub downloads and transformers read these variables; diffusers' own bars are turned off where
    the pipeline is loaded, ``load_for_worker``)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _ignore_stop_signals() -> None:
    """The pool stops workers itself (StopWorker, then terminate, then kill). A TERM or Ctrl-C sent
    to the whole process group (systemd's default, a terminal) must not kill a worker in the middle
    of the API process's drain."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _LocalQueue:
    """Shards from this worker's own queue; stops on ``StopWorker`` or when the API process is gone."""

    def __init__(self, tasks: Any) -> None:
        self._tasks = tasks
        self._parent = os.getppid()
        self._stop = False

    def take(self) -> Taken | None:
        try:
            message = self._tasks.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if os.getppid() != self._parent:  # the API process is gone: nobody will read our results
                self._stop = True
            return None
        if isinstance(message, StopWorker):
            self._stop = True
            return None
        return Taken(message)

    def stopping(self) -> bool:
        return self._stop


class _LocalPipe:
    """Replies through this worker's own pipe; two threads send (started, replies), hence a lock."""

    def __init__(self, results: Any, worker_id: int) -> None:
        self._results = results
        self._worker_id = worker_id
        self._lock = threading.Lock()

    def send(self, message: object) -> None:
        with self._lock:
            self._results.send(message)

    def started(self, taken: Taken) -> None:
        assert taken.task is not None
        self.send(ShardStarted(self._worker_id, taken.task.request_id, taken.task.shard_id))

    def finished(self, taken: Taken, reply: ShardDone | ShardFailed | None) -> None:
        if reply is not None:
            self.send(reply)

    def state(self, state: WorkerState, images_done: int) -> None:
        """The pool follows the state from the messages themselves."""


def worker_main(config: WorkerConfig, tasks: Any, results: Any) -> None:
    """Entry point of the spawned process. ``tasks`` is its own queue, ``results`` the sending
    end of its own pipe (one writer process, so no lock that a killed worker could leave held)."""
    _ignore_stop_signals()
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker-{config.worker_id} %(levelname)s %(message)s")
    started = time.perf_counter()
    try:
        pipe, facts = load_for_worker(config)
    except Exception as exc:  # noqa: BLE001 - reported to the pool, which shows it in /health
        log.exception("worker %d could not load model %r", config.worker_id, config.model)
        results.send(WorkerStartFailed(config.worker_id, os.getpid(), config.device, f"{exc}"))
        results.close()
        return
    sink = _LocalPipe(results, config.worker_id)
    sink.send(WorkerReady(config.worker_id, os.getpid(), config.device, config.model, time.perf_counter() - started, facts.device_name))
    serve(pipe, config, _LocalQueue(tasks), sink, facts=facts)
    results.close()
