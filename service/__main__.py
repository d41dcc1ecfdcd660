"""``python -m service``: settings, logging, worker pool, then serve until SIGTERM and drain."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

from aiohttp import web

from gpu_workers.backend import ShardBackend
from gpu_workers.devices import REAL_MODEL, resolve_devices, resolve_model
from gpu_workers.scheduler import EngineConfig
from gpu_workers.speed import SpeedSettings
from service.app import create_app
from service.edge.auth import OPEN_ROUTES_TEXT
from service.edge.connections import MAX_HEAD_BYTES, CappedSite, connection_cap, quiet_accept_errors, raise_file_limit
from service.integrations.metrics import METRICS
from service.app_keys import JOBS, LIFECYCLE
from service.settings import Settings, load_settings

log = logging.getLogger("service")

# Once the grace period is over (or was cut short), handlers get this long to write their last bytes.
FINAL_SHUTDOWN_SECONDS = 3.0


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts: a port already in use is one line
    and exit 1 at once, not after the workers have loaded their models (minutes with real weights)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def serve(app: web.Application, settings: Settings, sock: socket.socket) -> None:
    """Serve until the first SIGTERM, keep answering (503 for new work) while in-flight requests
    and jobs finish, then stop the site, the handlers and the workers, in that order."""
    lifecycle = app[LIFECYCLE]
    lifecycle.install_signal_handlers(asyncio.get_running_loop())
    # A head over MAX_HEAD_BYTES in all gets 431 from the handler; aiohttp's own limits per line and
    # field are raised to it, so that no smaller head gets a different answer.
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=FINAL_SHUTDOWN_SECONDS, keepalive_timeout=settings.keepalive_timeout,
        max_line_size=MAX_HEAD_BYTES, max_field_size=MAX_HEAD_BYTES,
    )  # fmt: skip
    await runner.setup()
    try:
        site = CappedSite(
            runner, sock, connection_cap(settings.max_connections, raise_file_limit()),
            max_per_peer=settings.max_connections_per_peer, trusted=settings.trusted_proxies(),
        )  # fmt: skip
        app[METRICS].refused_connections = lambda: site.refused
        await site.start()
        base = f"http://{'localhost' if settings.host in ('0.0.0.0', '::', '') else settings.host}:{settings.port}"
        log.info(
            "listening on http://%s:%d; at most %d connections, %d per address",
            settings.host, settings.port, site.max_connections, site.max_per_peer,
        )  # fmt: skip
        log.info("the page: %s/ui  the API docs: %s/docs", base, base)
        await lifecycle.wait_for_stop_request()
        jobs = app[JOBS]
        log.info(
            "draining %d job(s) with %d image(s) still to make and %d request(s) in flight, for up to %g s",
            jobs.running_jobs, jobs.pending_images, lifecycle.active_requests, settings.grace_period,
        )  # fmt: skip
        if not await lifecycle.drain(settings.grace_period, also=jobs.idle):
            log.warning("stopping with %d request(s) and %d job(s) unfinished; the jobs resume on the next start", lifecycle.active_requests, jobs.running_jobs)
            await jobs.stop()
            await asyncio.sleep(0.5)  # let the handlers write their last bodies
    finally:
        await runner.cleanup()
    log.info("stopped")


def _backend(settings: Settings) -> ShardBackend:
    """Local worker processes, or with ``--broker`` the Redis broker for workers on other boxes."""
    if settings.broker:
        # The API box need not have a GPU; its workers are meant to: auto is the real model there.
        model = REAL_MODEL if settings.model == "auto" else settings.model
        log.info("model %s on the workers of the broker (python -m gpu_workers --broker ...)", model)
        from gpu_workers.redis_broker import redis_workers

        config = EngineConfig(
            devices=(), model=model, model_cache=settings.model_cache, max_batch=settings.max_batch, shard_timeout=settings.shard_timeout,
            speed=SpeedSettings.of(settings), sizes=settings.allowed_sizes(),
        )
        return redis_workers(config, settings.broker, settings.broker_prefix)
    from gpu_workers.pool import local_workers

    devices = resolve_devices(settings.devices, settings.workers)
    model = resolve_model(settings.model, devices)
    log.info("model %s on %s", model, ", ".join(devices))
    return local_workers(
        EngineConfig(
            devices=devices,
            model=model,
            model_cache=settings.model_cache,
            cpu_threads=settings.cpu_threads,
            max_batch=settings.max_batch,
            shard_timeout=settings.shard_timeout,
            speed=SpeedSettings.of(settings),
            sizes=settings.allowed_sizes(),
        )
    )


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        backend = _backend(settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        return 1
    quiet_accept_errors()
    keys = settings.api_keys()
    if keys:
        log.info("API keys: on (%d key(s)); every route needs one but %s", len(keys), OPEN_ROUTES_TEXT)
    else:
        log.warning("API keys: off; anyone who reaches this port can generate images (set --api-key before exposing it on a tunnel)")
    try:
        asyncio.run(serve(create_app(settings, backend), settings, sock))
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
