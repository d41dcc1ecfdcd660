"""Redis Streams: the transport of the scheduler when the workers are on other boxes (``--broker``).

The scheduler (``gpu_workers.scheduler``) is the same as with local workers: it keeps the fair
queue in this process and hands a shard to this transport only while the live workers have room
(``SHARDS_PER_WORKER`` each, as locally), so a small request is never stuck behind a 150-image
batch already in Redis, and a cancelled request's queued shards never leave this process. How
shards travel is ``gpu_workers.redis_protocol``: workers pull, take over the shards of a dead
holder after the visibility timeout (``XAUTOCLAIM``), and acknowledge a shard only after its result
is on our result stream; a result that arrives twice is used once (the scheduler's ledger).

Three tasks run on the event loop: the watcher (heartbeat keys of every worker, once a second; it
also notices Redis going away and coming back), the result reader (a blocking ``XREAD`` on this
process's result stream), and the sender (``XADD`` of the shards that may go). When Redis goes
away, requests in flight fail with a detail that says so (reason ``transport_lost``: the service
answers 503), ``/health`` shows the cause, and the watcher reconnects with backoff; the next
request after Redis is back works.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contract.states import WorkerState
from gpu_workers import wire
from gpu_workers.messages import ShardDone, ShardFailed, ShardStarted, ShardTask
from gpu_workers.scheduler import EngineConfig, Scheduler, TransportEvents, WorkerStatus
from gpu_workers.shard_rules import SHARDS_PER_WORKER, DeviceTracker
from gpu_workers.redis_protocol import (
    GROUP,
    HEARTBEAT_SECONDS,
    MESSAGE_FIELD,
    MODEL_FIELD,
    REPLY_TO_FIELD,
    TASK_FIELD,
    Keys,
    WorkerHeartbeat,
    config_json,
    redacted,
)

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000
RESULT_STREAM_MAXLEN = 10_000
MAX_RECONNECT_DELAY = 10.0


class RedisTransport:
    def __init__(self, config: EngineConfig, url: str, prefix: str = "sdxl") -> None:
        self.config = config
        self.url = url
        self.keys = Keys(prefix)
        self.api_id = secrets.token_hex(8)
        self.results_key = self.keys.results(self.api_id)
        self._events: TransportEvents | None = None
        self._outgoing: list[ShardTask] = []
        self._sent: dict[tuple[str, int], ShardTask] = {}
        self._devices = DeviceTracker()
        self._workers: list[WorkerHeartbeat] = []
        self._connected = False
        self.problem: str | None = f"connecting to Redis at {redacted(url)}"
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._run_id: str | None = None
        self._last_result_id = b"0-0"  # a stream of our own, new with our id: read it all
        self._redis: aredis.Redis | None = None
        self._reader: aredis.Redis | None = None

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self, events: TransportEvents) -> None:
        self._events = events
        common: dict[str, Any] = {
            "decode_responses": False,
            "socket_connect_timeout": 5,
            "retry": Retry(ExponentialBackoff(cap=1.0), 2),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        }
        self._redis = aredis.from_url(self.url, socket_timeout=5, **common)
        # A blocking read must not be cut by its own socket timeout (notes/redis_research.md).
        self._reader = aredis.from_url(self.url, socket_timeout=READ_BLOCK_MS / 1000 + 5, **common)
        log.info("broker: Redis at %s, results on %s", redacted(self.url), self.results_key)
        self._tasks = [
            asyncio.create_task(self._watch(), name="broker-watch"),
            asyncio.create_task(self._read_results(), name="broker-results"),
            asyncio.create_task(self._send(), name="broker-send"),
        ]

    async def stop(self, timeout: float) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._redis is not None and self._connected:
            try:
                async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancel
                    await self._redis.delete(self.results_key)
            except (RedisError, OSError, TimeoutError):
                pass
        for client in (self._redis, self._reader):
            if client is not None:
                await client.aclose()

    # ----- the transport ---------------------------------------------------------------------

    def _ready_workers(self) -> int:
        if not self._connected:
            return 0
        return sum(_state(worker.state).takes_shards for worker in self._workers)

    def has_room(self) -> bool:
        held = len(self._outgoing) + self._devices.on_device(self._sent)
        return self._connected and held < self._ready_workers() * SHARDS_PER_WORKER

    def send(self, shard: ShardTask) -> None:
        """Queued here until the sender task has put it on the shared stream."""
        self._outgoing.append(shard)
        self._wake.set()

    def workers(self) -> list[WorkerStatus]:
        if not self._connected:
            return []
        return [
            WorkerStatus(
                worker_id=index,
                pid=worker.pid,
                device=f"{worker.host}/{worker.device}",
                device_name=worker.device_name,
                model=worker.model,
                state=_state(worker.state),
                images_done=worker.images_done,
                shards_in_flight=1 if worker.state == WorkerState.BUSY else 0,
                restarts=0,
                error=worker.error,
            )
            for index, worker in enumerate(self._workers)
        ]

    # ----- the watcher: workers' heartbeats, and Redis's own health ---------------------------

    async def _watch(self) -> None:
        delay = 1.0
        while True:
            try:
                await self._refresh()
                delay = 1.0
                await asyncio.sleep(HEARTBEAT_SECONDS / 2)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._lost(exc)
                await asyncio.sleep(delay)
                delay = min(MAX_RECONNECT_DELAY, delay * 2)
            except Exception:  # noqa: BLE001 - the watcher must never die quietly
                log.exception("broker: watcher error")
                await asyncio.sleep(delay)

    async def _refresh(self) -> None:
        assert self._redis is not None
        redis = self._redis
        await redis.set(self.keys.config, config_json(self.config.model, self.config.sizes, self.config.max_batch))
        if not self._connected:
            await self._create_group()
            if self.problem and not self.problem.startswith("connecting"):
                log.info("broker: Redis at %s is back", redacted(self.url))
            self._connected, self.problem = True, None
        run_id = (await redis.info("server")).get("run_id")
        if self._run_id is not None and run_id != self._run_id:
            # Restarted between two looks (client retries can hide the outage): the shards we put
            # in it are gone with its data, so their requests must not wait for them.
            self._fail_in_flight(f"Redis at {redacted(self.url)} restarted and lost the shards in flight")
            await self._create_group()
        self._run_id = run_id
        names = [key async for key in redis.scan_iter(match=self.keys.worker_pattern, count=100)]
        values = await redis.mget(names) if names else []
        workers = []
        for value in values:
            if value is None:
                continue  # expired between SCAN and MGET
            try:
                workers.append(WorkerHeartbeat.from_json(value))
            except (ValueError, KeyError, TypeError):
                log.warning("broker: unreadable worker heartbeat %r", value[:200])
        self._workers = sorted(workers, key=lambda w: w.name)
        for worker in self._workers:
            if worker.model != self.config.model:
                log.error("broker: worker %s serves model %s, not %s; it will refuse shards", worker.name, worker.model, self.config.model)
        assert self._events is not None
        self._events.room_changed()

    async def _create_group(self) -> None:
        assert self._redis is not None
        try:
            await self._redis.xgroup_create(self.keys.shards, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _lost(self, exc: BaseException) -> None:
        if self._connected or self.problem is None or self.problem.startswith("connecting"):
            log.error("broker: lost Redis at %s: %s; reconnecting", redacted(self.url), exc)
        self._connected = False
        self.problem = f"Redis at {redacted(self.url)} is unreachable: {exc}"
        self._workers = []
        self._fail_in_flight(f"The connection to Redis was lost ({exc})")

    def _fail_in_flight(self, cause: str) -> None:
        """The shards in Redis are gone with it: the scheduler fails their requests."""
        self._sent.clear()
        self._outgoing.clear()
        self._devices = DeviceTracker()
        assert self._events is not None
        self._events.transport_lost(f"broker: {cause}")

    # ----- shards out ------------------------------------------------------------------------

    async def _send(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._send_what_fits()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._lost(exc)
            except Exception:  # noqa: BLE001
                log.exception("broker: sender error")

    async def _send_what_fits(self) -> None:
        assert self._redis is not None
        while self._connected and self._outgoing:
            shard = self._outgoing.pop(0)
            self._sent[(shard.request_id, shard.shard_id)] = shard
            fields = {TASK_FIELD: wire.encode(shard), REPLY_TO_FIELD: self.results_key.encode(), MODEL_FIELD: self.config.model.encode()}
            await self._redis.xadd(self.keys.shards, fields)  # type: ignore[arg-type]

    # ----- results in ------------------------------------------------------------------------

    async def _read_results(self) -> None:
        while True:
            try:
                if not self._connected:
                    await asyncio.sleep(0.2)
                    continue
                assert self._reader is not None
                answer = await self._reader.xread({self.results_key: self._last_result_id}, count=16, block=READ_BLOCK_MS)
                for _stream, entries in answer or []:
                    for entry_id, fields in entries:
                        self._last_result_id = entry_id
                        self._handle_entry(fields)
                        await self._reader.xdel(self.results_key, entry_id)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._lost(exc)
                await asyncio.sleep(0.5)
            except Exception:  # noqa: BLE001 - the consumer must never die quietly
                log.exception("broker: result reader error")

    def _handle_entry(self, fields: dict[bytes, bytes]) -> None:
        try:
            message = wire.decode(fields[MESSAGE_FIELD])
        except (KeyError, wire.WireError) as exc:
            log.error("broker: unreadable result entry: %s", exc)
            return
        assert self._events is not None
        key = (message.request_id, message.shard_id) if isinstance(message, (ShardStarted, ShardDone, ShardFailed)) else None
        if isinstance(message, ShardStarted):
            if key in self._sent:
                self._devices.started(message.worker_id, key)
                self._events.room_changed()
        elif isinstance(message, ShardDone):
            self._sent.pop(key, None)
            self._devices.ended(key)
            self._events.shard_done(message)
        elif isinstance(message, ShardFailed):
            self._sent.pop(key, None)
            self._devices.ended(key)
            self._events.shard_failed(message)
        else:
            log.error("broker: unexpected %s on the result stream", type(message).__name__)


def _state(value: str) -> WorkerState:
    """A heartbeat's state; an unknown one (a newer worker) shows as starting."""
    try:
        return WorkerState(value)
    except ValueError:
        return WorkerState.STARTING


def redis_workers(config: EngineConfig, url: str, prefix: str) -> Scheduler:
    """The engine with workers on other boxes, through Redis Streams."""
    return Scheduler(config, RedisTransport(config, url, prefix))
