"""The edge a stranger cannot lock (issue 25): at the connection cap idle connections make room,
oldest first; one address holds at most --max-connections-per-peer (a proxied client counted by its
forwarded address); a request head over 16 KiB gets 431; a flood of unfinished heads leaves no
memory behind. One real server for the module; the strangers come from other loopback addresses
(127.0.0.2 and up), which are not in the default --forwarded-allow-ips."""

from __future__ import annotations

import asyncio
import selectors
import socket
import statistics
import time
from collections.abc import Iterator

import psutil
import pytest
import requests

from tests.server_process import ServerProcess

CAP = 512
PER_PEER = 64
STRANGER_SOCKETS = 600
STRANGER_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 12)]  # 60 sockets each: under the per-peer cap
# The bounds of the server (not speed claims): a new client's /health under the idle flood,
# and the API's RSS under 300 unfinished heads of 0.8 MB and 30 s after they close.
HEALTH_UNDER_FLOOD_S = 1.0
HEAD_FLOOD_CONNECTIONS = 300
HEAD_FLOOD_BYTES = 800_000
RSS_RISE_LIMIT = 150 * 2**20
RSS_BACK_WITHIN = 50 * 2**20
RSS_BACK_AFTER_S = 30.0
HEALTH_HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def edge(start_server) -> Iterator[ServerProcess]:
    server = start_server(
        "--model", "tiny", "--workers", "1", "--max-batch", "2",
        "--max-connections", str(CAP), "--max-connections-per-peer", str(PER_PEER),
    )  # fmt: skip
    yield server
    server.stop()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_server(sockets: list[socket.socket], wait: float = 0.3) -> set[int]:
    """Indexes of the sockets the server has closed (FIN or reset) and that received no bytes
    (a 503 would have bytes); asserts that none received any."""
    closed: set[int] = set()
    with selectors.DefaultSelector() as selector:
        for index, sock in enumerate(sockets):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                try:
                    data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                assert data == b"", f"an idle connection got {data[:60]!r}, not a silent close"
                closed.add(key.data)
                selector.unregister(key.fileobj)
    for sock in sockets:
        sock.setblocking(True)
    return closed


def fresh_health(url: str) -> tuple[int, float]:
    """GET /health on a connection of its own; (status, seconds)."""
    started = time.monotonic()
    with requests.Session() as session:
        status = session.get(url + "/health", headers={"Connection": "close"}, timeout=30).status_code
    return status, time.monotonic() - started


def test_idle_strangers_at_the_cap_make_room_for_a_new_client(edge: ServerProcess) -> None:
    """600 idle stranger sockets against a cap of 512, reopened as the server closes them: a new
    client's /health is answered in under 1 s (or 10 x its idle time on a loaded machine), the
    strangers' sockets were closed silently to make room, never answered 503, oldest first, and a
    client's connection kept alive after a request, older than all of them, is still open."""
    baseline = statistics.median(fresh_health(edge.url)[1] for _ in range(5))
    limit = max(HEALTH_UNDER_FLOOD_S, 10 * baseline)
    client = connect(edge.port)  # a client's connection kept alive after a request: the strangers' go first
    client.sendall(HEALTH_HEAD)
    assert read_response(client).startswith(b"HTTP/1.1 200")
    strangers = [connect(edge.port, STRANGER_ADDRESSES[i % len(STRANGER_ADDRESSES)]) for i in range(STRANGER_SOCKETS)]
    try:
        time.sleep(0.5)  # all accepted: the first 88 have made room for the last 88
        evicted = closed_by_server(strangers)
        assert len(evicted) >= STRANGER_SOCKETS - CAP, f"{len(evicted)} closed to make room; {STRANGER_SOCKETS - CAP} needed"
        assert min(evicted) == 0 and max(evicted) < 200, "the oldest idle connections go first"
        timings = []
        for _ in range(5):  # the stranger reopens what was closed, as the attacker does every 14 s
            for index in closed_by_server(strangers, wait=0.05) | evicted:
                strangers[index].close()
                strangers[index] = connect(edge.port, STRANGER_ADDRESSES[index % len(STRANGER_ADDRESSES)])
            evicted = set()
            time.sleep(0.1)
            status, seconds = fresh_health(edge.url)
            assert status == 200
            timings.append(seconds)
        assert max(timings) < limit, f"/health took {max(timings):.2f} s under the flood (idle: {baseline:.3f} s, limit {limit:.2f} s)"
        assert closed_by_server([client]) == set(), "a kept-alive connection went before never-used ones"
        client.sendall(HEALTH_HEAD)
        assert read_response(client).startswith(b"HTTP/1.1 200")
    finally:
        for sock in strangers:
            sock.close()
        client.close()
    assert "idle connection(s) closed to make room" in edge.log()


