"""``GET /metrics``: what the server does, in Prometheus's text format (``prometheus-client``).

Counters and histograms are fed as things happen: the engine reports every shard's end
(``Scheduler.observers``), the job manager a job's first image, the access log every request and
every refusal. Levels (queue depth, jobs by state, workers, restarts) are read when scraped. Each
app has its own registry, so several apps in one process (the tests) never share numbers.
Labels are bounded: worker ids, route templates (never raw paths), statuses, and API key *names*
(never keys) from the operator's key file.

Prometheus's ``increase()`` and ``rate()`` see a series only from its first sample, so a labelled
counter born at its first value loses that first batch: every label value known in advance (refusal
statuses, key names, outcomes of the workers known at a scrape) is exported at 0 from the start.
No ``_created`` series: they double the series stored and Prometheus does not read them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from contract.failures import FailureReason
from contract.states import JobState, WorkerState
from gpu_workers.messages import ShardDone, ShardFailed, ShardTask
from schemas.common import UNAUTHORIZED

# The statuses that mean "not now" or "not this": what an operator watches for overload.
REFUSAL_STATUSES = frozenset({413, 429, 503, 507})
# Routes whose answers are never refusals: /health's 503 reports that no worker is ready (while the
# server starts, a monitor polls it), and the documentation is served whatever the load.
NEVER_REFUSED_ROUTES = frozenset({"/health", "/docs", "/openapi.json", "/static/swagger"})
IMAGE_OUTCOMES = ("finished", "failed")
SHARD_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
IMAGE_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 2, 4, 8, 30)
FIRST_IMAGE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# prometheus-client has no per-registry switch (client_python #973 chose a global one); no registry
# of this process wants them.
disable_created_metrics()


class Metrics:
    def __init__(self, key_names: tuple[str, ...] = ("",)) -> None:
        """``key_names``: the configured API keys' names ('' alone for a server without keys)."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.images = Counter("sdxl_images", "Images finished or failed, per worker", ["worker", "outcome"], registry=r)
        self.shard_seconds = Histogram("sdxl_shard_seconds", "Device seconds per finished shard", buckets=SHARD_BUCKETS, registry=r)
        self.image_seconds = Histogram("sdxl_image_seconds", "Device seconds per finished image (a shard's time over its images)", buckets=IMAGE_BUCKETS, registry=r)
        self.first_image = Histogram(
            "sdxl_time_to_first_image_seconds", "From a job's acceptance to its first stored image", buckets=FIRST_IMAGE_BUCKETS, registry=r
        )
        self.refusals = Counter("sdxl_refusals", "Requests refused before any work, by status", ["status"], registry=r)
        self.timeouts = Counter("sdxl_shard_timeouts", "Shards that ran past the shard timeout (their worker was replaced)", registry=r)
        self.requests = Histogram(
            "sdxl_request_duration_seconds", "HTTP requests by route template, method and status", ["route", "method", "status"],
            buckets=REQUEST_BUCKETS, registry=r,
        )
        self.accepted = Counter("sdxl_accepted_images", "Images accepted, per API key name ('' without keys)", ["key"], registry=r)
        for status in sorted(REFUSAL_STATUSES):
            self.refusals.labels(str(status))
        for name in key_names:
            self.accepted.labels(name)
        # Levels read at each scrape (``_Levels``): peak device memory per worker as reported, and
        # the jobs by state, which the route reads from the database before it renders.
        self.peaks: dict[str, int] = {}
        self.jobs_by_state: dict[str, int] = {}
        # Connections over --max-connections (answered 503 and closed before any handler ran):
        # counted by the listening site, which ``python -m service`` links here.
        self.refused_connections: Callable[[], int] = lambda: 0

    def count_accepted(self, owner: str, images: int) -> None:
        """``Admission.on_accepted``: images accepted, per API key name."""
        self.accepted.labels(owner).inc(images)

    def follow(self, app: web.Application) -> None:
        """Read the app's levels at each scrape (queue, jobs, workers)."""
        self.registry.register(_Levels(app, self))

    def know_workers(self, worker_ids: list[int]) -> None:
        """Each worker's image counters at 0 from the first scrape that knows the worker (local
        workers from the start, remote ones from their first heartbeat)."""
        for worker in worker_ids:
            for outcome in IMAGE_OUTCOMES:
                self.images.labels(str(worker), outcome)

    # ----- the engine's events (``Scheduler.observers``) -------------------------------------

    def shard_done(self, message: ShardDone) -> None:
        worker = str(message.worker_id)
        size = len(message.images)
        self.images.labels(worker, "finished").inc(size)
        self.shard_seconds.observe(message.seconds)
        if size:
            self.image_seconds.observe(message.seconds / size)
        if message.peak_memory_bytes:
            self.peaks[worker] = max(self.peaks.get(worker, 0), message.peak_memory_bytes)

    def shard_failed(self, message: ShardFailed, images: int) -> None:
        self.images.labels(str(message.worker_id), "failed").inc(images)

    def shards_lost(self, shards: list[ShardTask], culprit: ShardTask | None, reason: FailureReason, cause: str) -> None:
        if reason == FailureReason.SHARD_TIMEOUT and culprit is not None:
            self.timeouts.inc()

    # ----- the service's events --------------------------------------------------------------

    def job_first_image(self, seconds: float) -> None:
        self.first_image.observe(seconds)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).observe(seconds)
        if status in REFUSAL_STATUSES and route not in NEVER_REFUSED_ROUTES:
            self.refusals.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Levels(Collector):
    """What is true now, read at each scrape."""

    def __init__(self, app: web.Application, metrics: Metrics) -> None:
        self._app = app
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []  # read at scrape time only: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from service.app_keys import JOBS, POOL

        pool = self._app[POOL]
        queue = GaugeMetricFamily("sdxl_queue", "Work accepted and waiting for a worker", labels=["unit"])
        queue.add_metric(["images"], pool.queued_images)
        queue.add_metric(["shards"], getattr(pool, "queued_shards", 0))
        yield queue
        pending = GaugeMetricFamily("sdxl_pending_images", "Images accepted and not finished (what --max-queued-images bounds)")
        pending.add_metric([], self._app[JOBS].pending_images)
        yield pending
        jobs = GaugeMetricFamily("sdxl_jobs", "Jobs in the database by state (finished ones until they expire)", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], self._metrics.jobs_by_state.get(state.value, 0))
        yield jobs
        workers = pool.snapshot()
        states = GaugeMetricFamily("sdxl_workers", "Workers by state", labels=["state"])
        for state in WorkerState:
            states.add_metric([state.value], sum(w.state == state for w in workers))
        yield states
        restarts = CounterMetricFamily("sdxl_worker_restarts", "Times a worker was started again after it died", labels=["worker"])
        for worker in workers:
            restarts.add_metric([str(worker.worker_id)], worker.restarts)
        yield restarts
        peak = GaugeMetricFamily(
            "sdxl_device_memory_peak_bytes", "Peak device memory a worker reported (CUDA: allocated; CPU: the process's peak RSS)", labels=["worker"]
        )
        for worker, value in sorted(self._metrics.peaks.items()):
            peak.add_metric([worker], value)
        yield peak
        refused = CounterMetricFamily("sdxl_refused_connections", "Connections over --max-connections, answered 503 and closed")
        refused.add_metric([], self._metrics.refused_connections())
        yield refused


METRICS = web.AppKey("metrics", Metrics)


@docs(
    tags=["info"],
    summary="Prometheus metrics",
    operation_id="metrics",
    description="Prometheus text format (scrape it; see README, Monitoring). Needs an API key when the server has keys.",
    responses={200: {"description": "The metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}, **UNAUTHORIZED},
)
async def metrics(request: web.Request) -> web.Response:
    from service.app_keys import JOBS, POOL

    collected = request.app[METRICS]
    collected.know_workers([worker.worker_id for worker in request.app[POOL].snapshot()])
    collected.jobs_by_state = await request.app[JOBS].db.run(request.app[JOBS].db.count_by_state)
    body = collected.render()
    response = web.Response(body=body, headers={"Cache-Control": "no-store"})
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def observe(app: web.Application, route: str | None, method: str, status: int, seconds: float) -> None:
    """The access log's hook: one request's route template (None: it matched none), status and duration."""
    collected = app.get(METRICS)
    if collected is None:
        return
    collected.request(route or "unmatched", method, status, seconds)


METRICS_ROUTES = [web.get("/metrics", metrics, allow_head=False)]
