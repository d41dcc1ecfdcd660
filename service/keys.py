"""Typed application keys: what the app holds, for every handler to read."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gpu_workers.devices import CudaInfo
from service.image_store import ImageStore
from service.jobs import JobManager
from service.lifecycle import Lifecycle
from service.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
# The pool is typed loosely so unit tests can hand in a fake with the same methods.
POOL = web.AppKey("pool", Any)
STORE = web.AppKey("store", ImageStore)
CUDA = web.AppKey("cuda", CudaInfo)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
JOBS = web.AppKey("jobs", JobManager)
