"""The webhook outbox: a table in the job database whose rows are written in the very transactions
that record what they tell (a job's end in ``JobDatabase.finish``, a shard's images in
``record_shard``), so no crash can record an event and lose its message, or the reverse. The
deliverer (``service/integrations/webhooks.py``) sends the rows and marks them.

A row is one message: its id (the ``webhook-id`` of every attempt, derived from the job, the event
and the image, so the same event can never be written twice), the key that owns its job, the URL,
the exact body that is signed (JSON, fixed when the event happens), the attempts so far and when
the next one is due. Bounded: a row is dead after the last attempt the policy allows, every row,
delivered, pending or dead, is removed with its job when the job expires (``ON DELETE CASCADE``),
and a key's pending rows are bounded at submit (``pending_of_owner``,
``--max-pending-webhooks-per-key``). Pending rows are indexed by due time, per key and in all, so
a delivery pass costs the same with 40,000 rows waiting as with 40.

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
from service.jobs.image_store import image_url

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
CREATE INDEX IF NOT EXISTS webhook_outbox_by_job ON webhook_outbox (job_id);
"""
# Read after the columns added since the first release exist (``open_outbox``). The pending rows
# of a key by due time (what a delivery pass reads: the due rows, the next due time, the per-key
# count), and a key's pending rows of one URL (its backoff). No more: each index is written at
# every attempt of every row.
_OUTBOX_INDEXES = """
DROP INDEX IF EXISTS webhook_outbox_pending;
CREATE INDEX IF NOT EXISTS webhook_outbox_due_by_owner ON webhook_outbox (owner, next_attempt_at)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS webhook_outbox_by_url ON webhook_outbox (owner, url)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
"""
_PENDING = "delivered_at IS NULL AND dead_at IS NULL"


