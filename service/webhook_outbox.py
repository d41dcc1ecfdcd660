"""The webhook outbox: a table in the job database whose rows are written in the very transactions
that record what they tell (a job's end in ``JobDatabase.finish``, a shard's images in
``record_shard``), so no crash can record an event and lose its message, or the reverse. The
deliverer (``service/webhooks.py``) sends the rows and marks them.

A row is one message: its id (the ``webhook-id`` of every attempt, derived from the job, the event
and the image, so the same event can never be written twice), the URL, the exact body that is
signed (JSON, fixed when the event happens), the attempts so far and when the next one is due.
Bounded: a row is dead after the last attempt the policy allows, and every row, delivered, pending
or dead, is removed with its job when the job expires (``ON DELETE CASCADE``).

Every function here takes the database connection and runs inside the caller's transaction (or
``JobDatabase.transaction``): SQL only, no I/O of its own.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime

from yarl import URL

from contract.batch import BatchSpec
from contract.states import JobState
from contract.webhooks import IMAGE_COMPLETED, JOB_COMPLETED, JOB_FAILED
from service.image_store import file_name

OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event TEXT NOT NULL,
    url TEXT NOT NULL,
    target TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    delivered_at REAL,
    dead_at REAL
);
CREATE INDEX IF NOT EXISTS webhook_outbox_pending ON webhook_outbox (target, next_attempt_at)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS webhook_outbox_by_job ON webhook_outbox (job_id);
"""
_PENDING = "delivered_at IS NULL AND dead_at IS NULL"


@dataclass(frozen=True)
class WebhookTarget:
    """Where a job's events go (``webhook_url``), which ones, and the base of the links in them
    (the server's public URL, or the host the job was submitted to)."""

    url: str
    events: tuple[str, ...]
    links_base: str


@dataclass(frozen=True)
class OutboxRow:
    """A message waiting for its next attempt."""

    message_id: str
    job_id: str
    event: str
    url: str
    target: str
    body: str
    attempts: int
    next_attempt_at: float


def target_of(url: str) -> str:
    """What "one delivery in flight per target" counts: the host, whatever the port or path."""
    return (URL(url).host or "").lower()


def message_id(job_id: str, event: str, index: int | None = None) -> str:
    """The same event of the same job has the same id, on every attempt and after any restart."""
    seed = f"{job_id}:{event}" if index is None else f"{job_id}:{event}:{index}"
    return "msg_" + hashlib.sha256(seed.encode()).hexdigest()[:32]


def _timestamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _body(event: str, now: float, data: dict) -> str:
    """The Standard Webhooks payload shape: ``type``, ``timestamp`` (of the event), ``data``. ASCII
    only, so the text that is signed and the bytes that are sent are the same."""
    return json.dumps({"type": event, "timestamp": _timestamp(now), "data": data}, ensure_ascii=True, separators=(",", ":"))


def _insert(db: sqlite3.Connection, job_id: str, event: str, url: str, data: dict, now: float, index: int | None = None) -> int:
    cursor = db.execute(
        "INSERT OR IGNORE INTO webhook_outbox (id, job_id, event, url, target, body, created_at, next_attempt_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (message_id(job_id, event, index), job_id, event, url, target_of(url), _body(event, now, data), now, now),
    )
    return cursor.rowcount


