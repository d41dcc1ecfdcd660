"""The soak's abuse of the edge (issue 25), run by ``benchmarks/soak.py --abuse``: a stranger who
holds idle sockets and renews them all every 14 s (the lock-out of issue 25: 512 of them against the
cap of 512 gave every other client 503), a flood of unfinished 0.8 MB request heads, and a probe
that opens a fresh connection every second, from an address of its own (another client), to see
whether a newcomer still gets in.

The stranger connects from other loopback addresses (127.0.0.2 and up), which are not in the
server's default ``--forwarded-allow-ips``: its sockets are counted per address
(``--max-connections-per-peer``) as well as against the cap.
"""

from __future__ import annotations

import asyncio
import http.client
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from benchmarks.harness.report import Check

RENEW_EVERY_S = 14.0  # under the server's default --keepalive-timeout of 15 s, as the attacker chose
STRANGER_CONNECT_TIMEOUT_S = 10.0
STOP_POLL_S = 1.0
HEAD_FLOOD_BYTES = 800_000
HEAD_FLOOD_LINE = b"X-Filler: " + b"h" * 8000 + b"\r\n"  # 8 KB, under aiohttp's own 8,190 per line
HEAD_FLOOD_START = b"GET /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
HEAD_FLOOD_PAUSE_S = 0.25
PROBE_EVERY_S = 1.0
PROBE_TIMEOUT_S = 30.0
# The bound: a new client's /health under the idle flood is answered in under 1 s.
PROBE_LIMIT_S = 1.0
# The newcomer is another client: an address of its own, not the one the soak's idle flood and header
# flood come from (127.0.0.1), whose own oldest idle sockets the per-address cap closes first.
NEWCOMER_SOURCE = "127.0.0.9"


@dataclass
class EdgeStats:
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The stranger: sockets opened, closed by the server before a renewal (to make room, or by the
    # keep-alive timeout), answered with bytes (a 503 of the cap), renewals done, connect failures.
    stranger_opened: int = 0
    stranger_closed: int = 0
    stranger_answered: Counter[str] = field(default_factory=Counter)
    stranger_renewals: int = 0
    stranger_connect_errors: int = 0
    stranger_lifetimes: list[float] = field(default_factory=list)
    # The header flood: connections, bytes sent, and what each got back.
    heads_sent: int = 0
    head_connect_errors: int = 0
    head_bytes_sent: int = 0
    heads_431: int = 0
    heads_closed_silently: int = 0  # closed before 16 KiB arrived: made room as an idle connection
    heads_other: Counter[str] = field(default_factory=Counter)
    # The probe: a newcomer's GET /health, (seconds until the server answered, its status, connections tried).
    probes: list[tuple[float, str, int]] = field(default_factory=list)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


def first_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0].decode("latin-1")[:60] or "(nothing)"


class StrangerSockets:
    """``count`` idle sockets from ``sources``, each opened again as soon as the server closes it,
    and all of them closed and opened again every ``renew_every`` seconds."""

    def __init__(self, host: str, port: int, count: int, renew_every: float, sources: list[str], stats: EdgeStats) -> None:
        self.host, self.port, self.count, self.renew_every, self.sources, self.stats = host, port, count, renew_every, sources, stats

    def run(self, stop: threading.Event) -> None:
        asyncio.run(self._main(stop))

    async def _main(self, stop: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            renewal = loop.time() + self.renew_every
            # Each one ends by itself at the renewal (or soon after the stop), not by a cancel: on
            # Python 3.11 ``wait_for`` can swallow a cancel that meets a connect just made.
            await asyncio.gather(*(self._hold(i, renewal, stop) for i in range(self.count)), return_exceptions=True)
            self.stats.add(stranger_renewals=1)

    async def _hold(self, index: int, until: float, stop: threading.Event) -> None:
        source = self.sources[index % len(self.sources)]
        loop = asyncio.get_running_loop()
        while (left := until - loop.time()) > 0 and not stop.is_set():
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, local_addr=(source, 0)), min(left, STRANGER_CONNECT_TIMEOUT_S)
                )
            except (OSError, TimeoutError):
                self.stats.add(stranger_connect_errors=1)
                await asyncio.sleep(0.5)
                continue
            opened = time.monotonic()
            self.stats.add(stranger_opened=1)
            data, closed = b"", True
            try:
                while not stop.is_set() and (left := until - loop.time()) > 0:
                    try:
                        data = await asyncio.wait_for(reader.read(4096), min(left, STOP_POLL_S))
                        break
                    except TimeoutError:
                        continue
                else:
                    closed = False  # renewed (or stopped) by us while the server still held it
            except OSError:
                data = b""
            finally:
                writer.transport.abort()  # a reset: no TIME_WAIT left on this side
            if not closed:
                return
            with self.stats.lock:
                self.stats.stranger_closed += 1
                self.stats.stranger_lifetimes.append(time.monotonic() - opened)
                if data:
                    self.stats.stranger_answered[first_line(data)] += 1
            if data:
                await asyncio.sleep(0.25)  # refused: the attacker tries again shortly


