"""What the API process and remote workers agree on in Redis: key names, entry fields, settings.

The distributed queue is Redis's own: one stream of shards with one consumer group, so each shard
goes to one worker, stays in that worker's pending list until it is acknowledged, and is taken over
by another worker with ``XAUTOCLAIM`` once it has been pending longer than the visibility timeout
(its holder died or hangs). A worker acknowledges a shard only after its result is on the API's
result stream, so no result is lost; a shard that runs twice gives the same bytes, and the API uses
the first result of a shard and ignores any later one.

Keys (``prefix`` defaults to ``sdxl``):

- ``{prefix}:config``: JSON ``{"protocol": 1, "model": ...}``, written by the API on start; a
  worker started with another model is refused (it logs why and exits 2).
- ``{prefix}:shards``: stream, group ``workers``; entry fields ``task`` (``wire.encode(ShardTask)``),
  ``reply_to`` (the API's result stream), ``model``.
- ``{prefix}:results:{api_id}``: one stream per API process; entry field ``message``
  (``wire.encode`` of ``ShardStarted``, ``ShardDone`` or ``ShardFailed``). The API deletes each
  entry once handled.
- ``{prefix}:worker:{name}``: a worker's heartbeat, JSON, expiring after ``HEARTBEAT_TTL_SECONDS``.

Every payload is msgpack through ``gpu_workers.wire`` or JSON: neither side can make the other run code.
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit, urlunsplit

PROTOCOL = 1
DEFAULT_PREFIX = "sdxl"
GROUP = "workers"
HEARTBEAT_SECONDS = 2.0
HEARTBEAT_TTL_SECONDS = 10
# How long a shard whose holder died (its heartbeat stopped re-claiming it) waits for a takeover.
DEFAULT_VISIBILITY_TIMEOUT = 30.0

TASK_FIELD = b"task"
REPLY_TO_FIELD = b"reply_to"
MODEL_FIELD = b"model"
MESSAGE_FIELD = b"message"


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    @property
    def config(self) -> str:
        return f"{self.prefix}:config"

    @property
    def shards(self) -> str:
        return f"{self.prefix}:shards"

    def results(self, api_id: str) -> str:
        return f"{self.prefix}:results:{api_id}"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.prefix}:worker:*"


@dataclass(frozen=True)
class WorkerHeartbeat:
    """What a remote worker says about itself every ``HEARTBEAT_SECONDS`` (a row of /health)."""

    name: str
    host: str
    pid: int
    device: str
    model: str
    state: str  # a contract.states.WorkerState value: starting, ready, busy, failed
    images_done: int
    error: str | None = None
    device_name: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerHeartbeat:
        data = json.loads(text)
        return cls(
            name=str(data["name"]),
            host=str(data["host"]),
            pid=int(data["pid"]),
            device=str(data["device"]),
            model=str(data["model"]),
            state=str(data["state"]),
            images_done=int(data["images_done"]),
            error=None if data.get("error") is None else str(data["error"]),
            device_name=None if data.get("device_name") is None else str(data["device_name"]),
        )


def worker_name(pid: int, device: str) -> str:
    """Unique across boxes and restarts: host, device and process id."""
    return f"{socket.gethostname()}-{device.replace(':', '')}-{pid}"


def config_json(model: str, sizes: tuple[str, ...] = (), max_batch: int = 0) -> str:
    """What the API server announces to every worker box; ``sizes`` and ``max_batch`` tell a
    worker what its full warm-up must cover (``gpu_workers.speed.announced_shapes``)."""
    data: dict[str, object] = {"protocol": PROTOCOL, "model": model}
    if sizes:
        data["sizes"] = list(sizes)
    if max_batch:
        data["max_batch"] = max_batch
    return json.dumps(data)


def redacted(url: str) -> str:
    """The broker URL for logs and /health: never its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