def test_one_address_holds_at_most_its_share_oldest_idle_closed_first(edge: ServerProcess) -> None:
    """80 idle sockets from one stranger address: its 16 oldest are closed (silently) as the last
    16 arrive; another address's socket is untouched."""
    other = connect(edge.port, "127.0.0.30")
    stranger = []
    for _ in range(PER_PEER + 16):
        stranger.append(connect(edge.port, "127.0.0.31"))
        time.sleep(0.01)  # each one idle before the next arrives: a strict order of age
    try:
        time.sleep(0.3)
        assert closed_by_server(stranger) == set(range(16))
        assert closed_by_server([other]) == set()
        status, _ = fresh_health(edge.url)
        assert status == 200
    finally:
        for sock in [other, *stranger]:
            sock.close()


def test_a_proxied_client_is_counted_by_its_forwarded_address(edge: ServerProcess) -> None:
    """From the trusted proxy (127.0.0.1, the default --forwarded-allow-ips) 70 keep-alive
    connections each send one request for the client 203.0.113.7 and stay open: from the 65th on,
    that client's oldest idle connection is closed. Headless connections of the proxy are not
    counted: 70 more stay open."""
    headless = [connect(edge.port) for _ in range(PER_PEER + 6)]
    proxied = []
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n"
    try:
        for _ in range(PER_PEER + 6):
            sock = connect(edge.port)
            sock.sendall(head)
            answer = read_response(sock)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
            proxied.append(sock)
        assert closed_by_server(proxied) == set(range(6))
        assert closed_by_server(headless) == set()
    finally:
        for sock in [*headless, *proxied]:
            sock.close()


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body, and not a byte more."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return data


def exchange(port: int, data: bytes, read_for: float = 3.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # closed after its 431: what came back is read below
        sock.settimeout(read_for)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, OSError):
            pass
    return received


def test_a_request_head_over_16_kib_gets_431_and_one_under_it_is_served(edge: ServerProcess) -> None:
    line = b"X-Filler: " + b"a" * 7000 + b"\r\n"
    too_large = b"GET /health HTTP/1.1\r\nHost: x\r\n" + line * 3 + b"\r\n"  # 21 KB, each line under aiohttp's 8 KiB
    answer = exchange(edge.port, too_large)
    assert answer.startswith(b"HTTP/1.1 431") and b"16384 bytes" in answer, answer[:200]
    unfinished = b"GET /health HTTP/1.1\r\nHost: x\r\n" + line * 3  # no blank line: the head never ends
    assert exchange(edge.port, unfinished).startswith(b"HTTP/1.1 431")
    # 15 KB with one 12 KB field (past aiohttp's default 8,190 per field): under the 16 KiB, served.
    fits = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Filler: " + b"b" * 12_000 + b"\r\n\r\n"
    assert exchange(edge.port, fits).startswith(b"HTTP/1.1 200")


async def _unfinished_head(port: int, chunk: bytes, total: int) -> bytes:
    """Send up to ``total`` bytes of a head that never ends; what the server answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # Read from the start: once the server closes, a stream that saw the reset raises on read.
    answer = asyncio.ensure_future(reader.read(200))
    try:
        sent = 0
        writer.write(b"GET /jobs HTTP/1.1\r\nHost: x\r\n")
        while sent < total and not answer.done():
            writer.write(chunk)
            sent += len(chunk)
            await asyncio.wait_for(writer.drain(), 10)
    except (OSError, TimeoutError):
        pass
    try:
        return await asyncio.wait_for(answer, 5)
    except (OSError, TimeoutError):
        return b""
    finally:
        writer.transport.abort()


def test_a_flood_of_unfinished_heads_leaves_no_memory_behind(edge: ServerProcess) -> None:
    """300 unfinished request heads of 0.8 MB (GET /jobs and 8 KB lines, never the blank line):
    each gets 431; the API's RSS rises by less than 150 MB, and within 30 s after they close it is
    within 50 MB of where it started."""
    assert edge.process is not None
    api = psutil.Process(edge.process.pid)
    before = api.memory_info().rss
    chunk = b"X-Filler: " + b"c" * 8000 + b"\r\n"

    async def flood() -> list[bytes]:
        return await asyncio.gather(*(_unfinished_head(edge.port, chunk, HEAD_FLOOD_BYTES) for _ in range(HEAD_FLOOD_CONNECTIONS)))

    peak = before
    answers: list[bytes] = []

    async def flood_and_sample() -> None:
        nonlocal peak, answers
        task = asyncio.ensure_future(flood())
        while not task.done():
            peak = max(peak, api.memory_info().rss)
            await asyncio.sleep(0.05)
        answers = task.result()

    asyncio.run(flood_and_sample())
    assert sum(answer.startswith(b"HTTP/1.1 431") for answer in answers) == HEAD_FLOOD_CONNECTIONS, {a[:40] for a in answers}
    assert peak - before < RSS_RISE_LIMIT, f"RSS rose by {(peak - before) / 2**20:.0f} MiB"
    deadline = time.monotonic() + RSS_BACK_AFTER_S
    while (now := api.memory_info().rss) - before > RSS_BACK_WITHIN:
        assert time.monotonic() < deadline, f"RSS still {(now - before) / 2**20:.0f} MiB above its start after {RSS_BACK_AFTER_S:g} s"
        time.sleep(0.5)
    assert fresh_health(edge.url)[0] == 200
