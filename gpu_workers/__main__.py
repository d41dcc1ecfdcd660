"""``python -m gpu_workers --broker redis://...``: the GPU workers of a box, serving an API server elsewhere.

One spawned process per device (``gpu_workers.remote_worker``), all pulling shards from the same
Redis Streams group as the workers on every other box. This command is their supervisor on the
box: it forwards SIGTERM/SIGINT to them and waits until each has finished its shard, restarts one
that crashed or ended itself past the shard timeout (the backoff of ``shard_rules.RestartBackoff``,
the local pool's too: 1 s doubling to 30 s), and gives up with exit code 2 when a worker is refused
(it was started for another model or protocol than the API server's: restarting cannot help).

Every flag also reads an ``SDXL_*`` environment variable, as ``python -m service`` does: ``--model``
is ``SDXL_MODEL``; the flag wins over the variable, the variable over the default. Without
``--model`` the workers serve whatever model the API server announces in ``{prefix}:config``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from gpu_workers.devices import resolve_devices
from gpu_workers.flag_settings import build_parser as build_settings_parser
from gpu_workers.flag_settings import flag, parse, setting
from gpu_workers.messages import WorkerConfig
from gpu_workers.redis_protocol import (
    DEFAULT_PREFIX,
    DEFAULT_VISIBILITY_TIMEOUT,
    Keys,
    redacted,
)
from gpu_workers.shard_rules import DEFAULT_SHARD_TIMEOUT, RestartBackoff
from gpu_workers.speed import SpeedFlags, SpeedSettings, announced_shapes
from gpu_workers.worker_loop import EXIT_SHARD_TIMEOUT
from gpu_workers.remote_worker import (
    EXIT_REFUSED,
    Refused,
    check_model,
    connect,
    remote_worker_main,
    served_model,
    wait_for_config,
)

log = logging.getLogger("gpu_workers")

#: The values of --model that mean "whatever the API server serves" (``auto`` so that an
#: SDXL_MODEL=auto shared with the service on the same box does the natural thing).
FOLLOW_THE_SERVER = ("", "auto")


@dataclass(frozen=True)
class LaunchSettings(SpeedFlags):
    broker: str = setting("", "Redis URL of the API server's broker, e.g. redis://:PASSWORD@host:6379/0 (required)", secret=True)
    devices: str = setting("auto", "comma-separated CUDA devices (cuda:0,cuda:1 or 0,1); auto = every CUDA device")
    workers: int = setting(1, "number of CPU workers where there is no CUDA device")
    model: str = setting("", "model preset or folder; empty (or auto) = the model the API server serves")
    model_cache: str = setting(str(Path.home() / ".cache" / "sdxl-lightning-server"), "folder where the tiny model is built")
    cpu_threads: int = setting(1, "torch threads per CPU worker (changes the bytes, so it must match the server's)")
    shard_timeout: float = setting(
        DEFAULT_SHARD_TIMEOUT, "seconds a shard may run on a device; past it the worker process ends itself and is restarted"
    )
    visibility_timeout: float = setting(
        DEFAULT_VISIBILITY_TIMEOUT,
        "seconds a shard whose worker died (its heartbeat stopped) waits before another worker takes it over",
    )
    broker_prefix: str = setting(DEFAULT_PREFIX, "prefix of every Redis key: the same as the API server's --broker-prefix")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")


def build_parser() -> argparse.ArgumentParser:
    return build_settings_parser(
        LaunchSettings,
        prog="python -m gpu_workers",
        description="GPU workers for an SDXL-Lightning API server on another box, through Redis Streams. "
        "Every flag also reads the SDXL_* variable named in its help.",
    )


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> LaunchSettings:
    """Defaults, overridden by ``SDXL_*`` variables, overridden by flags."""
    parser = build_parser()
    settings = parse(LaunchSettings, parser, argv, environ)
    problems = []
    if not settings.broker:
        problems.append("--broker (or SDXL_BROKER) is required: the Redis URL the API server was started with")
    elif not settings.broker.startswith(("redis://", "rediss://", "unix://")):
        problems.append("--broker must be a redis://, rediss:// or unix:// URL")
    for name in ("workers", "cpu_threads"):
        if getattr(settings, name) < 1:
            problems.append(f"{flag(name)} must be at least 1")
    if settings.visibility_timeout <= 0:
        problems.append("--visibility-timeout must be positive")
    if settings.shard_timeout <= 0:
        problems.append("--shard-timeout must be positive")
    problems += SpeedSettings.of(settings).problems()
    if problems:
        parser.error("; ".join(problems))
    return settings


@dataclass
class _Slot:
    """One device's worker: the process running now, or when the next one may start."""

    config: WorkerConfig
    process: BaseProcess | None = None
    restart_at: float | None = 0.0
    backoff: RestartBackoff = field(default_factory=RestartBackoff)


