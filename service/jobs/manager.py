"""Every accepted batch is a job that runs to its end whoever is listening.

The HTTP handler that accepted a job is only one listener: it may hang up (a tunnel dropping at
minute 3) and the job goes on, each finished shard stored as PNG files and recorded in the job
database before anyone is told. A later ``GET /jobs/{id}`` reads the result from there, and a
server restarted after a kill resumes the shards that had not finished.

One task per live job follows the pool's events for it; listeners get ``ShardStored`` per shard
and one ``JobEnded``. A listener is an unbounded queue, but its handler stops listening as soon
as its client is gone, so nothing accumulates for nobody.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from contract.batch import BatchSpec
from contract.failures import RequestFailed
from contract.formats import IMAGE_FORMATS
from gpu_workers.backend import RequestEvents, ShardBackend
from gpu_workers.ledger import Drained
from gpu_workers.messages import ShardDone, ShardTask
from gpu_workers.sharding import split_into_shards
from service.jobs.image_store import ImageStore
from service.jobs.refusal import status_for
from service.jobs.job_db import (
    CANCELLED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    Idempotency,
    JobDatabase,
    JobRecord,
    StoredImage,
    VariantOf,
)
from service.jobs.webhook_outbox import WebhookTarget

log = logging.getLogger(__name__)

CANCELLED_DETAIL = "The job was cancelled (DELETE /jobs/{id})."
# Waiting out a disk fault: the first retry after this long, doubling up to the most.
STORE_RETRY_FIRST = 0.5
STORE_RETRY_MAX = 10.0


@dataclass(frozen=True)
class ShardStored:
    """A shard's images, on disk and in the database: ``images`` (bytes) and ``image_ids`` (their
    file names) in shard order."""

    first_index: int
    images: tuple[bytes, ...]
    image_ids: tuple[str, ...]
    warnings: tuple[str, ...]
    images_done: int


@dataclass(frozen=True)
class JobEnded:
    """The job's last state, or ``interrupted`` when the server stops before it ends (it then
    resumes after the restart, so it is not a failure of the job)."""

    state: str
    detail: str | None = None
    interrupted: bool = False
    status: int = 500  # for a failure told before the status line: 503 when retrying later can help


JobEvent = ShardStored | JobEnded


@dataclass
class LiveJob:
    """A job that runs in this process now."""

    job_id: str
    spec: BatchSpec
    images_done: int
    created_at: float
    state: str = QUEUED
    owner: str = ""  # the API key's name: whose turn its shards take
    warnings: dict[str, None] = field(default_factory=dict)
    listeners: set[asyncio.Queue[JobEvent]] = field(default_factory=set)
    task: asyncio.Task[None] | None = None

    def listen(self) -> asyncio.Queue[JobEvent]:
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self.listeners.add(queue)
        return queue

    def stop_listening(self, queue: asyncio.Queue[JobEvent]) -> None:
        self.listeners.discard(queue)

    def publish(self, event: JobEvent) -> None:
        for queue in self.listeners:
            queue.put_nowait(event)


class JobManager:
    def __init__(
        self, db: JobDatabase, store: ImageStore, pool: ShardBackend, on_first_image: Callable[[float], None] | None = None
    ) -> None:
        self.db = db
        self.store = store
        self.pool = pool
        # Told the seconds from a job's acceptance to its first stored image (the metrics).
        self._on_first_image = on_first_image
        self._live: dict[str, LiveJob] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._reserved = 0
        self._reserved_by_owner: dict[str, int] = {}
        # Set by ``stop``: a job whose row is written after it is not run, but told it is interrupted.
        self._stopping = False

    # ----- lifecycle -------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Delete image files no job names (a kill between a file and its row) and partial ones."""
        known = await self.db.run(self.db.all_image_ids)
        return await self.store.run(self.store.sweep, known)

    async def resume(self) -> int:
        """Submit the unfinished shards of every job a stop or a kill interrupted."""
        records = await self.db.run(self.db.unfinished)
        for record in records:
            done = await self.db.run(self.db.image_ids, record.job_id)
            job = LiveJob(record.job_id, record.spec, len(done), record.created_at, state=record.state, owner=record.owner)
            job.warnings.update(dict.fromkeys(record.warnings))
            shards = [
                shard
                for shard in split_into_shards(record.job_id, record.spec)
                if shard.first_index not in done
            ]
            log.info("job %s resumes: %d of %d image(s) done, %d shard(s) to run", record.job_id, len(done), record.images_total, len(shards))
            self._run(job, shards)
        return len(records)

    async def stop(self) -> None:
        """Tell the listeners and stop following; the database keeps the jobs unfinished, so
        they resume on the next start."""
        self._stopping = True
        for job in list(self._live.values()):
            job.publish(_interrupted(job))
            if job.task is not None:
                job.task.cancel()
        tasks = [job.task for job in self._live.values() if job.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    # ----- what the routes use ---------------------------------------------------------------

    @property
    def idle(self) -> asyncio.Event:
        """Set while no job runs (what a graceful stop waits for)."""
        return self._idle

    @property
    def running_jobs(self) -> int:
        return len(self._live)

    @property
    def pending_images(self) -> int:
        """Images accepted and unfinished: the engine's, plus those admitted and not yet handed to
        it (their job is being written to the database). What the queue bound counts."""
        return self.pool.pending_images + self._reserved

    def pending_images_of(self, owner: str) -> int:
        """One owner's (API key's) images accepted and unfinished: what the per-key bound counts."""
        return self.pool.pending_images_of(owner) + self._reserved_by_owner.get(owner, 0)

    def reserve(self, images: int, owner: str = "") -> None:
        """Count an admitted request's images at once, before any ``await``, so that concurrent
        requests cannot all pass the bound; ``create`` hands them to the engine and releases them."""
        self._reserved += images
        self._reserved_by_owner[owner] = self._reserved_by_owner.get(owner, 0) + images

    def _release(self, images: int, owner: str) -> None:
        self._reserved -= images
        left = self._reserved_by_owner.get(owner, 0) - images
        if left:
            self._reserved_by_owner[owner] = left
        else:
            self._reserved_by_owner.pop(owner, None)

    async def create(
        self,
        job_id: str,
        spec: BatchSpec,
        owner: str = "",
        idempotency: Idempotency | None = None,
        webhook: WebhookTarget | None = None,
        variant_of: VariantOf | None = None,
    ) -> tuple[LiveJob, asyncio.Queue[JobEvent]]:
        """Record the job, then queue all its shards; the caller listens from the first event.
        Its images were reserved by admission: released here once the engine counts them.
        ``IdempotencyKeyTaken`` when a request with the same key got there first."""
        try:
            record = await self.db.run(self.db.create, job_id, spec, owner, idempotency, webhook, variant_of)
            job = LiveJob(job_id, spec, 0, record.created_at, owner=owner)
            listener = job.listen()
            if self._stopping:  # its row was written as the stop began: it resumes on the next start
                listener.put_nowait(_interrupted(job))
            else:
                self._run(job, split_into_shards(job_id, spec))
        finally:
            self._release(spec.total_images, owner)
        return job, listener

    async def record(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        """The job; with ``owner`` (``Caller.sees`` of ``service.http.asked``), None for another key's job."""
        return await self.db.run(self.db.get, job_id, owner)

    async def attach(self, job_id: str) -> tuple[LiveJob, asyncio.Queue[JobEvent]] | None:
        """Listen to a job accepted before (an idempotent retry): a running one from now on; one
        that has ended through a listener that holds its end already. None: no such job."""
        live = self._live.get(job_id)
        if live is not None:
            return live, live.listen()
        record = await self.record(job_id)
        if record is None:
            return None
        live = self._live.get(job_id)  # it may have started while the database answered
        if live is not None:
            return live, live.listen()
        job = LiveJob(record.job_id, record.spec, record.images_done, record.created_at, state=record.state)
        job.warnings.update(dict.fromkeys(record.warnings))
        listener = job.listen()
        listener.put_nowait(JobEnded(record.state, record.detail))
        return job, listener

    async def stored_images(self, job_id: str, since: int = 0) -> list[StoredImage]:
        return await self.db.run(self.db.stored_images, job_id, since)

    async def cancel(self, job_id: str) -> JobRecord | None:
        """Queued shards never run; a shard already running finishes and its images are kept."""
        job = self._live.get(job_id)
        if job is not None:
            await self.db.run(self.db.finish, job_id, CANCELLED, CANCELLED_DETAIL)
            job.state = CANCELLED
            self.pool.abandon(job_id)
        return await self.record(job_id)

    async def expire(self, retention_seconds: float) -> int:
        """Remove the jobs that ended longer ago than the retention time, and their images."""
        removed = await self.db.run(self.db.remove_finished_before, time.time() - retention_seconds)
        for image_ids in removed.values():
            await self.store.run(self.store.remove_all, image_ids)
        return len(removed)

    # ----- following one job -----------------------------------------------------------------

    def _run(self, job: LiveJob, shards: list[ShardTask]) -> None:
        self._live[job.job_id] = job
        self._idle.clear()
        handle = self.pool.submit(job.job_id, shards, job.owner) if shards else None
        job.task = asyncio.create_task(self._follow(job, handle), name=f"job-{job.job_id}")

    async def _follow(self, job: LiveJob, handle: RequestEvents | None) -> None:
        try:
            ended = await self._collect(job, handle) if handle is not None else JobEnded(DONE)
            await self.db.run(self.db.finish, job.job_id, ended.state, ended.detail)
            job.state = ended.state
            log.info("job %s %s: %d of %d image(s)%s", job.job_id, ended.state, job.images_done, job.spec.total_images,
                     f" ({ended.detail})" if ended.detail else "")
            job.publish(ended)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a fault of ours must end the job visibly
            log.exception("job %s: could not store its results", job.job_id)
            detail = "The server could not store the images because of an internal error; see its log."
            if handle is not None:
                self.pool.abandon(job.job_id)
            try:
                await self.db.run(self.db.finish, job.job_id, FAILED, detail)
            except Exception:  # noqa: BLE001
                log.exception("job %s: could not record its failure", job.job_id)
            job.publish(JobEnded(FAILED, detail))
        finally:
            self._live.pop(job.job_id, None)
            if not self._live:
                self._idle.set()

    async def _collect(self, job: LiveJob, handle: RequestEvents) -> JobEnded:
        first_index = {shard.shard_id: shard.first_index for shard in handle.shards}
        # Count the shards taken off the queue, not ``handle.complete``: the backend marks a shard
        # finished when its result arrives, which may be while an earlier one is still being stored
        # here, and the job must not end with that result still in the queue.
        to_store = len(handle.shards)
        while True:
            event = await handle.events.get()
            if isinstance(event, RequestFailed):
                return JobEnded(FAILED, event.detail, status=status_for(event.reason))
            if isinstance(event, Drained):
                return JobEnded(CANCELLED, CANCELLED_DETAIL)
            first = first_index[event.shard_id]
            extension = IMAGE_FORMATS[job.spec.image_format].extension
            image_ids, job.images_done = await self._store_until_stored(job.job_id, first, event, extension)
            if job.state == QUEUED:
                job.state = RUNNING
                if self._on_first_image is not None:
                    self._on_first_image(time.time() - job.created_at)
            job.warnings.update(dict.fromkeys(event.warnings))
            job.publish(ShardStored(first, event.images, image_ids, event.warnings, job.images_done))
            to_store -= 1
            if to_store == 0:
                return JobEnded(DONE) if job.state != CANCELLED else JobEnded(CANCELLED, CANCELLED_DETAIL)

    async def _store_until_stored(self, job_id: str, first_index: int, event: ShardDone, extension: str) -> tuple[tuple[str, ...], int]:
        """Store a finished shard, waiting out a disk or database fault (full, read-only, the folder
        gone, too many open files): the images stay in memory and the store is tried again, with a
        backoff, until it works. A fault of the disk never fails an accepted job; /health and
        admission say what is wrong meanwhile (``ImageStore.report``)."""
        delay = STORE_RETRY_FIRST
        while True:
            try:
                stored = await self.store.run(self._store_shard, job_id, first_index, event, extension)
            except (OSError, sqlite3.OperationalError) as exc:
                self.store.report(exc)
                await asyncio.sleep(delay)
                delay = min(STORE_RETRY_MAX, delay * 2)
                continue
            self.store.report(None)
            return stored

    def _store_shard(self, job_id: str, first_index: int, event: ShardDone, extension: str) -> tuple[tuple[str, ...], int]:
        """Files first, then one database transaction naming them (blocking: runs in a thread). On a
        fault the files written so far go again, so a retry leaves no orphan."""
        names: list[str] = []
        receipts = event.receipts or (None,) * len(event.images)
        try:
            stored = []
            for offset, (data, receipt) in enumerate(zip(event.images, receipts, strict=True)):
                names.append(self.store.save(data, extension))
                stored.append(StoredImage(first_index + offset, names[-1], hashlib.sha256(data).hexdigest(), len(data), receipt))
            return tuple(names), self.db.record_shard(job_id, first_index, stored, event.warnings)
        except BaseException:
            self.store.remove_all(names)
            raise


def _interrupted(job: LiveJob) -> JobEnded:
    """What a job's listeners hear when the server stops before the job ends."""
    return JobEnded(
        job.state,
        f"The server is shutting down; job {job.job_id} resumes when it is back (GET /jobs/{job.job_id}).",
        interrupted=True,
        status=503,
    )
