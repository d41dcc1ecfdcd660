"""The durable record of every job, in an embedded SQLite database (stdlib ``sqlite3``, WAL mode).

A job's row is written when it is accepted, and each finished shard is one transaction that adds
its image ids and the new count, after the PNG files themselves were renamed into place. So at any
moment the database names only images that exist, and a server killed at any point restarts
knowing exactly which shards are finished and which must run again.

Calls block (a few milliseconds at most in WAL mode with ``synchronous=NORMAL``); the job manager
makes them from a thread. One connection is shared under a lock: writes are tiny and serialised
anyway, and a single writer never sees ``database is locked``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from contract.batch import BatchSpec
from contract.states import UNFINISHED_JOB_STATES as UNFINISHED_STATES
from contract.states import JobState
from service.jobs import webhook_outbox
from service.jobs.webhook_outbox import WebhookTarget

T = TypeVar("T")
QUEUED, RUNNING, DONE, FAILED, CANCELLED = JobState.QUEUED, JobState.RUNNING, JobState.DONE, JobState.FAILED, JobState.CANCELLED

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    images_total INTEGER NOT NULL,
    images_done INTEGER NOT NULL DEFAULT 0,
    detail TEXT,
    warnings TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE TABLE IF NOT EXISTS job_images (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    image_id TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
);
"""
# Columns added after the first release: a database written before gains them on open (with
# defaults that say "not known" for the rows it already holds).
_ADDED_COLUMNS = {
    "jobs": {
        # Who submitted the job (``Submission.owner``: the key's name, never the key itself); '' with no keys.
        "owner": "TEXT NOT NULL DEFAULT ''",
        # Idempotency-Key of the request and a hash of its validated body.
        "idempotency_key": "TEXT",
        "request_hash": "TEXT",
        # Where its webhook events go, which ones (JSON list), and the base of the links in them
        # (``service.jobs.webhook_outbox.WebhookTarget``); NULL: no webhook.
        "webhook_url": "TEXT",
        "webhook_events": "TEXT",
        "links_base": "TEXT",
        # A re-roll of one image of another job (``service.jobs.variants``): that job and the image's
        # index; NULL for a batch of its own.
        "parent_job_id": "TEXT",
        "parent_index": "INTEGER",
    },
    "job_images": {"sha256": "TEXT", "bytes": "INTEGER", "receipt": "TEXT"},
}
_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_idempotency_key ON jobs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_parent ON jobs (parent_job_id, created_at) WHERE parent_job_id IS NOT NULL;
"""


class IdempotencyKeyTaken(Exception):
    """Another job was created with this owner's key first (two requests at once)."""


@dataclass(frozen=True)
class StoredImage:
    """One stored image of a job: its file name in the image store, and what the archive's
    manifest says of it."""

    index: int
    name: str
    sha256: str | None
    bytes: int | None
    receipt: str | None


@dataclass(frozen=True)
class VariantOf:
    """The image a re-roll makes again with another seed: its job (the parent) and its index there."""

    job_id: str
    index: int


@dataclass(frozen=True)
class Idempotency:
    """A request's ``Idempotency-Key`` and the hash of its body, within its owner's keys."""

    key: str
    request_hash: str


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    state: str
    spec: BatchSpec
    images_done: int
    detail: str | None
    warnings: tuple[str, ...]
    created_at: float
    updated_at: float
    finished_at: float | None
    owner: str = ""

    @property
    def images_total(self) -> int:
        return self.spec.total_images

    @property
    def finished(self) -> bool:
        return self.state not in UNFINISHED_STATES


