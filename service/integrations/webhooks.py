"""Webhooks: signed POSTs to the ``webhook_url`` a job was submitted with, sent from the durable
outbox in the job database (``service/jobs/webhook_outbox.py``), as the Standard Webhooks
specification describes them. Where the server may connect, and how it resolves a webhook host
(its own resolver, never the job database's or the image store's threads), is
``service/integrations/webhook_addresses.py``.

- **Submit** (``check_target``, the submitter's ``check_webhook``): a URL is taken only by a server that can sign (``--webhook-secret``),
  only while the key's outbox has room for the messages the job will add
  (``--max-pending-webhooks-per-key``, else a 429 that says so), and only if every address its
  host resolves to now is public (else a 400); all before any work. A key with
  ``LOOKUPS_PER_KEY`` lookups in flight gets a 429 at once rather than a place in a queue.
- **Deliver** (``WebhookDeliverer``): one task sends the outbox's due rows, fairly between keys:
  ``MAX_PARALLEL`` deliveries in flight in all, each free slot going to the key with the fewest
  in flight (ties in turn), no key more than ``per_key_slots()`` of them, so another key always
  finds a free slot at once; at most one delivery in flight per key and host, so one key's slow
  or failing host never holds another key's messages. ``--webhook-timeout`` for the whole
  attempt, redirects not followed (a 3xx is a failure), any 2xx a success. A failure is retried
  1 s later, doubling up to an hour, until ``--webhook-max-attempts`` (then the row is dead, and
  logged); the key's other messages to the same URL wait for that URL's backoff too (one attempt
  per backoff, not one per message), and nothing else does: not the key's other URLs on that host,
  not another key's messages to the same URL. Every attempt carries the row's ``webhook-id`` and a
  signature over ``id.timestamp.body`` made at that attempt, so a retry after a restart is the same
  message with a fresh timestamp. At least once: a delivery cut by a stop is not marked, and goes
  again.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import nullcontext
from datetime import UTC, datetime

import aiohttp
from aiohttp import web
from standardwebhooks import Webhook
from yarl import URL

from contract.webhooks import IMAGE_COMPLETED
from service import __version__
from service.app_keys import JOBS, SETTINGS
from service.jobs.job_db import JobDatabase
from service.jobs.refusal import Refusal
from service.settings import Settings
from service.integrations.webhook_addresses import CheckingResolver, HostResolver, LookupsBusy, TargetRefused, literal
from service.jobs.webhook_outbox import (
    OutboxRow,
    WebhookTarget,
    due_rows,
    mark_delivered,
    mark_failed,
    messages_of,
    pause_url,
    pending_count,
    pending_of_owner,
)

log = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 3600.0
MAX_PARALLEL = 16  # deliveries in flight, all keys and hosts together
IDLE_CHECK_SECONDS = 60.0  # the outbox is read at least this often (it is woken at every new row)
DB_RETRY_SECONDS = 5.0
LOOKUP_BUSY_RETRY_AFTER = "5"  # seconds: a lookup ends within RESOLVE_TIMEOUT
USER_AGENT = f"sdxl-lightning-server/{__version__} (webhooks)"


def retry_delay(failures: int) -> float:
    """The one backoff, of a message and of a URL: 1 s after the first failure, doubling to an hour."""
    return min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** min(failures - 1, 32))


def per_key_slots() -> int:
    """The deliveries one key may have in flight: three quarters of them, so that a key whose
    receivers all hang leaves slots free for the next key's message (it is never queued behind them)."""
    return max(1, MAX_PARALLEL * 3 // 4)


# ----- submit ----------------------------------------------------------------------------------


async def check_target(deliverer: WebhookDeliverer, owner: str, target: WebhookTarget, images: int) -> Refusal | None:
    """Whether a job of ``images`` images may send its events to ``target`` (None: it may), or the
    400/429/503 that refuses it. Awaits DNS: the submitter calls it before admission reserves the
    job's images."""
    settings = deliverer.settings
    if not settings.webhook_secret:
        return Refusal(
            400,
            "This server sends no webhooks: it has no signing secret, and unsigned webhooks are not sent. "
            "Its operator can set one with --webhook-secret whsec_... (SDXL_WEBHOOK_SECRET).",
        )
    full = await _outbox_full(deliverer.db, owner, messages_of(target.events, images), settings)
    if full is not None:
        return full
    parsed = URL(target.url)
    host, port = parsed.host or "", parsed.port or 443
    resolver = deliverer.resolver
    assert resolver is not None, "the deliverer starts with the app"
    try:
        async with resolver.slot(owner) if literal(host) is None else nullcontext():
            await resolver.checked_addresses(host, port, settings.webhook_allow_private)
    except LookupsBusy as exc:
        return Refusal(exc.status, f"webhook_url not checked: {exc.detail}.", headers={"Retry-After": LOOKUP_BUSY_RETRY_AFTER})
    except TargetRefused as exc:
        return Refusal(400, f"webhook_url refused: {exc}")
    return None


async def _outbox_full(db: JobDatabase, owner: str, adding: int, settings: Settings) -> Refusal | None:
    """The 429 of a key whose outbox has no room for this job's messages (None: it has). Read
    before admission: requests of one key in flight together may pass it together, by no more
    than their own messages."""
    bound = settings.max_pending_webhooks_per_key
    if not bound:
        return None
    pending = await db.run(db.transaction, functools.partial(pending_of_owner, owner=owner))
    if pending + adding <= bound:
        return None
    return Refusal(
        429,
        f"webhook_url refused: this API key has {pending} webhook message(s) waiting or still to come, and this request would "
        f"add {adding}: the limit is {bound} a key (--max-pending-webhooks-per-key). Messages leave the outbox when delivered "
        "or given up; a receiver that answers frees the room.",
    )


# ----- deliver ---------------------------------------------------------------------------------


class WebhookDeliverer:
    """Sends the outbox's rows as they fall due (see the module's docstring for the rules)."""

    def __init__(self, db: JobDatabase, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.timeout = settings.webhook_timeout
        self.max_attempts = settings.webhook_max_attempts
        self.allow_private = settings.webhook_allow_private
        self.nameservers = tuple(name.strip() for name in settings.webhook_nameservers.split(",") if name.strip())
        self.resolver: HostResolver | None = None  # made on the app's loop (``_run_deliverer``)
        self._signer = Webhook(settings.webhook_secret) if settings.webhook_secret else None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._sending: dict[tuple[str, str], asyncio.Task[None]] = {}  # (key, host) -> its one delivery in flight
        self._url_failures: dict[tuple[str, str], tuple[int, float]] = {}  # (key, URL) -> failures in a row, the last at
        self._forgotten_at = 0.0
        self._turn = itertools.count()  # which key goes first among equals: each in turn

    @property
    def enabled(self) -> bool:
        return self._signer is not None

    async def check(self, owner: str, target: WebhookTarget, images: int) -> Refusal | None:
        """The submitter's ``check_webhook``: ``check_target`` against this deliverer's outbox and resolver."""
        return await check_target(self, owner, target, images)

    def _written(self) -> None:
        """``JobDatabase.outbox_written``: called from the thread that committed new rows."""
        try:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop has closed: the next start reads the outbox anyway
            pass

    async def run(self) -> None:
        assert self.resolver is not None
        self._loop = asyncio.get_running_loop()
        self.db.outbox_written = self._written
        connector = aiohttp.TCPConnector(
            resolver=CheckingResolver(self.resolver, self.allow_private), use_dns_cache=False, force_close=True, limit=MAX_PARALLEL
        )
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, trust_env=False
        )
        try:
            while True:
                self._wake.clear()
                try:
                    wait = await self._start_due()
                except (sqlite3.Error, OSError):
                    log.exception("webhooks: cannot read the outbox; trying again in %g s", DB_RETRY_SECONDS)
                    wait = DB_RETRY_SECONDS
                try:  # not wait_for: on Python 3.11 it can swallow the cancel that stops the app
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            self.db.outbox_written = None
            sending = list(self._sending.values())
            for task in sending:
                task.cancel()  # not marked: sent again after the restart, with the same id
            await asyncio.gather(*sending, return_exceptions=True)
            await self._session.close()

    async def _start_due(self) -> float:
        """Start due rows into the free slots, fairly between keys; the seconds until the next row
        falls due (a row held back by a busy slot or host is woken by that delivery's end)."""
        self._forget_old_failures()
        while True:
            now = time.time()
            busy: dict[str, set[str]] = {}
            for owner, host in self._sending:
                busy.setdefault(owner, set()).add(host)
            due = await self.db.run(
                self.db.transaction,
                functools.partial(
                    due_rows, now=now, busy_hosts={owner: frozenset(hosts) for owner, hosts in busy.items()}, limit=2 * per_key_slots()
                ),
            )
            if not self._share(due.by_owner):  # nothing more can start now: wait for an end or a due time
                return IDLE_CHECK_SECONDS if due.next_due_at is None else min(IDLE_CHECK_SECONDS, max(0.0, due.next_due_at - now))

    def _forget_old_failures(self) -> None:
        """A URL that failed long ago starts its backoff afresh (its rows keep their own): the
        memory of failures stays bounded by the URLs failing lately."""
        now = time.time()
        if now - self._forgotten_at < IDLE_CHECK_SECONDS:
            return
        self._forgotten_at = now
        for url_key, (_, at) in list(self._url_failures.items()):
            if now - at > 2 * MAX_RETRY_SECONDS:
                del self._url_failures[url_key]

    def _share(self, by_owner: dict[str, list[OutboxRow]]) -> int:
        """Start rows into the free slots, each to the key with the fewest in flight (ties: each key
        in turn), at most ``per_key_slots()`` a key and one a key and host. Returns how many started."""
        in_flight = Counter(owner for owner, _ in self._sending)
        owners = sorted(by_owner)
        first = next(self._turn) % len(owners) if owners else 0
        order = {owner: position for position, owner in enumerate(owners[first:] + owners[:first])}
        waiting = {owner: iter(rows) for owner, rows in by_owner.items()}
        started = 0
        while waiting and len(self._sending) < MAX_PARALLEL:
            owner = min(waiting, key=lambda name: (in_flight[name], order[name]))
            row = next((row for row in waiting[owner] if (owner, row.target) not in self._sending), None)
            if row is None or in_flight[owner] >= per_key_slots():
                del waiting[owner]
                continue
            self._sending[(owner, row.target)] = asyncio.create_task(self._deliver(row), name=f"webhook-{row.message_id}")
            in_flight[owner] += 1
            order[owner] += len(order)  # behind the keys it ties with
            started += 1
        return started

    async def _deliver(self, row: OutboxRow) -> None:
        url_key = (row.owner, row.url)
        try:
            error = await self._attempt(row)
            now = time.time()
            if error is None:
                self._url_failures.pop(url_key, None)
                await self.db.run(self.db.transaction, functools.partial(mark_delivered, message=row.message_id, now=now))
                level = logging.DEBUG if row.event == IMAGE_COMPLETED else logging.INFO  # up to 150 a job
                log.log(level, "webhook %s %s of job %s delivered (attempt %d)", row.message_id, row.event, row.job_id, row.attempts + 1)
                return
            failures = self._url_failures.get(url_key, (0, now))[0] + 1
            self._url_failures[url_key] = (failures, now)
            attempts = row.attempts + 1
            next_at = now + retry_delay(attempts) if attempts < self.max_attempts else None
            await self.db.run(
                self.db.transaction,
                functools.partial(self._record_failure, row=row, error=error, next_at=next_at, url_paused_until=now + retry_delay(failures), now=now),
            )
            if next_at is None:
                log.warning("webhook %s %s of job %s given up after %d attempt(s): %s", row.message_id, row.event, row.job_id, attempts, error)
            else:
                log.info("webhook %s %s of job %s: attempt %d failed (%s); next in %.0f s", row.message_id, row.event, row.job_id, attempts, error, next_at - now)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the row stays pending and goes again: at least once
            log.exception("webhook %s: could not record the attempt", row.message_id)
            await asyncio.sleep(DB_RETRY_SECONDS)  # its slot stays taken meanwhile: no tight loop on a sick database
        finally:
            self._sending.pop((row.owner, row.target), None)
            self._wake.set()

    @staticmethod
    def _record_failure(db: sqlite3.Connection, row: OutboxRow, error: str, next_at: float | None, url_paused_until: float, now: float) -> None:
        """The row's failed attempt and its URL's backoff, in one transaction."""
        mark_failed(db, message=row.message_id, error=error, next_attempt_at=next_at, now=now)
        pause_url(db, row.owner, row.url, url_paused_until)

    async def _attempt(self, row: OutboxRow) -> str | None:
        """One POST; None on a 2xx, else what went wrong, in a few words."""
        assert self._session is not None and self._signer is not None and self.resolver is not None
        url = URL(row.url)
        try:
            address = literal(url.host or "")
            if address is not None:  # aiohttp connects to a literal without asking the resolver
                await self.resolver.checked_addresses(str(address), url.port or 443, self.allow_private)
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                "webhook-id": row.message_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": self._signer.sign(row.message_id, datetime.fromtimestamp(timestamp, UTC), row.body),
            }
            async with self._session.post(
                url, data=row.body.encode(), headers=headers, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as response:
                if 200 <= response.status < 300:
                    return None
                if 300 <= response.status < 400:
                    return f"HTTP {response.status}, a redirect (not followed)"
                return f"HTTP {response.status}"
        except TargetRefused as exc:
            return f"refused: {exc}"
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, TargetRefused):
                return f"refused: {exc.os_error}"
            return f"cannot connect: {exc.os_error.strerror or exc.os_error.__class__.__name__}"
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"{exc.__class__.__name__}: {exc}"


WEBHOOKS = web.AppKey("webhooks", WebhookDeliverer)


def setup_webhooks(app: web.Application) -> None:
    """The deliverer as part of the app: after the jobs (their database), stopped before them."""
    app[WEBHOOKS] = WebhookDeliverer(app[JOBS].db, app[SETTINGS])
    app.cleanup_ctx.append(_run_deliverer)


async def _run_deliverer(app: web.Application) -> AsyncIterator[None]:
    deliverer = app[WEBHOOKS]
    waiting = await deliverer.db.run(deliverer.db.transaction, pending_count)
    if not deliverer.enabled:
        if waiting:
            log.warning("%d webhook message(s) wait in the outbox, but --webhook-secret is not set: they are sent once it is", waiting)
        yield
        return
    deliverer.resolver = HostResolver(deliverer.nameservers)
    log.info(
        "webhooks: on, signed; %s; names resolved by %s; %d message(s) waiting",
        "private addresses allowed" if deliverer.allow_private else "private addresses refused",
        ", ".join(deliverer.nameservers) or "the system's nameservers",
        waiting,
    )
    task = asyncio.create_task(deliverer.run(), name="webhook-deliverer")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await deliverer.resolver.close()
