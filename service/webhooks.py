"""Webhooks: signed POSTs to the ``webhook_url`` a job was submitted with, sent from the durable
outbox in the job database (``service/webhook_outbox.py``), as the Standard Webhooks
specification describes them.

- **Submit** (``webhook_of``): a URL is taken only by a server that can sign (``--webhook-secret``),
  and only if every address its host resolves to now is public; otherwise a 400 before any work.
- **Deliver** (``WebhookDeliverer``): one task sends the outbox's due rows: at most one delivery in
  flight per target (host) and ``MAX_PARALLEL`` in all, ``--webhook-timeout`` for the whole attempt,
  redirects not followed (a 3xx is a failure), any 2xx a success. A failure is retried 1 s later,
  doubling up to an hour, until ``--webhook-max-attempts`` (then the row is dead, and logged); a
  target that fails is left alone for the same backoff, whatever else waits for it. Every attempt
  carries the row's ``webhook-id`` and a signature over ``id.timestamp.body`` made at that attempt,
  so a retry after a restart is the same message with a fresh timestamp. At least once: a delivery
  cut by a stop is not marked, and goes again.
- **Where the server may connect**: the host is resolved again at every attempt by the resolver
  aiohttp connects through (``CheckingResolver``), which refuses the attempt if any address is
  loopback, private, link-local, multicast, reserved or unspecified (``--webhook-allow-private``
  lifts all but multicast and unspecified) and hands aiohttp only the addresses it checked. So the
  address checked is the address connected to: a name that resolves to a public address at submit
  and to 127.0.0.1 later (DNS rebinding) never reaches 127.0.0.1. An IP literal skips aiohttp's
  resolver, so it is checked before the request. The name stays in the URL: Host header, SNI and
  the certificate check are those of the name.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from standardwebhooks import Webhook
from yarl import URL

from contract.webhooks import IMAGE_COMPLETED
from service import __version__
from service.errors import json_error
from service.job_db import JobDatabase
from service.job_listening import base_url
from service.keys import JOBS, SETTINGS
from service.settings import Settings
from service.webhook_outbox import OutboxRow, WebhookTarget, mark_delivered, mark_failed, next_per_target, pending_count

log = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 3600.0
MAX_PARALLEL = 16  # deliveries in flight, all targets together
RESOLVE_TIMEOUT = 5.0  # seconds a submit waits for the webhook host's addresses
IDLE_CHECK_SECONDS = 60.0  # the outbox is read at least this often (it is woken at every new row)
DB_RETRY_SECONDS = 5.0
USER_AGENT = f"sdxl-lightning-server/{__version__} (webhooks)"
_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


def retry_delay(failures: int) -> float:
    """The one backoff, of a message and of a target: 1 s after the first failure, doubling to an hour."""
    return min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** min(failures - 1, 32))


# ----- where the server may connect --------------------------------------------------------------


class TargetRefused(OSError):
    """A webhook host the server will not call (its sentence says why), or one that does not resolve."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_problem(address: IPAddress, allow_private: bool) -> str | None:
    """What kind of address this is, where the server must not call it; None: it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 on a dual-stack socket
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if allow_private:
        return None
    for kind, test in (
        ("a loopback", address.is_loopback),
        ("a link-local", address.is_link_local),
        ("a reserved", address.is_reserved),
        ("a private", address.is_private),
        ("a site-local", isinstance(address, ipaddress.IPv6Address) and address.is_site_local),
        ("a non-public", not address.is_global),  # e.g. 100.64.0.0/10, carrier-grade NAT
    ):
        if test:
            return f"{kind} address"
    return None


async def resolve_host(host: str, port: int) -> list[tuple[int, str]]:
    """Every (family, address) the host resolves to now. Tests replace this function."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys((family, sockaddr[0]) for family, _, _, _, sockaddr in infos))


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _refusal(what: str, problem: str, allow_private: bool) -> TargetRefused:
    if allow_private or problem in ("an unspecified address", "a multicast address"):
        return TargetRefused(f"{what} {problem}, which is never a webhook target.")
    return TargetRefused(
        f"{what} {problem}; this server sends webhooks to public addresses only "
        "(its operator can allow private ones with --webhook-allow-private)."
    )


async def checked_addresses(host: str, port: int, allow_private: bool) -> list[tuple[int, str]]:
    """The host's addresses, each one allowed; ``TargetRefused`` if any is not, or none resolves."""
    literal = _literal(host)
    if literal is not None:
        problem = address_problem(literal, allow_private)
        if problem:
            raise _refusal(f"the address {host} is", problem, allow_private)
        return [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, str(literal))]
    try:
        addresses = await resolve_host(host, port)
    except (OSError, UnicodeError) as exc:
        raise TargetRefused(f"the host {host} cannot be resolved ({exc.__class__.__name__}).") from exc
    if not addresses:
        raise TargetRefused(f"the host {host} resolves to no address.")
    for _, address in addresses:
        problem = address_problem(ipaddress.ip_address(address.split("%", 1)[0]), allow_private)
        if problem:
            raise _refusal(f"the host {host} resolves to", problem, allow_private)
    return addresses