class Launcher:
    """Starts, watches and stops one worker process per device."""

    def __init__(self, settings: LaunchSettings, devices: tuple[str, ...], model: str, shapes: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        speed = {**SpeedSettings.of(settings).as_fields(), **(shapes or {})}
        self.slots = [
            _Slot(WorkerConfig(index, device, model, settings.model_cache, settings.cpu_threads, settings.shard_timeout, **speed))
            for index, device in enumerate(devices)
        ]
        self.stopping = False
        self.refused = False
        self.failed = False

    def stop(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: pass the stop on; each worker finishes its shard, then exits 0."""
        if not self.stopping:
            log.info("%s received: stopping the workers after the shards they run", signal.Signals(signum).name)
        self.stopping = True
        self._signal_children()

    def _signal_children(self) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None and slot.process.exitcode is None:
                try:
                    os.kill(slot.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _start(self, slot: _Slot) -> None:
        process = self.context.Process(
            target=remote_worker_main,
            args=(slot.config, self.settings.broker, self.settings.broker_prefix, self.settings.visibility_timeout, self.settings.log_level),
            name=f"gpu-worker-{slot.config.device}",
        )
        process.start()
        slot.process, slot.restart_at = process, None
        slot.backoff.started()
        log.info("started worker pid %s on %s (model %s)", process.pid, slot.config.device, slot.config.model)
        if self.stopping:  # a signal came while it started
            self._signal_children()

    def _reap(self, slot: _Slot) -> None:
        process = slot.process
        assert process is not None
        process.join()
        code = process.exitcode
        slot.process = None
        device = slot.config.device
        if code == 0 or (self.stopping and code in (-signal.SIGTERM, -signal.SIGINT)):
            # (A worker still importing when the stop came dies of the signal itself: nothing was lost.)
            log.info("worker pid %s on %s stopped", process.pid, device)
            return
        if code == EXIT_REFUSED:
            log.error("worker pid %s on %s was refused by the API server (why: see its line above); stopping", process.pid, device)
            self.refused = True
            self.stopping = True
            self._signal_children()
            return
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with code {code}"
        if self.stopping:
            log.warning("worker pid %s on %s %s while stopping", process.pid, device, how)
            self.failed = True
            return
        if code == EXIT_SHARD_TIMEOUT:
            how += " (a shard ran past the shard timeout)"
        delay = slot.backoff.next_delay()
        log.error("worker pid %s on %s %s; restarting it in %.0f s", process.pid, device, how, delay)
        slot.restart_at = time.monotonic() + delay

    def run(self) -> int:
        """Until every worker is gone: 0 when all stopped cleanly, 2 when one was refused, 1 otherwise."""
        while True:
            now = time.monotonic()
            if not self.stopping:
                for slot in self.slots:
                    if slot.process is None and slot.restart_at is not None and slot.restart_at <= now:
                        self._start(slot)
            running = [slot for slot in self.slots if slot.process is not None]
            pending = [slot.restart_at for slot in self.slots if slot.process is None and slot.restart_at is not None]
            if not running and (self.stopping or not pending):
                break
            timeout = 0.5 if not pending else max(0.05, min(0.5, min(pending) - now))
            wait([slot.process.sentinel for slot in running if slot.process is not None], timeout)
            for slot in running:
                if slot.process is not None and slot.process.exitcode is not None:
                    self._reap(slot)
        if self.refused:
            return EXIT_REFUSED
        return 1 if self.failed else 0


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s gpu_workers %(levelname)s %(message)s")
    try:
        devices = resolve_devices(settings.devices, settings.workers)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not devices:
        print("error: --devices names no device", file=sys.stderr)
        return 2

    stop_requested = False

    def stop_waiting(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, stop_waiting)
    signal.signal(signal.SIGINT, stop_waiting)

    # Check the API server's config here too, before loading anything: a wrong --model is then one
    # clear line and exit 2, and without --model this is where the model to serve comes from.
    keys = Keys(settings.broker_prefix)
    client = connect(settings.broker)
    try:
        raw = wait_for_config(client, keys, settings.broker, lambda: stop_requested)
        if raw is None:
            return 0
        served = served_model(raw, settings.broker)
        model = served if settings.model in FOLLOW_THE_SERVER else settings.model
        check_model(served, model, settings.broker)
        sizes, max_batch = announced_shapes(raw)
        shapes = {key: value for key, value in (("warmup_sizes", sizes), ("max_batch", max_batch)) if value is not None}
    except Refused as refused:
        log.error("%s", refused)
        return EXIT_REFUSED
    finally:
        client.close()

    log.info("serving model %s for the API server at %s on %s", model, redacted(settings.broker), ", ".join(devices))
    launcher = Launcher(settings, devices, model, shapes)
    signal.signal(signal.SIGTERM, launcher.stop)
    signal.signal(signal.SIGINT, launcher.stop)
    code = launcher.run()
    log.info("exiting with code %d", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
