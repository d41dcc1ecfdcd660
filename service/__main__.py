"""``python -m service``: settings, logging, worker pool, then serve until stopped."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from gpu_workers.devices import cuda_info, resolve_devices, resolve_model
from gpu_workers.pool import PoolConfig, WorkerPool
from service.app import create_app
from service.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        devices = resolve_devices(settings.devices, settings.workers)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = resolve_model(settings.model, devices)
    pool = WorkerPool(
        PoolConfig(
            devices=devices,
            model=model,
            model_cache=settings.model_cache,
            cpu_threads=settings.cpu_threads,
            max_batch=settings.max_batch,
        )
    )
    logging.getLogger(__name__).info("model %s on %s", model, ", ".join(devices))
    app = create_app(settings, pool, cuda_info())
    web.run_app(app, host=settings.host, port=settings.port, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
