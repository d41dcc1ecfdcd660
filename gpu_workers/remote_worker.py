"""A worker on another box: takes shards from Redis Streams instead of a local queue.

One process per device, spawned by ``python -m gpu_workers``. It runs the very same worker loop as
a local worker (``gpu_workers.worker_loop.serve``: the pipelined device, encode and send stages,
the shard-timeout watchdog), so a shard gives the same bytes whichever way it travelled; only the
transport differs, and that is this class (its ``ShardSource`` and ``ResultSink``) and
``gpu_workers.redis_protocol``:

- it refuses to start (exit 2) when the API server speaks another protocol or serves another model,
  since every shard it ran would give images of the wrong model;
- it pulls shards with ``XREADGROUP`` from the group ``workers``, and first takes over, with
  ``XAUTOCLAIM``, any shard another worker has held longer than the visibility timeout (that
  worker died or hangs); a shard that lost ``MAX_SHARD_LOSSES`` holders is failed instead of run
  again (``shard_rules``, the rule the local pool follows too), so one poison shard cannot kill
  every worker in turn;
- while it holds shards, its heartbeat thread re-claims them (``XCLAIM ... JUSTID``) every beat, so
  a shard that runs longer than the visibility timeout is not taken over from a living worker: the
  visibility timeout is how long a *dead* holder goes unnoticed, and ``--shard-timeout`` is how long
  a shard may run (past it the watchdog ends the process, the beats stop, another worker takes over);
- it writes the result to the API's stream *before* it acknowledges the shard, so a worker that
  dies in between costs a second run (same bytes, the API keeps the first result), never a result;
- a heartbeat thread keeps ``{prefix}:worker:{name}`` alive, also while a shard generates, which
  is how the API knows which workers exist and what they do;
- Redis going away is not fatal: it logs once, retries with backoff and carries on where it was
  (a result not yet written stays in memory and is written when Redis is back);
- SIGTERM (or SIGINT) finishes the shards in hand, writes and acknowledges them, deletes the
  heartbeat key and exits 0: a remote box is stopped by its own supervisor, not by the API process.

Messages travel through ``gpu_workers.wire`` (msgpack, never pickle), so a compromised Redis or
API box cannot make this process run code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from gpu_workers import wire
from contract.failures import FailureReason
from contract.states import WorkerState
from gpu_workers.messages import ShardDone, ShardFailed, ShardStarted, ShardTask, WorkerConfig
from gpu_workers.redis_protocol import (
    GROUP,
    HEARTBEAT_SECONDS,
    HEARTBEAT_TTL_SECONDS,
    MESSAGE_FIELD,
    MODEL_FIELD,
    PROTOCOL,
    REPLY_TO_FIELD,
    TASK_FIELD,
    Keys,
    WorkerHeartbeat,
    redacted,
    worker_name,
)
from gpu_workers.shard_rules import given_up, given_up_detail
from gpu_workers.worker import load_for_worker, quiet_libraries
from gpu_workers.worker_loop import Taken, serve

log = logging.getLogger(__name__)

#: Exit code of a worker that refuses to serve this API server (other protocol or model); the
#: launcher does not restart it, since it would be refused again.
EXIT_REFUSED = 2
#: Exit code of a worker whose pipeline did not load; the launcher restarts it after a backoff.
EXIT_LOAD_FAILED = 1

READ_BLOCK_MS = 1000
#: The blocking read's socket timeout must exceed its BLOCK, or redis-py cuts it (notes/redis_research.md §5).
SOCKET_TIMEOUT = READ_BLOCK_MS / 1000 + 5
CONNECT_TIMEOUT = 5.0
CLIENT_RETRIES = 3
RESULT_STREAM_MAXLEN = 10_000
CONFIG_POLL_SECONDS = 2.0
MAX_RECONNECT_DELAY = 10.0
#: After SIGTERM, how long a result that Redis cannot take right now is kept trying; past it the
#: shard stays pending and another worker takes it over after the visibility timeout.
STOP_FLUSH_SECONDS = 30.0


def connect(url: str, socket_timeout: float = SOCKET_TIMEOUT) -> redis.Redis:
    """A sync client that rides over short blips itself (retries with backoff, reconnects lazily);
    longer outages surface as ``ConnectionError``/``TimeoutError`` for the caller's own loop.
    ``from_url`` has no retry by default (notes/redis_research.md §3.1), hence the explicit one."""
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=socket_timeout,
        socket_connect_timeout=CONNECT_TIMEOUT,
        retry=Retry(ExponentialBackoff(cap=MAX_RECONNECT_DELAY, base=0.1), retries=CLIENT_RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


# ----- the API server's config: which protocol and model it serves ------------------------------


class Refused(Exception):
    """This worker must not serve the API server it found; the message says what to change."""


def served_model(raw: bytes, url: str) -> str:
    """The model named by ``{prefix}:config``; Refused if it is not the protocol's JSON object or
    speaks another protocol version."""
    where = redacted(url)
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            raise TypeError('expected {"protocol": ..., "model": "..."}')
    except (ValueError, TypeError) as exc:
        raise Refused(f"refused: the API server config at {where} is unreadable ({exc}); is it a server of this project?") from None
    if data.get("protocol") != PROTOCOL:
        raise Refused(
            f"refused: the API server at {where} speaks Redis protocol {data.get('protocol')!r} but this worker "
            f"speaks protocol {PROTOCOL}; run the same version of the server and the workers"
        )
    return str(data["model"])


def check_model(served: str, model: str, url: str) -> None:
    """Refused when this worker's model is not the one the API server serves: every image it made
    would be of the wrong model."""
    if served != model:
        raise Refused(
            f"refused: this worker was started with --model {model} but the API server at {redacted(url)} "
            f"serves model {served}; start it with --model {served} (or without --model to serve what the API serves)"
        )


def wait_for_config(client: redis.Redis, keys: Keys, url: str, stopping: Callable[[], bool]) -> bytes | None:
    """Block until the API server has written its config (it does on start), polling every 2 s.

    Returns None when ``stopping()`` turns true first. A worker box may well be started before the
    API, or while Redis is down, so neither is an error: each is logged once.
    """
    waiting_logged = False
    outage = Outage(url)
    while not stopping():
        try:
            raw = client.get(keys.config)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            outage.lost(exc)
            interruptible_sleep(outage.delay(), stopping)
            continue
        outage.back()
        if raw is not None:
            return bytes(raw)
        if not waiting_logged:
            log.info("waiting for an API server to write %s at %s", keys.config, redacted(url))
            waiting_logged = True
        interruptible_sleep(CONFIG_POLL_SECONDS, stopping)
    return None


def interruptible_sleep(seconds: float, stopping: Callable[[], bool]) -> None:
    """Sleep in small steps so SIGTERM is acted on within a tenth of a second. (A threading.Event
    set from a signal handler can deadlock, a plain flag cannot.)"""
    deadline = time.monotonic() + seconds
    while not stopping():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.1, left))


class Outage:
    """Logs a Redis outage once when it starts and once when it ends, and paces reconnects
    (1 s doubling to 10 s): a down Redis must not fill the log or spin the CPU."""

    def __init__(self, url: str, what: str = "") -> None:
        self.url = url
        self.what = what
        self.down = False
        self._delay = 0.5

    def lost(self, exc: BaseException) -> None:
        if not self.down:
            log.error("%slost Redis at %s: %s; retrying", self.what, redacted(self.url), exc)
            self.down = True

    def delay(self) -> float:
        self._delay = min(MAX_RECONNECT_DELAY, self._delay * 2)
        return self._delay

    def back(self) -> None:
        if self.down:
            log.info("%sRedis is back at %s", self.what, redacted(self.url))
            self.down = False
        self._delay = 0.5


# ----- the heartbeat --------------------------------------------------------------------------------


class Heartbeat:
    """A daemon thread that SETs this worker's heartbeat key every ``HEARTBEAT_SECONDS``.

    A thread, not a step of the main loop, because a shard can generate for longer than the key's
    TTL and the worker must not look dead meanwhile. Its own Redis client, so it never waits for
    the main thread's blocking read. Redis errors are logged once per outage and never fatal.
    """

    def __init__(
        self, url: str, keys: Keys, name: str, config: WorkerConfig, held: Callable[[], list[bytes]] = list, every: float = HEARTBEAT_SECONDS
    ) -> None:
        self.keys = keys
        self.every = every
        self.name = name
        self._held = held
        self.key = keys.worker(name)
        self._client = connect(url, socket_timeout=CONNECT_TIMEOUT)
        self._outage = Outage(url, "heartbeat: ")
        self._lock = threading.Lock()
        self._beat = WorkerHeartbeat(
            name=name,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=config.device,
            model=config.model,
            state="starting",
            images_done=0,
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def update(self, **changes: Any) -> None:
        """Change the published state (state, images_done, error) and publish it now."""
        with self._lock:
            self._beat = dataclasses.replace(self._beat, **changes)
        self._wake.set()

    @property
    def current(self) -> WorkerHeartbeat:
        with self._lock:
            return self._beat

    def publish(self) -> bool:
        with self._lock:
            text = self._beat.to_json()
        try:
            self._client.set(self.key, text, ex=HEARTBEAT_TTL_SECONDS)
        except (RedisError, OSError) as exc:
            self._outage.lost(exc)
            return False
        self._outage.back()
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            if self.publish():
                self._reclaim()
            self._wake.wait(self.every)

    def _reclaim(self) -> None:
        """Reset the idle time of the shards in hand: a living worker keeps them however long they run."""
        held = self._held()
        if not held:
            return
        try:
            self._client.xclaim(self.keys.shards, GROUP, self.name, min_idle_time=0, message_ids=held, justid=True)
        except (RedisError, OSError) as exc:
            self._outage.lost(exc)

    def stop(self, delete: bool = True) -> None:
        """Stop beating; delete the key (a worker that stops cleanly is gone at once), or leave it
        to expire (a failed worker: the API shows why for ``HEARTBEAT_TTL_SECONDS``)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(CONNECT_TIMEOUT * 2)
        if delete:
            try:
                self._client.delete(self.key)
            except (RedisError, OSError) as exc:
                log.warning("could not delete heartbeat key %s (it expires in %d s): %s", self.key, HEARTBEAT_TTL_SECONDS, exc)
        else:
            self.publish()
        self._client.close()