class JobDatabase:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a process kill
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._add_missing_columns()
        self._db.executescript(_INDEXES)
        webhook_outbox.open_outbox(self._db)
        # Called (from the writing thread) after a commit that added webhook messages: the
        # deliverer's wake-up (``service.integrations.webhooks``).
        self.outbox_written: Callable[[], None] | None = None
        # The database's own threads: nothing else (a name to resolve, an image file) can take them,
        # so a slow thing elsewhere never queues a job read behind it. Two: one connection under a
        # lock runs one call at a time; the second is ready when the first is done.
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="job-db")

    async def run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call(*args, **kwargs)`` (a method of this database) on the database's own threads."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(call, *args, **kwargs))

    def _add_missing_columns(self) -> None:
        for table, columns in _ADDED_COLUMNS.items():
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, declaration in columns.items():
                if name not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self.executor.shutdown(wait=False)

    def create(
        self,
        job_id: str,
        spec: BatchSpec,
        owner: str = "",
        idempotency: Idempotency | None = None,
        webhook: WebhookTarget | None = None,
        variant_of: VariantOf | None = None,
    ) -> JobRecord:
        """Write an accepted job; ``IdempotencyKeyTaken`` when its owner's key names a job already."""
        now = time.time()
        key, request_hash = (idempotency.key, idempotency.request_hash) if idempotency else (None, None)
        hook = (webhook.url, json.dumps(list(webhook.events)), webhook.links_base) if webhook else (None, None, None)
        parent = (variant_of.job_id, variant_of.index) if variant_of else (None, None)
        try:
            with self._lock, self._db:
                self._db.execute("BEGIN")
                self._db.execute(
                    "INSERT INTO jobs (id, state, spec, images_total, created_at, updated_at, owner, idempotency_key, request_hash,"
                    " webhook_url, webhook_events, links_base, parent_job_id, parent_index) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, QUEUED, spec.to_json(), spec.total_images, now, now, owner, key, request_hash, *hook, *parent),
                )
        except sqlite3.IntegrityError as exc:
            if key is not None and "idempotency_key" in str(exc):
                raise IdempotencyKeyTaken(key) from exc
            raise
        return JobRecord(job_id, QUEUED, spec, 0, None, (), now, now, None, owner)

    def by_idempotency_key(self, owner: str, key: str) -> tuple[JobRecord, str] | None:
        """The job an owner's ``Idempotency-Key`` created, and the hash of that request's body."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS}, request_hash FROM jobs WHERE owner = ? AND idempotency_key = ?", (owner, key)
            ).fetchone()
        return None if row is None else (_record(row[:-1]), row[-1])

    def list_jobs(self, owner: str | None, limit: int, before: tuple[float, str] | None = None) -> list[JobRecord]:
        """Jobs newest first; ``owner`` None: everyone's; ``before``: (created_at, id) of the last
        job of the previous page (a cursor that stays right while new jobs arrive)."""
        where, args = ["parent_job_id IS NULL"], []  # a re-roll shows with its job, not as a job of its own
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if before is not None:
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            args += [before[0], before[0], before[1]]
        clause = f"WHERE {' AND '.join(where)}"
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs {clause} ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit)
            ).fetchall()
        return [_record(row) for row in rows]

    def variants(self, parent_job_id: str) -> list[tuple[int, JobRecord, StoredImage | None]]:
        """The re-rolls of a job's images, oldest first: the image's index, the re-roll's job and
        its one image once stored (``service.jobs.variants``), in one query."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT parent_index, {_PREFIXED_COLUMNS}, i.idx, i.image_id, i.sha256, i.bytes, i.receipt"
                " FROM jobs j LEFT JOIN job_images i ON i.job_id = j.id AND i.idx = 0"
                " WHERE j.parent_job_id = ? ORDER BY j.created_at, j.id",
                (parent_job_id,),
            ).fetchall()
        width = len(_COLUMNS.split(","))
        return [(row[0], _record(row[1 : 1 + width]), None if row[1 + width] is None else StoredImage(*row[1 + width :])) for row in rows]

    def count_by_state(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())

    def stored_images(self, job_id: str, since: int = 0) -> list[StoredImage]:
        """The job's stored images with index ``since`` and up, in index order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT idx, image_id, sha256, bytes, receipt FROM job_images WHERE job_id = ? AND idx >= ? ORDER BY idx",
                (job_id, since),
            ).fetchall()
        return [StoredImage(*row) for row in rows]

    def record_shard(self, job_id: str, first_index: int, images: Iterable[StoredImage | str], warnings: Iterable[str]) -> int:
        """One finished shard, in one transaction; returns the job's images done. ``images`` in
        shard order (a bare file name: nothing known of it but its name)."""
        rows = []
        for offset, image in enumerate(images):
            if isinstance(image, str):
                image = StoredImage(first_index + offset, image, None, None, None)
            rows.append((job_id, first_index + offset, image.name, image.sha256, image.bytes, image.receipt))
        with self._lock, self._db:
            self._db.execute("BEGIN")
            added = self._db.executemany(
                "INSERT OR IGNORE INTO job_images (job_id, idx, image_id, sha256, bytes, receipt) VALUES (?, ?, ?, ?, ?, ?)", rows
            ).rowcount
            known = json.loads(self._db.execute("SELECT warnings FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
            merged = list(dict.fromkeys([*known, *warnings]))
            self._db.execute(
                "UPDATE jobs SET images_done = images_done + ?, warnings = ?, updated_at = ?,"
                " state = CASE WHEN state = ? THEN ? ELSE state END WHERE id = ?",
                (added, json.dumps(merged), time.time(), QUEUED, RUNNING, job_id),
            )
            done = self._db.execute("SELECT images_done FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            messages = webhook_outbox.enqueue_images(self._db, job_id, first_index, len(rows), done, time.time())
        self._told_outbox(messages)
        return done

    def finish(self, job_id: str, state: str, detail: str | None = None) -> None:
        """The job's last state; a cancelled job stays cancelled whatever its running shards did."""
        now = time.time()
        with self._lock, self._db:
            self._db.execute("BEGIN")
            ended = self._db.execute(
                "UPDATE jobs SET state = ?, detail = COALESCE(?, detail), updated_at = ?, finished_at = ?"
                " WHERE id = ? AND state IN (?, ?)",
                (state, detail, now, now, job_id, *UNFINISHED_STATES),
            ).rowcount
            # Its webhook message in the same transaction: no crash can record the end and lose it.
            messages = webhook_outbox.enqueue_job_end(self._db, job_id, now) if ended else 0
        self._told_outbox(messages)

    def _told_outbox(self, messages: int) -> None:
        if messages and self.outbox_written is not None:
            self.outbox_written()

    def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work(connection)`` in one transaction under the lock: for the tables other modules
        keep here (the webhook outbox, ``service/jobs/webhook_outbox.py``)."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            return work(self._db)

    def get(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        """The job; with ``owner``, only if that key made it: another key's job is not found, exactly
        as one that never existed (the query itself asks, so no caller can forget to)."""
        owned, args = ("", (job_id,)) if owner is None else (" AND owner = ?", (job_id, owner))
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?{owned}", args).fetchone()
        return None if row is None else _record(row)

    def image_ids(self, job_id: str) -> dict[int, str]:
        """The stored images of a job, by their index in the request."""
        return {image.index: image.name for image in self.stored_images(job_id)}

    def all_image_ids(self) -> set[str]:
        """Every image any job names (what the image folder may hold)."""
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT image_id FROM job_images")}

    def unfinished(self) -> list[JobRecord]:
        """Jobs a restart interrupted, oldest first: they resume in the order they were accepted."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state IN (?, ?) ORDER BY created_at", UNFINISHED_STATES
            ).fetchall()
        return [_record(row) for row in rows]

    def remove_finished_before(self, cutoff: float) -> dict[str, list[str]]:
        """Delete the jobs that ended before ``cutoff``; returns their image ids, for the files."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            ids = [row[0] for row in self._db.execute("SELECT id FROM jobs WHERE finished_at < ?", (cutoff,))]
            removed: dict[str, list[str]] = {}
            for job_id in ids:
                removed[job_id] = [r[0] for r in self._db.execute("SELECT image_id FROM job_images WHERE job_id = ?", (job_id,))]
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return removed


_COLUMNS = "id, state, spec, images_done, detail, warnings, created_at, updated_at, finished_at, owner"
_PREFIXED_COLUMNS = ", ".join(f"j.{name.strip()}" for name in _COLUMNS.split(","))


def _record(row: tuple) -> JobRecord:
    job_id, state, spec, done, detail, warnings, created, updated, finished, owner = row
    return JobRecord(job_id, state, BatchSpec.from_json(spec), done, detail, tuple(json.loads(warnings)), created, updated, finished, owner)
