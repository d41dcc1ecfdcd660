"""Slow-DNS webhook abuse: clients that submit ``webhook_url`` hosts whose nameserver never answers.

The server under test resolves webhook hosts through ``--webhook-nameservers`` pointed at a
loopback UDP socket that reads nothing (``SilentNameserver``), so every lookup runs to the
resolver's timeout. Each client sends about ``per_second`` ``POST /jobs`` a second, each with a
new host name; every answer must be a 400 (the host did not resolve in time) or a 429 (the key
has its lookups in flight), never an accepted job nor a 5xx, and each must come back within the
resolver's timeout and a margin. Used by ``benchmarks/soak.py --abuse`` (alongside its other abuse)
and by tests/test_webhook_fairness.py, which runs it as a process of its own against a server:

    python -m benchmarks.slow_dns --url http://127.0.0.1:8000 --clients 12 --seconds 10

It prints ``started``, then at the end one JSON line: ``passed``, a summary ``line`` and the answers.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter

# A signing secret for the server under test (webhooks are only taken by a server that can sign).
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"slow-dns-abuse-secret-0123456789").decode()
EXPECTED = {400, 429}  # the host did not resolve in time; the key's lookups are all in flight
ANSWER_LIMIT_S = 5.0 + 5.0  # the resolver's timeout (RESOLVE_TIMEOUT), and a margin for a busy machine


class SilentNameserver:
    """A UDP socket on loopback that takes DNS questions and never answers."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))

    @property
    def address(self) -> str:
        return "%s:%d" % self.socket.getsockname()

    def server_args(self) -> tuple[str, ...]:
        """The flags of a server whose webhook names go here."""
        return ("--webhook-secret", WEBHOOK_SECRET, "--webhook-nameservers", self.address)

    def close(self) -> None:
        self.socket.close()


@dataclass
class SlowDnsStats:
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    answers: Counter[int] = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    # Turned away by the server's connection cap before the app saw the request (a 503 without the
    # X-Request-Id every answer of the app carries): the edge at work, not an answer to judge.
    turned_away: int = 0

    def add(self, response: requests.Response, seconds: float) -> None:
        with self.lock:
            if response.status_code == 503 and "X-Request-Id" not in response.headers:
                self.turned_away += 1
                return
            self.answers[response.status_code] += 1
            self.seconds.append(seconds)

    @property
    def sent(self) -> int:
        return sum(self.answers.values()) + sum(self.errors.values()) + self.turned_away

    def check(self) -> tuple[bool, str]:
        """(passed, what was seen): every answer a 400 or 429, in time, and at least one 400."""
        unexpected = {status: count for status, count in self.answers.items() if status not in EXPECTED}
        slowest = max(self.seconds, default=0.0)
        passed = bool(self.answers[400]) and not unexpected and not self.errors and slowest <= ANSWER_LIMIT_S
        median = statistics.median(self.seconds) if self.seconds else 0.0
        line = (
            f"{self.sent} POST /jobs with unresolvable webhook hosts: {dict(sorted(self.answers.items()))}, "
            f"answered in {median:.2f} s median, {slowest:.2f} s at most (limit {ANSWER_LIMIT_S:g} s)"
            + (f"; {self.turned_away} turned away by the connection cap" if self.turned_away else "")
            + (f"; errors {dict(self.errors)}" if self.errors else "")
        )
        return passed, line


class SourceAdapter(HTTPAdapter):
    """Connections from a given local address (a loopback address of its own: the server counts
    connections per peer address)."""

    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def client_loop(url: str, index: int, per_second: float, stats: SlowDnsStats, stop: threading.Event, source: str | None = None) -> None:
    """One client: a new host name each request, ``per_second`` requests a second at most."""
    with requests.Session() as session:
        if source:
            session.mount("http://", SourceAdapter(source))
        sent = 0
        while not stop.is_set():
            started = time.monotonic()
            body = {"prompts": ["x"], "webhook_url": f"https://slow-{index}-{sent}.hooks.example.com/hook"}
            try:
                response = session.post(f"{url}/jobs", json=body, timeout=60)
                stats.add(response, time.monotonic() - started)
            except requests.RequestException as exc:
                with stats.lock:
                    stats.errors[exc.__class__.__name__] += 1
            sent += 1
            stop.wait(max(0.0, 1.0 / per_second - (time.monotonic() - started)))


class SlowDnsAbuse:
    """``clients`` threads of ``client_loop`` until ``finish``."""

    def __init__(self, url: str, clients: int, per_second: float = 2.0, source: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.clients = clients
        self.stats = SlowDnsStats()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(
                target=client_loop, args=(self.url, index, per_second, self.stats, self.stop, source), name=f"slow-dns-{index}", daemon=True
            )
            for index in range(clients)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> tuple[bool, str]:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
        return self.stats.check()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="a server started with a SilentNameserver's server_args()")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--per-second", type=float, default=2.0, help="requests a second of each client, at most")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long; 0: until standard input closes")
    args = parser.parse_args(argv)
    abuse = SlowDnsAbuse(args.url, args.clients, args.per_second)
    abuse.start()
    print("started", flush=True)
    if args.seconds > 0:
        time.sleep(args.seconds)
    else:
        sys.stdin.read()
    passed, line = abuse.finish()
    print(json.dumps({"passed": passed, "line": line, "answers": dict(abuse.stats.answers)}), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