class CheckingResolver(AbstractResolver):
    """aiohttp's resolver for webhook deliveries: only addresses that passed the check, resolved at
    the moment of connecting (no cache), so the check cannot be raced by the name's next answer."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        addresses = await checked_addresses(host, port, self.allow_private)
        return [
            ResolveResult(hostname=host, host=address, port=port, family=found, proto=0, flags=_NUMERIC)
            for found, address in addresses
            if family in (socket.AF_UNSPEC, found)
        ]

    async def close(self) -> None:
        pass


# ----- submit ----------------------------------------------------------------------------------


async def webhook_of(request: web.Request, data: dict[str, Any]) -> WebhookTarget | None | web.Response:
    """The webhook of a valid body (None: it has none), or the 400 that refuses it. Awaits DNS:
    call it before admission reserves the request's images."""
    url = data.get("webhook_url")
    if url is None:
        return None
    settings = request.app[SETTINGS]
    if not settings.webhook_secret:
        return json_error(
            400,
            "This server sends no webhooks: it has no signing secret, and unsigned webhooks are not sent. "
            "Its operator can set one with --webhook-secret whsec_... (SDXL_WEBHOOK_SECRET).",
        )
    parsed = URL(url)
    host, port = parsed.host or "", parsed.port or 443
    try:
        await asyncio.wait_for(checked_addresses(host, port, settings.webhook_allow_private), RESOLVE_TIMEOUT)
    except TargetRefused as exc:
        return json_error(400, f"webhook_url refused: {exc}")
    except TimeoutError:
        return json_error(400, f"webhook_url refused: the host {host} did not resolve within {RESOLVE_TIMEOUT:g} s.")
    return WebhookTarget(url, tuple(data["webhook_events"]), base_url(request))


# ----- deliver ---------------------------------------------------------------------------------


class WebhookDeliverer:
    """Sends the outbox's rows as they fall due (see the module's docstring for the rules)."""

    def __init__(self, db: JobDatabase, settings: Settings) -> None:
        self.db = db
        self.timeout = settings.webhook_timeout
        self.max_attempts = settings.webhook_max_attempts
        self.allow_private = settings.webhook_allow_private
        self._signer = Webhook(settings.webhook_secret) if settings.webhook_secret else None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._sending: dict[str, asyncio.Task[None]] = {}  # target -> its one delivery in flight
        self._target_failures: dict[str, int] = {}
        self._paused_until: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return self._signer is not None

    def _written(self) -> None:
        """``JobDatabase.outbox_written``: called from the thread that committed new rows."""
        try:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop has closed: the next start reads the outbox anyway
            pass

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.db.outbox_written = self._written
        connector = aiohttp.TCPConnector(
            resolver=CheckingResolver(self.allow_private), use_dns_cache=False, force_close=True, limit=MAX_PARALLEL
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
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
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
        """Start the due row of every idle target; the seconds until the next one falls due."""
        rows = await asyncio.to_thread(self.db.transaction, next_per_target)
        now = time.time()
        waiting = {row.target for row in rows}
        for target in (set(self._target_failures) | set(self._paused_until)) - waiting:
            self._target_failures.pop(target, None)  # nothing left for it: forget its backoff
            self._paused_until.pop(target, None)
        wait = IDLE_CHECK_SECONDS
        for row in rows:
            if row.target in self._sending:
                continue  # its end wakes the loop
            due = max(row.next_attempt_at, self._paused_until.get(row.target, 0.0))
            if due > now:
                wait = min(wait, due - now)
            elif len(self._sending) < MAX_PARALLEL:
                self._sending[row.target] = asyncio.create_task(self._deliver(row), name=f"webhook-{row.message_id}")
        return wait

    async def _deliver(self, row: OutboxRow) -> None:
        try:
            error = await self._attempt(row)
            now = time.time()
            if error is None:
                self._target_failures.pop(row.target, None)
                self._paused_until.pop(row.target, None)
                await asyncio.to_thread(self.db.transaction, functools.partial(mark_delivered, message=row.message_id, now=now))
                level = logging.DEBUG if row.event == IMAGE_COMPLETED else logging.INFO  # up to 150 a job
                log.log(level, "webhook %s %s of job %s delivered (attempt %d)", row.message_id, row.event, row.job_id, row.attempts + 1)
                return
            failures = self._target_failures[row.target] = self._target_failures.get(row.target, 0) + 1
            self._paused_until[row.target] = now + retry_delay(failures)
            attempts = row.attempts + 1
            next_at = now + retry_delay(attempts) if attempts < self.max_attempts else None
            await asyncio.to_thread(
                self.db.transaction, functools.partial(mark_failed, message=row.message_id, error=error, next_attempt_at=next_at, now=now)
            )
            if next_at is None:
                log.warning("webhook %s %s of job %s given up after %d attempt(s): %s", row.message_id, row.event, row.job_id, attempts, error)
            else:
                log.info("webhook %s %s of job %s: attempt %d failed (%s); next in %.0f s", row.message_id, row.event, row.job_id, attempts, error, next_at - now)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the row stays pending and goes again: at least once
            log.exception("webhook %s: could not record the attempt", row.message_id)
            self._paused_until[row.target] = time.time() + DB_RETRY_SECONDS
        finally:
            self._sending.pop(row.target, None)
            self._wake.set()

    async def _attempt(self, row: OutboxRow) -> str | None:
        """One POST; None on a 2xx, else what went wrong, in a few words."""
        assert self._session is not None and self._signer is not None
        url = URL(row.url)
        try:
            literal = _literal(url.host or "")
            if literal is not None:  # aiohttp connects to a literal without asking the resolver
                await checked_addresses(str(literal), url.port or 443, self.allow_private)
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
    waiting = await asyncio.to_thread(deliverer.db.transaction, pending_count)
    if not deliverer.enabled:
        if waiting:
            log.warning("%d webhook message(s) wait in the outbox, but --webhook-secret is not set: they are sent once it is", waiting)
        yield
        return
    log.info(
        "webhooks: on, signed; %s; %d message(s) waiting",
        "private addresses allowed" if deliverer.allow_private else "private addresses refused",
        waiting,
    )
    task = asyncio.create_task(deliverer.run(), name="webhook-deliverer")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
