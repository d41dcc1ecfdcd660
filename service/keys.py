"""Typed application keys: what the app holds, for every handler to read."""

from __future__ import annotations

from aiohttp import web

from gpu_workers.backend import ShardBackend
from gpu_workers.devices import CudaInfo
from service.image_store import ImageStore
from service.jobs import JobManager
from service.lifecycle import Lifecycle
from service.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
# The local pool or, later, a broker for other boxes: the service sees only the seam.
POOL = web.AppKey("pool", ShardBackend)
STORE = web.AppKey("store", ImageStore)
CUDA = web.AppKey("cuda", CudaInfo)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
JOBS = web.AppKey("jobs", JobManager)