def _subscription(db: sqlite3.Connection, job_id: str) -> tuple[str, tuple[str, ...], str, BatchSpec] | None:
    row = db.execute("SELECT webhook_url, webhook_events, links_base, spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None or row[0] is None:
        return None
    url, events, links_base, spec = row
    return url, tuple(json.loads(events)), links_base or "", BatchSpec.from_json(spec)


def image_link(links_base: str, name: str) -> str:
    """An image's link, as ``service.job_result.image_url`` makes it."""
    return f"{links_base}/images/{file_name(name)}"


def enqueue_job_end(db: sqlite3.Connection, job_id: str, now: float) -> int:
    """After the job's row took its last state, in the same transaction: ``job.completed`` for a
    done job, ``job.failed`` for a failed or cancelled one, if the job asked for it. Rows added."""
    subscription = _subscription(db, job_id)
    if subscription is None:
        return 0
    url, events, links_base, spec = subscription
    state, images_done, detail = db.execute("SELECT state, images_done, detail FROM jobs WHERE id = ?", (job_id,)).fetchone()
    event = JOB_COMPLETED if state == JobState.DONE else JOB_FAILED
    if event not in events:
        return 0
    seeds = spec.seeds
    images = [
        {"index": index, "seed": seeds[index], "url": image_link(links_base, name)}
        for index, name in db.execute("SELECT idx, image_id FROM job_images WHERE job_id = ? ORDER BY idx", (job_id,))
    ]
    data = {
        "job_id": job_id,
        "state": str(state),
        "images_done": images_done,
        "images_total": spec.total_images,
        "detail": detail,
        "job_url": f"{links_base}/jobs/{job_id}",
        "images": images,
    }
    return _insert(db, job_id, event, url, data, now)


def enqueue_images(db: sqlite3.Connection, job_id: str, first_index: int, count: int, images_done: int, now: float) -> int:
    """After a shard's images were recorded, in the same transaction: one ``image.completed`` per
    image of the shard, if the job asked for them, with the file names as recorded (a shard
    recorded twice keeps its first names, and its messages are not written again). Rows added."""
    subscription = _subscription(db, job_id)
    if subscription is None or IMAGE_COMPLETED not in subscription[1]:
        return 0
    url, _, links_base, spec = subscription
    recorded = db.execute(
        "SELECT idx, image_id FROM job_images WHERE job_id = ? AND idx >= ? AND idx < ? ORDER BY idx", (job_id, first_index, first_index + count)
    ).fetchall()
    added = 0
    for index, name in recorded:
        data = {
            "job_id": job_id,
            "index": index,
            "seed": spec.seeds[index],
            "url": image_link(links_base, name),
            "images_done": images_done,
            "images_total": spec.total_images,
        }
        added += _insert(db, job_id, IMAGE_COMPLETED, url, data, now, index)
    return added


# ----- what the deliverer reads and marks -------------------------------------------------------


def next_per_target(db: sqlite3.Connection) -> list[OutboxRow]:
    """The pending row due first of each target (SQLite gives the bare columns of an aggregate
    query from the row that holds the MIN)."""
    rows = db.execute(
        "SELECT id, job_id, event, url, target, body, attempts, MIN(next_attempt_at) FROM webhook_outbox"
        f" WHERE {_PENDING} GROUP BY target"
    ).fetchall()
    return [OutboxRow(*row) for row in rows]


def pending_count(db: sqlite3.Connection) -> int:
    return db.execute(f"SELECT COUNT(*) FROM webhook_outbox WHERE {_PENDING}").fetchone()[0]


def mark_delivered(db: sqlite3.Connection, message: str, now: float) -> None:
    db.execute("UPDATE webhook_outbox SET delivered_at = ?, attempts = attempts + 1, last_error = NULL WHERE id = ?", (now, message))


def mark_failed(db: sqlite3.Connection, message: str, error: str, next_attempt_at: float | None, now: float) -> None:
    """One more failed attempt; ``next_attempt_at`` None: that was the last one (the row is dead)."""
    if next_attempt_at is None:
        db.execute("UPDATE webhook_outbox SET attempts = attempts + 1, last_error = ?, dead_at = ? WHERE id = ?", (error, now, message))
    else:
        db.execute(
            "UPDATE webhook_outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? WHERE id = ?",
            (error, next_attempt_at, message),
        )


@dataclass(frozen=True)
class Delivery:
    """What the outbox knows of one message (for tests and ``GET /jobs/{id}`` readers)."""

    message_id: str
    event: str
    attempts: int
    state: str  # pending, delivered or dead
    last_error: str | None


def deliveries(db: sqlite3.Connection, job_id: str) -> list[Delivery]:
    rows = db.execute(
        "SELECT id, event, attempts, delivered_at, dead_at, last_error FROM webhook_outbox WHERE job_id = ? ORDER BY created_at, id",
        (job_id,),
    ).fetchall()
    return [
        Delivery(message, event, attempts, "delivered" if delivered else "dead" if dead else "pending", error)
        for message, event, attempts, delivered, dead, error in rows
    ]