class HeaderFlood:
    """``count`` connections that each send a request head of up to 0.8 MB that never ends (GET
    /jobs and 8 KB lines, no blank line), then connect again."""

    def __init__(self, host: str, port: int, count: int, stats: EdgeStats) -> None:
        self.host, self.port, self.count, self.stats = host, port, count, stats

    def run(self, stop: threading.Event) -> None:
        asyncio.run(self._main(stop))

    async def _main(self, stop: threading.Event) -> None:
        tasks = [asyncio.create_task(self._loop(stop)) for _ in range(self.count)]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            await self._once()
            await asyncio.sleep(HEAD_FLOOD_PAUSE_S)

    async def _once(self) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), STRANGER_CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError):
            self.stats.add(head_connect_errors=1)
            return
        answer = asyncio.ensure_future(reader.read(200))  # read from the start: a reset later hides it
        sent = 0
        try:
            writer.write(HEAD_FLOOD_START)
            while sent < HEAD_FLOOD_BYTES and not answer.done():
                writer.write(HEAD_FLOOD_LINE)
                sent += len(HEAD_FLOOD_LINE)
                await asyncio.wait_for(writer.drain(), 10)
        except (OSError, TimeoutError):
            pass
        try:
            data = await asyncio.wait_for(answer, 5)
        except (OSError, TimeoutError):
            data = b""
        finally:
            writer.transport.abort()
        with self.stats.lock:
            self.stats.heads_sent += 1
            self.stats.head_bytes_sent += sent
            if data.startswith(b"HTTP/1.1 431"):
                self.stats.heads_431 += 1
            elif not data:
                self.stats.heads_closed_silently += 1
            else:
                self.stats.heads_other[first_line(data)] += 1


def probe_loop(url: str, stats: EdgeStats, stop: threading.Event) -> None:
    """Every PROBE_EVERY_S, a newcomer: GET /health on a connection of its own, tried again at once
    on a new connection while the cap turns it away or the connection is closed under it."""
    target = urlsplit(url)
    while not stop.wait(PROBE_EVERY_S):
        started = time.monotonic()
        tries, outcome = 0, "no answer"
        while time.monotonic() - started < PROBE_TIMEOUT_S:
            tries += 1
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=PROBE_TIMEOUT_S, source_address=(NEWCOMER_SOURCE, 0))
            try:
                connection.request("GET", "/health", headers={"Connection": "close"})
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                continue
            finally:
                connection.close()
            if response.status == 503 and response.getheader("X-Request-Id") is None:
                continue  # the cap's 503: every connection was busy
            outcome = str(response.status)
            break
        with stats.lock:
            stats.probes.append((time.monotonic() - started, outcome, tries))


def summary_rows(stats: EdgeStats, count: int, sources: int, heads: int) -> list[tuple[str, str]]:
    lifetimes = stats.stranger_lifetimes
    seconds = [probe[0] for probe in stats.probes]
    first_try = sum(probe[2] == 1 for probe in stats.probes)
    return [
        ("stranger sockets", f"{count} at a time from {sources} address(es), all renewed every {RENEW_EVERY_S:g} s: "
         f"{stats.stranger_opened} opened, {stats.stranger_renewals} renewals"),
        ("  closed by the server", f"{stats.stranger_closed} (open median {statistics.median(lifetimes) if lifetimes else 0:.2f} s); "
         f"answered with bytes: {dict(stats.stranger_answered) or 0}; connect errors {stats.stranger_connect_errors}"),
        ("header flood", f"{heads} connections at a time: {stats.heads_sent} unfinished heads of up to {HEAD_FLOOD_BYTES / 1e6:g} MB, "
         f"{stats.head_bytes_sent / 2**20:.0f} MiB sent"),
        ("  answered 431", f"{stats.heads_431}; closed silently (idle, made room) {stats.heads_closed_silently}; "
         f"other {dict(stats.heads_other) or 0}; connect errors {stats.head_connect_errors}"),
        ("newcomer probes", f"{len(stats.probes)} GET /health on fresh connections: "
         f"{dict(Counter(probe[1] for probe in stats.probes))}; {first_try} on the first connection, "
         f"at most {max((probe[2] for probe in stats.probes), default=0)} connections; "
         + (f"answered after median {statistics.median(seconds):.3f} s, max {max(seconds):.3f} s" if seconds else "none")),
    ]  # fmt: skip


def checks(stats: EdgeStats) -> list[Check]:
    answered = [probe for probe in stats.probes if probe[1] in ("200", "503")]
    slowest = max((probe[0] for probe in stats.probes), default=0.0)
    return [
        Check(bool(stats.probes) and len(answered) == len(stats.probes) and slowest < PROBE_LIMIT_S,
              f"newcomers got in: {len(answered)} of {len(stats.probes)} answered by the server, "
              f"the slowest after {slowest:.2f} s (under {PROBE_LIMIT_S:g} s)"),
        Check(stats.heads_431 > 0 and not stats.heads_other,
              f"unfinished heads answered 431: {stats.heads_431} (other answers: {sum(stats.heads_other.values())})"),
        Check(stats.stranger_opened > 0 and not stats.stranger_answered,
              f"stranger sockets closed silently to make room, never answered 503: {sum(stats.stranger_answered.values())} answered"),
    ]  # fmt: skip