# ----- the worker ------------------------------------------------------------------------------------


@dataclass
class _Outgoing:
    """A shard entry in this worker's hands until its reply is on the API's stream and it is
    acknowledged. Kept in memory across a Redis outage, so a finished shard is written, not run again."""

    entry_id: bytes
    reply_to: bytes | None
    messages: list[bytes] = field(default_factory=list)
    label: str = ""


class RemoteWorker:
    """One worker process on a box: the Redis end of the shared worker loop (``ShardSource`` and
    ``ResultSink`` of ``gpu_workers.worker_loop``), its heartbeat, and its stop flag.

    Three threads use Redis: the taker (``take``), the sender (``finished``) and the heartbeat (its
    own client). redis-py's client takes a pooled connection per command, so they never share one.
    """

    def __init__(self, config: WorkerConfig, url: str, prefix: str, visibility_timeout: float) -> None:
        self.config = config
        self.url = url
        self.keys = Keys(prefix)
        self.visibility_ms = max(1, int(visibility_timeout * 1000))
        self.name = worker_name(os.getpid(), config.device)
        self.redis = connect(url)
        self.heartbeat: Heartbeat | None = None
        self.outage = Outage(url)
        self.stop_requested = False
        self._stop_deadline: float | None = None
        self._parent = os.getppid()
        self._check_own_pending = False
        self._group_ready = False
        self._held_lock = threading.Lock()
        self._held: set[bytes] = set()

    # ----- stopping

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: only sets a flag; the shards in hand are finished and acknowledged."""
        if not self.stop_requested:
            log.info("worker %s: %s received; stopping after the shard in hand (and the one taken ahead, if any)", self.name, signal.Signals(signum).name)
        self.stop_requested = True

    def stopping(self) -> bool:
        if not self.stop_requested and os.getppid() != self._parent:
            log.warning("worker %s: the launcher is gone; stopping", self.name)
            self.stop_requested = True
        return self.stop_requested

    # ----- the whole life of the process

    def run(self) -> int:
        """Returns the exit code: 0 stopped, 1 pipeline failed to load, 2 refused."""
        raw = wait_for_config(self.redis, self.keys, self.url, self.stopping)
        if raw is None:
            return 0
        try:
            check_model(served_model(raw, self.url), self.config.model, self.url)
        except Refused as refused:
            log.error("%s", refused)
            return EXIT_REFUSED

        # Beats (and re-claims) at least three times per visibility timeout: a living worker's
        # shards must never look idle long enough to be taken over.
        every = min(HEARTBEAT_SECONDS, self.visibility_ms / 3000)
        self.heartbeat = Heartbeat(self.url, self.keys, self.name, self.config, self.held, every)
        self.heartbeat.start()
        started = time.perf_counter()
        log.info("worker %s: loading model %s on %s", self.name, self.config.model, self.config.device)
        try:
            pipe, facts = load_for_worker(self.config)
        except Exception as exc:  # reported in the heartbeat, which /health shows
            log.exception("worker %s could not load model %r", self.name, self.config.model)
            self.heartbeat.update(state=WorkerState.FAILED.value, error=str(exc))
            self.heartbeat.stop(delete=False)
            return EXIT_LOAD_FAILED

        log.info("worker %s: ready in %.1f s; taking shards from %s", self.name, time.perf_counter() - started, self.keys.shards)
        self.heartbeat.update(state=WorkerState.READY.value, device_name=facts.device_name)
        try:
            images = serve(pipe, self.config, self, self, facts=facts)
        finally:
            self.heartbeat.stop(delete=True)
            self.redis.close()
        log.info("worker %s: stopped after %d image(s)", self.name, images)
        return 0

    # ----- ShardSource: taking a shard (the taker thread)

    def take(self) -> Taken | None:
        """The next shard entry, vetted; None when none came in the read's BLOCK time. Every Redis
        failure is survived here: logged once per outage, retried with backoff."""
        try:
            if not self._group_ready:
                self._ensure_group()
            entry = self._next_entry()
            self.outage.back()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.outage.back()  # Redis answered: it is there, only empty
            log.warning("worker %s: the consumer group is gone (Redis restarted empty?); creating it again", self.name)
            self._group_ready = False
            return None
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self.outage.lost(exc)
            self._check_own_pending = True
            interruptible_sleep(self.outage.delay(), self.stopping)
            return None
        if entry is None:
            return None
        with self._held_lock:
            if entry[0] in self._held:  # ours already (a re-claim came too late): never run it twice
                return None
            self._held.add(entry[0])
        return self._vet(*entry)

    def held(self) -> list[bytes]:
        """The entries taken and not yet acknowledged (for the heartbeat's re-claim)."""
        with self._held_lock:
            return list(self._held)

    def _ensure_group(self) -> None:
        """``id=0``: shards added before the group existed (a Redis restart) are delivered too."""
        try:
            self.redis.xgroup_create(self.keys.shards, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _next_entry(self) -> tuple[bytes, dict[bytes, bytes] | None, str] | None:
        """``(entry id, fields, source)``, or None when nothing came in the read's BLOCK time.

        ``source`` is ``new``, ``claimed`` (taken over from a worker that died or stalled) or
        ``own`` (left in our pending list by a read whose reply was lost with the connection).
        Our own leftovers go first, then taken-over shards: they are the oldest work.
        """
        shards = self.keys.shards
        if self._check_own_pending:
            # A read whose reply was lost with the connection left its entry in our own pending list.
            answer = self.redis.xreadgroup(GROUP, self.name, {shards: "0"}, count=1)
            for _stream, entries in answer or []:
                for entry_id, fields in entries:
                    return entry_id, fields, "own"
            self._check_own_pending = False
        _next, claimed, deleted = self.redis.xautoclaim(
            shards, GROUP, self.name, min_idle_time=self.visibility_ms, start_id="0-0", count=1
        )
        for entry_id in deleted or []:
            log.warning("worker %s: shard entry %s was pending but trimmed away; its request cannot finish", self.name, entry_id.decode())
        for entry_id, fields in claimed:
            return entry_id, fields, "claimed"
        answer = self.redis.xreadgroup(GROUP, self.name, {shards: ">"}, count=1, block=READ_BLOCK_MS)
        for _stream, entries in answer or []:
            for entry_id, fields in entries:
                return entry_id, fields, "new"
        return None

    def _times_delivered(self, entry_id: bytes) -> int:
        rows = self.redis.xpending_range(self.keys.shards, GROUP, min=entry_id, max=entry_id, count=1)
        return int(rows[0]["times_delivered"]) if rows else 1

    def _vet(self, entry_id: bytes, fields: dict[bytes, bytes] | None, source: str) -> Taken:
        """A shard to run, or the reply that must go instead (given up, wrong model), or an entry
        that can never run and is only acknowledged (unreadable, nobody to answer)."""
        label = entry_id.decode()
        if not fields or TASK_FIELD not in fields:
            log.error("worker %s: shard entry %s has no %s field; dropping it", self.name, label, TASK_FIELD.decode())
            return Taken(None, _Outgoing(entry_id, None, label=label))
        reply_to = fields.get(REPLY_TO_FIELD)
        try:
            task = wire.decode(fields[TASK_FIELD])
            if not isinstance(task, ShardTask):
                raise wire.WireError(f"expected a ShardTask, got {type(task).__name__}")
        except wire.WireError as exc:
            log.error("worker %s: shard entry %s is not a valid shard (%s); dropping it", self.name, label, exc)
            return Taken(None, _Outgoing(entry_id, None, label=label))
        label = f"{task.request_id}/{task.shard_id}"
        if not reply_to:
            log.error("worker %s: shard %s has no %s field; nobody can get its result, dropping it", self.name, label, REPLY_TO_FIELD.decode())
            return Taken(None, _Outgoing(entry_id, None, label=label))
        out = _Outgoing(entry_id, reply_to, label=label)

        if source != "new":
            # Every earlier delivery of this shard ended without a result: its holder died or hung.
            delivered = self._times_delivered(entry_id)
            if source == "claimed":
                log.warning("worker %s: took over shard %s (delivery %d) from a worker that died or stalled", self.name, label, delivered)
            if given_up(delivered - 1):
                reason = FailureReason.WORKER_CRASHES
                error = given_up_detail(task, reason, "the workers holding them died, stalled or ran past the shard timeout")
                log.error("worker %s: shard %s failed: %s", self.name, label, error)
                return Taken(task, out, ShardFailed(self.config.worker_id, task.request_id, task.shard_id, error, reason.value))

        model = (fields.get(MODEL_FIELD) or b"").decode(errors="replace")
        if model != self.config.model:
            error = (
                f"Image generation failed: the shard is for model {model or '(none)'} but worker {self.name} serves "
                f"model {self.config.model}; start the workers with --model {model or '(the API server model)'}."
            )
            log.error("worker %s: shard %s: %s", self.name, label, error)
            return Taken(task, out, ShardFailed(self.config.worker_id, task.request_id, task.shard_id, error))
        return Taken(task, out)

    # ----- ResultSink: replying, then acknowledging (the main and sender threads)

    def started(self, taken: Taken) -> None:
        """Best effort: ShardStarted only informs; a Redis blip must not keep the shard from running."""
        assert taken.task is not None and taken.receipt.reply_to is not None
        message = ShardStarted(self.config.worker_id, taken.task.request_id, taken.task.shard_id)
        try:
            self._xadd_result(taken.receipt.reply_to, wire.encode(message))
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self.outage.lost(exc)

    def state(self, state: WorkerState, images_done: int) -> None:
        assert self.heartbeat is not None
        self.heartbeat.update(state=state.value, images_done=images_done)

    def finished(self, taken: Taken, reply: ShardDone | ShardFailed | None) -> None:
        """Write the reply, then acknowledge; through a Redis outage, keep trying until it is back
        (or, once stopping, for ``STOP_FLUSH_SECONDS``: past that the shard stays pending and
        another worker takes it over after the visibility timeout)."""
        out: _Outgoing = taken.receipt
        if reply is not None:
            out.messages.append(wire.encode(reply))
        while True:
            try:
                self._flush(out)
                self.outage.back()
                break
            except (RedisConnectionError, RedisTimeoutError) as exc:
                self.outage.lost(exc)
            if self.stopping():
                self._stop_deadline = self._stop_deadline or time.monotonic() + STOP_FLUSH_SECONDS
                if time.monotonic() > self._stop_deadline:
                    log.warning(
                        "worker %s: Redis did not take shard %s in %.0f s; another worker will run it again after "
                        "the visibility timeout", self.name, out.label, STOP_FLUSH_SECONDS,
                    )
                    break
            time.sleep(min(1.0, self.outage.delay()))
        with self._held_lock:
            self._held.discard(out.entry_id)

    def _flush(self, out: _Outgoing) -> None:
        """Write the shard's messages, then XACK and XDEL it: in that order, so a worker that dies
        in between leaves the shard pending (to run again), never acknowledged without a result."""
        while out.messages:
            assert out.reply_to is not None
            self._xadd_result(out.reply_to, out.messages[0])
            out.messages.pop(0)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(self.keys.shards, GROUP, out.entry_id)
        pipe.xdel(self.keys.shards, out.entry_id)
        try:
            pipe.execute()
        except ResponseError as exc:  # NOGROUP: Redis restarted empty, nothing left to acknowledge
            if "NOGROUP" not in str(exc):
                raise

    def _xadd_result(self, reply_to: bytes, message: bytes) -> None:
        self.redis.xadd(reply_to, {MESSAGE_FIELD: message}, maxlen=RESULT_STREAM_MAXLEN, approximate=True)


def remote_worker_main(config: WorkerConfig, broker_url: str, prefix: str, visibility_timeout: float, log_level: str = "INFO") -> None:
    """Entry point of the spawned process for one device; exits with 0 (stopped), 1 (the pipeline
    did not load; the launcher restarts it) or 2 (refused; the launcher gives up)."""
    quiet_libraries()
    config = dataclasses.replace(config, worker_id=os.getpid())  # the id in every message is the pid
    logging.basicConfig(
        level=log_level.upper(),
        format=f"%(asctime)s gpu_workers[{os.getpid()} {config.device}] %(levelname)s %(message)s",
    )
    worker = RemoteWorker(config, broker_url, prefix, visibility_timeout)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    try:
        code = worker.run()
    except Exception:  # an unexpected bug: log it; the launcher restarts the worker
        log.exception("worker %s crashed", worker.name)
        code = 1
    sys.exit(code)