def open_outbox(db: sqlite3.Connection) -> None:
    """The table and its indexes, on a new database or one written by an earlier release (whose
    rows gain their job's owner: the key that delivery shares and bounds by)."""
    db.executescript(OUTBOX_SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(webhook_outbox)")}
    if "owner" not in columns:
        db.execute("ALTER TABLE webhook_outbox ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
        db.execute("UPDATE webhook_outbox SET owner = COALESCE((SELECT owner FROM jobs WHERE jobs.id = job_id), '')")
    db.executescript(_OUTBOX_INDEXES)


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
    owner: str = ""


def target_of(url: str) -> str:
    """What "one delivery in flight per host and key" counts: the host, whatever the port or path."""
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
    """One message, with its job's owner, due now, or when its URL's backoff ends (``pause_url``:
    the key's messages to that URL that failed are the URL's next attempt)."""
    cursor = db.execute(
        "INSERT OR IGNORE INTO webhook_outbox (id, job_id, event, url, target, body, created_at, next_attempt_at, owner)"
        " SELECT ?, ?, ?, ?, ?, ?, ?, MAX(?, COALESCE((SELECT MIN(next_attempt_at) FROM webhook_outbox"
        f" WHERE owner = jobs.owner AND url = ? AND {_PENDING} AND attempts > 0), 0)), owner FROM jobs WHERE id = ?",
        (message_id(job_id, event, index), job_id, event, url, target_of(url), _body(event, now, data), now, now, url, job_id),
    )
    return cursor.rowcount


def _subscription(db: sqlite3.Connection, job_id: str) -> tuple[str, tuple[str, ...], str, BatchSpec] | None:
    row = db.execute("SELECT webhook_url, webhook_events, links_base, spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None or row[0] is None:
        return None
    url, events, links_base, spec = row
    return url, tuple(json.loads(events)), links_base or "", BatchSpec.from_json(spec)


def messages_of(events: tuple[str, ...], images: int) -> int:
    """The messages a job adds to the outbox: one per image with ``image.completed``, one at its end."""
    return (images if IMAGE_COMPLETED in events else 0) + (1 if {JOB_COMPLETED, JOB_FAILED} & set(events) else 0)


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
        {"index": index, "seed": seeds[index], "url": image_url(links_base, name)}
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
            "url": image_url(links_base, name),
            "images_done": images_done,
            "images_total": spec.total_images,
        }
        added += _insert(db, job_id, IMAGE_COMPLETED, url, data, now, index)
    return added


# ----- what the deliverer reads and marks -------------------------------------------------------


_ROW = "id, job_id, event, url, target, body, attempts, next_attempt_at, owner"


@dataclass(frozen=True)
class DueRows:
    """What one delivery pass reads: each key's due rows, earliest first, and when the first row
    that is not due yet falls due (None: no such row)."""

    by_owner: dict[str, list[OutboxRow]]
    next_due_at: float | None


def owners_waiting(db: sqlite3.Connection) -> list[str]:
    """The keys with pending rows: one index step per key (a skip scan), however many rows each has."""
    rows = db.execute(
        "WITH RECURSIVE owners(name) AS ("
        f" SELECT (SELECT MIN(owner) FROM webhook_outbox WHERE {_PENDING})"
        f" UNION ALL SELECT (SELECT MIN(owner) FROM webhook_outbox WHERE {_PENDING} AND owner > name)"
        " FROM owners WHERE name IS NOT NULL"
        ") SELECT name FROM owners WHERE name IS NOT NULL"
    ).fetchall()
    return [row[0] for row in rows]


def due_rows_of(db: sqlite3.Connection, owner: str, now: float, busy_hosts: frozenset[str], limit: int) -> list[OutboxRow]:
    """A key's due rows, earliest first, but for the hosts it has a delivery in flight to."""
    skip = ",".join("?" * len(busy_hosts))
    rows = db.execute(
        f"SELECT {_ROW} FROM webhook_outbox INDEXED BY webhook_outbox_due_by_owner"
        f" WHERE owner = ? AND {_PENDING} AND next_attempt_at <= ?"
        + (f" AND target NOT IN ({skip})" if busy_hosts else "")
        + " ORDER BY next_attempt_at LIMIT ?",
        (owner, now, *sorted(busy_hosts), limit),
    ).fetchall()
    return [OutboxRow(*row) for row in rows]


def due_rows(db: sqlite3.Connection, now: float, busy_hosts: dict[str, frozenset[str]], limit: int) -> DueRows:
    """One pass's reading of the outbox: its cost grows with the keys and the rows due, never with
    the rows waiting (the pending rows are indexed by due time)."""
    by_owner = {}
    later: float | None = None
    for owner in owners_waiting(db):
        rows = due_rows_of(db, owner, now, busy_hosts.get(owner, frozenset()), limit)
        if rows:
            by_owner[owner] = rows
        next_at = db.execute(
            "SELECT MIN(next_attempt_at) FROM webhook_outbox INDEXED BY webhook_outbox_due_by_owner"
            f" WHERE owner = ? AND {_PENDING} AND next_attempt_at > ?",
            (owner, now),
        ).fetchone()[0]
        if next_at is not None and (later is None or next_at < later):
            later = next_at
    return DueRows(by_owner, later)


def next_per_target(db: sqlite3.Connection) -> list[OutboxRow]:
    """Every key's pending row due first of each host (for tests and checks, not for delivery)."""
    rows = db.execute(
        "SELECT id, job_id, event, url, target, body, attempts, MIN(next_attempt_at), owner FROM webhook_outbox"
        f" WHERE {_PENDING} GROUP BY owner, target"
    ).fetchall()
    return [OutboxRow(*row) for row in rows]


def pause_url(db: sqlite3.Connection, owner: str, url: str, until: float) -> int:
    """A URL that failed: the key's other messages to it wait for its backoff too (one attempt per
    backoff, not one per message); no other URL, and no other key's messages, wait with it."""
    return db.execute(
        f"UPDATE webhook_outbox INDEXED BY webhook_outbox_by_url SET next_attempt_at = ? WHERE owner = ? AND url = ? AND {_PENDING}"
        " AND next_attempt_at < ?",
        (until, owner, url, until),
    ).rowcount


def pending_of_owner(db: sqlite3.Connection, owner: str) -> int:
    """A key's messages waiting, and those its unfinished jobs will still write: what
    ``--max-pending-webhooks-per-key`` bounds."""
    waiting = db.execute(
        f"SELECT COUNT(*) FROM webhook_outbox INDEXED BY webhook_outbox_due_by_owner WHERE owner = ? AND {_PENDING}", (owner,)
    ).fetchone()[0]
    to_come = 0
    for events, total, done in db.execute(
        "SELECT webhook_events, images_total, images_done FROM jobs WHERE state IN (?, ?) AND owner = ? AND webhook_url IS NOT NULL",
        (JobState.QUEUED, JobState.RUNNING, owner),
    ):
        names = tuple(json.loads(events))
        to_come += messages_of(names, total) - (done if IMAGE_COMPLETED in names else 0)
    return waiting + to_come


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
