"""``create_app(settings, pool)``: the whole aiohttp application, for ``python -m service`` and tests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp_apigami import setup_aiohttp_apispec, validation_middleware

from gpu_workers.devices import CudaInfo
from service import __version__
from service.errors import error_middleware, validation_error_callback
from service.image_store import ImageStore
from service.keys import BACKGROUND, CUDA, LIFECYCLE, POOL, SETTINGS, STORE
from service.lifecycle import Lifecycle
from service.routes import ROUTES
from service.settings import Settings

log = logging.getLogger(__name__)

SPEC_URL = "/openapi.json"
DOCS_URL = "/docs"
EVICTION_PERIOD = 60.0


async def _run_pool(app: web.Application) -> AsyncIterator[None]:
    """The pool lives exactly as long as the app: started before serving, stopped after."""
    pool = app[POOL]
    await pool.start()
    yield
    await pool.stop()


async def _evict_images(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]

    async def evict_forever() -> None:
        while True:
            try:
                removed = await asyncio.to_thread(store.evict_expired)
                if removed:
                    log.info("removed %d expired image(s)", removed)
            except OSError:
                log.exception("image eviction failed")
            await asyncio.sleep(EVICTION_PERIOD)

    task = asyncio.create_task(evict_forever())
    yield
    task.cancel()
    for leftover in list(app[BACKGROUND]):
        leftover.cancel()


def create_app(settings: Settings, pool: Any, cuda: CudaInfo) -> web.Application:
    app = web.Application(middlewares=[error_middleware, validation_middleware])
    app[SETTINGS] = settings
    app[POOL] = pool
    app[STORE] = ImageStore(settings.image_path, settings.image_retention)
    app[CUDA] = cuda
    app[LIFECYCLE] = Lifecycle()
    app[BACKGROUND] = set()
    app.add_routes(ROUTES)
    app.cleanup_ctx.append(_run_pool)
    app.cleanup_ctx.append(_evict_images)
    setup_aiohttp_apispec(
        app,
        title="SDXL Lightning API",
        version=__version__,
        url=SPEC_URL,
        swagger_path=DOCS_URL,
        openapi_version="3.0.3",
        error_callback=validation_error_callback,
        in_place=True,
        info={"description": "Batch 1024x576 image generation with SDXL-Lightning (8 steps). Errors are JSON `{\"detail\": ...}`."},
    )
    return app
