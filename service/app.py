"""``create_app(settings, pool)``: the whole aiohttp application, for ``python -m service`` and tests."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import aiohttp_cors
from aiohttp import web
from aiohttp_apigami import setup_aiohttp_apispec, validation_middleware
from aiohttp_apigami.constants import APISPEC_PARSER

from schemas.common import ErrorSchema
from schemas.generate import GenerateResponseSchema
from schemas.jobs import ProgressLineSchema
from service import __version__
from service.app_keys import API_KEYS, JOBS, LIFECYCLE, POOL, SETTINGS, STORE, SUBMITTER
from service.edge.access_log import access_log_middleware
from service.edge.auth import auth_middleware
from service.edge.connections import body_deadline_middleware, peer_cap_middleware
from service.edge.errors import error_middleware, validation_error_callback
from service.edge.json_body import StrictJSONParser
from service.http.job_routes import JOB_ROUTES
from service.http.octet_stream import octet_stream_if_asked
from service.http.openapi_document import finish_document
from service.http.routes import ROUTES
from service.integrations.metrics import METRICS, METRICS_ROUTES, Metrics
from service.integrations.webhooks import WEBHOOKS, setup_webhooks
from service.jobs.admission import Admission
from service.jobs.image_store import ImageStore
from service.jobs.job_db import JobDatabase
from service.jobs.manager import JobManager
from service.jobs.submission import Submitter
from service.lifecycle import Lifecycle
from service.settings import Settings
from service.ui.page import UI_ROUTES, page_file_headers

log = logging.getLogger(__name__)

SPEC_URL = "/openapi.json"
DOCS_URL = "/docs"
EVICTION_PERIOD = 60.0  # at most; shorter when the retention time is short


# How long stopping workers may take: they finish the shard on their device and exit; after a stop
# that was cut short (a second SIGTERM, the grace period's end) they get a moment, then are killed.
WORKERS_STOP_SECONDS = 10.0
WORKERS_STOP_NOW_SECONDS = 1.0


async def _run_pool(app: web.Application) -> AsyncIterator[None]:
    """The pool lives exactly as long as the app: started before serving, stopped after."""
    pool = app[POOL]
    await pool.start()
    yield
    await pool.stop(WORKERS_STOP_NOW_SECONDS if app[LIFECYCLE].cut_short else WORKERS_STOP_SECONDS)


async def _run_jobs(app: web.Application) -> AsyncIterator[None]:
    """After the pool is up: resume the jobs a restart interrupted. At the end: tell the listeners
    of unfinished jobs that they resume later, before the pool stops."""
    jobs = app[JOBS]
    swept = await jobs.sweep()
    if swept:
        log.info("removed %d image file(s) that no job names (partial, or written just before a kill)", swept)
    resumed = await jobs.resume()
    if resumed:
        log.info("resumed %d unfinished job(s)", resumed)
    yield
    await jobs.stop()
    await jobs.db.run(jobs.db.close)  # on its own thread: close() then shuts its executor down, without waiting
    app[STORE].close()


async def _evict_expired(app: web.Application) -> AsyncIterator[None]:
    """Jobs that finished longer ago than the retention time go, with their images (never those of
    an unfinished job, however old its files)."""
    store = app[STORE]
    jobs = app[JOBS]

    async def evict_forever() -> None:
        while True:
            try:
                expired = await jobs.expire(store.retention_seconds)
                if expired:
                    log.info("removed %d expired job(s) and their images", expired)
            except (OSError, sqlite3.Error):
                log.exception("eviction failed")
            await asyncio.sleep(min(EVICTION_PERIOD, max(0.5, store.retention_seconds / 4)))

    task = asyncio.create_task(evict_forever())
    yield
    task.cancel()


def create_app(settings: Settings, pool: Any) -> web.Application:
    keys = settings.api_keys()
    # The per-peer cap counts a proxied client before its key is checked: a stranger has none.
    middlewares = [access_log_middleware, error_middleware, peer_cap_middleware]
    if keys:
        middlewares.append(auth_middleware(keys))
    middlewares.append(body_deadline_middleware(settings.body_timeout))
    middlewares.append(validation_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[API_KEYS] = keys
    app[POOL] = pool
    app[STORE] = ImageStore(settings.image_path, settings.image_retention, settings.image_dir_max_bytes)
    app[METRICS] = Metrics(tuple(entry.name for entry in keys) or ("",))
    app[JOBS] = JobManager(JobDatabase(settings.job_db_path), app[STORE], pool, on_first_image=app[METRICS].job_first_image)
    if hasattr(pool, "observers"):
        pool.observers.append(app[METRICS])
    app[METRICS].follow(app)
    app[LIFECYCLE] = Lifecycle()
    app.add_routes(ROUTES)
    app.add_routes(JOB_ROUTES)
    app.add_routes(UI_ROUTES)
    app.add_routes(METRICS_ROUTES)
    app.on_response_prepare.append(page_file_headers)
    app.cleanup_ctx.append(_run_pool)
    app.cleanup_ctx.append(_run_jobs)
    app.cleanup_ctx.append(_evict_expired)
    setup_webhooks(app)  # after the jobs: stopped before their database closes
    admission = Admission(settings, pool, app[STORE], app[LIFECYCLE], app[JOBS], len(keys), on_accepted=app[METRICS].count_accepted)
    app[SUBMITTER] = Submitter(app[JOBS], admission, app[WEBHOOKS].check)
    _document(app, secured=bool(keys))
    _allow_origins(app, settings.allowed_origins())
    return app


def _document(app: web.Application, secured: bool) -> None:
    """The OpenAPI spec at /openapi.json and Swagger UI at /docs; with keys, an Authorize button."""
    options: dict[str, Any] = {}
    if secured:
        options["security"] = [{"bearer": []}, {"apiKey": []}]
    api_spec = setup_aiohttp_apispec(
        app,
        title="SDXL Lightning API",
        version=__version__,
        url=SPEC_URL,
        swagger_path=DOCS_URL,
        openapi_version="3.0.3",
        in_place=False,
        info={
            "description": (
                "Batch 1024x576 image generation with SDXL-Lightning (8 steps). Errors are JSON `{\"detail\": ...}`. "
                "Each operation lists the statuses it answers; besides those, any route answers 503 with Retry-After, "
                "before anything else, when the server or one client address has too many connections open."
            )
        },
        **options,
    )
    api_spec.spec.components.schema("Error", schema=ErrorSchema)
    # Routed by content type in the /generate docs, so registered here rather than by a decorator.
    api_spec.spec.components.schema("GenerateResponse", schema=GenerateResponseSchema)
    api_spec.spec.components.schema("ProgressLine", schema=ProgressLineSchema)
    app.on_startup.append(finish_document)  # after apigami's hook, which builds the document
    app.on_response_prepare.append(octet_stream_if_asked)  # the document offers it for images and archives
    if secured:
        api_spec.spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
        api_spec.spec.components.security_scheme("apiKey", {"type": "apiKey", "in": "header", "name": "X-API-Key"})
    parser = StrictJSONParser()
    parser.error_callback = validation_error_callback
    app[APISPEC_PARSER] = parser


def _allow_origins(app: web.Application, origins: tuple[str, ...]) -> None:
    """CORS for browser clients on other origins; off unless origins are configured."""
    if not origins:
        return
    options = aiohttp_cors.ResourceOptions(
        allow_credentials=False, expose_headers=("X-Request-Id", "X-Job-Id", "Location", "Retry-After", "Idempotent-Replayed", "Content-Disposition", "X-Job-State", "X-Images-Done"),
        allow_headers=("Content-Type", "Authorization", "X-API-Key", "Idempotency-Key"),
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        cors.add(route)
