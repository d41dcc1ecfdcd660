"""Requests the way a long batch needs them: 503 retried after ``Retry-After``, dropped
connections survived, and every failure turned into one sentence for the user.

Our server takes a batch as a job (``POST /jobs``, with an ``Idempotency-Key`` so that a submit
retried after a broken connection never runs twice), whose images wait on the server as they
finish. The client polls the job and reads its finished images as a zip
(``GET /jobs/{id}/archive?since=N``) as they come, so a tunnel that drops at minute 3 costs a
reattach and the rest of one archive, not the batch. A server without jobs (the reference one)
gets one ``POST /generate``: the server holds the status line for up to one heartbeat interval and
then sends a space every interval until the JSON comes, so the read timeout is the longest silence
allowed, not the length of the whole request.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from base64 import b64decode
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
import urllib3

from client import archive

CONNECT_TIMEOUT_SECONDS = 15.0
DEFAULT_RETRY_AFTER_SECONDS = 10
# A server that asks for a longer wait than this is waited on for this long, then asked again.
MAX_RETRY_AFTER_SECONDS = 300
MAX_CONNECT_BACKOFF_SECONDS = 30
MAX_REATTACH_BACKOFF_SECONDS = 10
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
ENDED_STATES = ("done", "failed", "cancelled")
# A job's first poll comes soon (a small batch on a GPU is done in a second); then the interval
# doubles up to ``poll_seconds``.
FIRST_POLL_SECONDS = 0.25
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MANIFEST_NAME = "manifest.json"
# What a tunnel or a restarting server answers while the job itself goes on: keep reattaching.
LOST_STATUSES = (502, 503, 504)
READ_CHUNK_BYTES = 1 << 16
# What to do about a 4xx (the request itself is wrong, so it is never sent again as it is).
HINTS = {
    401: " Give the key with --api-key or the SDXL_API_KEY variable.",
    413: " Send fewer or shorter prompts per request (--max-images-per-request).",
}


class _Lost(Exception):
    """The server or a tunnel in front of it answered that it is not there right now."""


class ClientError(Exception):
    """A failure to tell the user in one sentence. ``exit_code`` 2: the request or the command line
    is wrong (fix it, do not retry); 1: the server or the network failed."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class JobGone(ClientError):
    """The server does not know the job (it never existed, or it has expired)."""


@dataclass(frozen=True)
class Accepted:
    """A job the server took: ``replayed`` when it is the one an earlier try with the same
    Idempotency-Key made."""

    job_id: str
    images_total: int
    seeds: tuple[int, ...]
    replayed: bool = False


@dataclass(frozen=True)
class JobImage:
    """One finished image of a job: its index in the job, seed, prompt (when the server says) and bytes."""

    index: int
    seed: int
    prompt: str | None
    data: bytes


@dataclass
class Answer:
    """A complete HTTP answer: status, headers and the whole body (heartbeat spaces included)."""

    status: int
    headers: Mapping[str, str]  # requests' case-insensitive mapping: "retry-after" finds "Retry-After"
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def detail(self) -> str:
        """The server's one-sentence ``detail``, or the start of whatever else it sent."""
        data = self.json()
        if isinstance(data, dict) and isinstance(data.get("detail"), str):
            return data["detail"]
        text = self.body.decode("utf-8", errors="replace").strip()
        return text[:300] or "(empty body)"


@dataclass
class GenerateClient:
    """Talks to one server. ``read_timeout``: the longest silence allowed (seconds without a byte);
    ``retries``: how many times a 503 or a refused connection is tried again."""

    base_url: str
    api_key: str | None = None
    read_timeout: float = 900.0
    retries: int = 30
    reattach_seconds: float = 600.0
    poll_seconds: float = 1.0
    on_retry: Callable[[str], None] = print
    session: requests.Session = field(default_factory=requests.Session)
    # /health is polled from the progress thread while the POST waits: sessions are not thread-safe.
    health_session: requests.Session = field(default_factory=requests.Session)
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if self.api_key:
            for session in (self.session, self.health_session):
                session.headers["Authorization"] = f"Bearer {self.api_key}"

    def generate(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """The success body of ``POST /generate``; ``ClientError`` for anything else."""
        return self._success(self._send_with_retries("POST", "/generate", body, _key_header(idempotency_key)))

    def start_job(self, body: dict[str, Any], idempotency_key: str | None = None) -> Accepted | None:
        """``POST /jobs``: the accepted job, or None when the server has no jobs API (the reference
        server answers 404 or 405): then use ``generate``. With an ``idempotency_key``, a
        connection that breaks at any point is tried again with the same key: the server answers
        with the job the first try made, never a second one."""
        answer = self._send_with_retries("POST", "/jobs", body, _key_header(idempotency_key), resend_on_break=bool(idempotency_key))
        if answer.status in (404, 405):
            return None
        data = answer.json()
        if answer.status == 202 and isinstance(data, dict) and isinstance(data.get("job_id"), str):
            seeds = data.get("seeds")
            return Accepted(
                job_id=data["job_id"],
                images_total=int(data.get("images_total") or 0),
                seeds=tuple(seeds) if isinstance(seeds, list) else (),
                replayed=answer.headers.get(REPLAYED_HEADER, "").lower() == "true",
            )
        self._success(answer)  # raises the right error for what the server said
        raise ClientError(f"unexpected answer from {self.base_url}/jobs (HTTP {answer.status}): {answer.detail()}")

    def server_sizes(self) -> tuple[str, ...] | None:
        """The image sizes the server makes (``GET /``'s ``sizes``), or None where it does not say
        (the reference server): checked before a batch starts, so a wrong ``--size`` costs nothing."""
        answer = self._send_with_retries("GET", "/", {})
        data = answer.json() if answer.status == 200 else None
        sizes = data.get("sizes") if isinstance(data, dict) else None
        if answer.status == 401:
            self._success(answer)  # the key's error, as every other call gives it
        return tuple(str(size) for size in sizes) if isinstance(sizes, list) else None

    def job_status(self, job_id: str) -> dict[str, Any]:
        """``GET /jobs/{id}`` once, without reattaching (for ``--job``, before following it)."""
        try:
            return self._job_status(job_id)
        except (requests.ConnectionError, requests.Timeout, _Lost) as exc:
            raise ClientError(self._unreachable(exc) if not isinstance(exc, _Lost) else f"{self.base_url}: {exc}") from None

    def follow_job(
        self, job_id: str, have: set[int], on_image: Callable[[JobImage], None], on_progress: Callable[[int, int], None]
    ) -> dict[str, Any]:
        """Poll ``GET /jobs/{id}`` until the job ends, and whenever more of its images are done,
        read ``/jobs/{id}/archive?since=<lowest index not in have>`` and hand each image not in
        ``have`` to ``on_image`` (its sha256 checked against the manifest), adding its index to
        ``have``. Images may finish out of order (several workers): ``have`` is a set. A dropped
        connection (a tunnel cut, a server restart, an archive cut off half way) is not the end of
        the job: keep reattaching for ``reattach_seconds``, then go on where the saved images stop.
        Returns the last status of a job that is done with every image in ``have``; a failed or
        cancelled job is a ``ClientError`` once the images it finished are handed over."""
        reattach = _Reattach(self, job_id)
        fetched_at = -1  # images_done when the archive was last read whole (-1: not yet, or it broke off)
        has_archive = True  # False: a server of ours from before GET /jobs/{id}/archive
        last_fetch_done = False
        wait = FIRST_POLL_SECONDS
        while True:
            try:
                status = self._job_status(job_id)
                reattach.back()
                total, done, state = int(status.get("images_total", 0)), int(status.get("images_done", 0)), status["state"]
                ended = state in ENDED_STATES
                on_progress(max(done, len(have)), total)
                more = len(have) < total and ((done > len(have) and done != fetched_at) or (ended and not last_fetch_done))
                if more:
                    last_fetch_done = ended
                    if has_archive:
                        has_archive = self._fetch_archive(job_id, have, on_image, reattach)
                        fetched_at = done
                    if not has_archive and state == "done":
                        self._fetch_listed(job_id, status, have, on_image)
            except (requests.ConnectionError, requests.Timeout, _Lost) as exc:
                fetched_at, last_fetch_done = -1, False
                reattach.lost(exc)
                continue
            if ended:
                if state != "done":
                    raise ClientError(f"job {job_id} {state}: {status.get('detail') or 'no detail given'}")
                if len(have) < total:
                    missing = sorted(set(range(total)) - have)
                    raise ClientError(
                        f"job {job_id} is done, but {len(missing)} of its images could not be fetched (from index {missing[0]}): "
                        "the server's disk budget may have removed them"
                    )
                return status
            self.sleep(wait)
            wait = min(wait * 2, self.poll_seconds)

    def _job_status(self, job_id: str) -> dict[str, Any]:
        answer = self._request("GET", f"/jobs/{job_id}")
        if answer.status in LOST_STATUSES:
            raise _Lost(f"HTTP {answer.status}: {answer.detail()}")
        data = answer.json()
        if answer.status == 404:
            raise JobGone(f"job {job_id} is not on {self.base_url}: it never existed, or it has expired")
        if answer.status == 410:  # done, but the disk budget removed some of its images
            raise ClientError(f"job {job_id}: {answer.detail()}")
        if answer.status != 200 or not isinstance(data, dict) or data.get("state") not in JOB_STATES:
            self._success(answer)
            raise ClientError(f"unexpected answer from {self.base_url}/jobs/{job_id} (HTTP {answer.status}): {answer.detail()}")
        return data

    def _fetch_archive(self, job_id: str, have: set[int], on_image: Callable[[JobImage], None], reattach: _Reattach) -> bool:
        """Read the archive from the lowest index not in ``have`` on; False when the server has no
        archive route (the job itself was just seen, so a 404 means the route)."""
        since = next(index for index in itertools.count() if index not in have)
        if reattach.resumed and since:
            self.on_retry(f"job {job_id}: fetching its images from index {since} on ({len(have)} already saved)")
        reattach.resumed = False
        url = f"{self.base_url}/jobs/{job_id}/archive?since={since}"
        with self.session.get(url, stream=True, timeout=(CONNECT_TIMEOUT_SECONDS, self.read_timeout)) as response:
            if response.status_code == 404:
                return False
            if response.status_code != 200:
                answer = Answer(response.status_code, response.headers, response.content)
                if answer.status in LOST_STATUSES:
                    raise _Lost(f"HTTP {answer.status}: {answer.detail()}")
                raise ClientError(f"the archive of job {job_id} was refused (HTTP {answer.status}): {answer.detail()}")
            listed: dict[str, dict[str, Any]] | None = None
            entries = archive.entries(_arriving(response), lambda name: _int((listed or {}).get(name, {}).get("bytes")))
            while (entry := self._next_entry(job_id, entries)) is not None:
                name, data = entry
                if listed is None:
                    listed = self._manifest(job_id, name, data)
                    continue
                item = listed.get(name)
                if item is None or item["index"] in have:
                    continue
                if hashlib.sha256(data).hexdigest() != item["sha256"]:
                    raise ClientError(f"the archive of job {job_id} is damaged: {name} does not match the sha256 of its manifest")
                on_image(JobImage(item["index"], item["seed"], item.get("prompt"), data))
                have.add(item["index"])
        return True

    def _next_entry(self, job_id: str, entries: Iterator[tuple[str, bytes]]) -> tuple[str, bytes] | None:
        """The archive's next entry as it arrives, None after the last; a connection that breaks
        is a ``requests.ConnectionError`` (the caller reattaches), a damaged zip a ``ClientError``."""
        try:
            return next(entries, None)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise requests.ConnectionError(f"the archive broke off: {_reason(exc)}") from None
        except archive.Truncated as exc:
            raise requests.ConnectionError(f"the archive broke off: {exc}") from None
        except archive.ArchiveError as exc:
            raise ClientError(f"the archive of job {job_id} from {self.base_url} is unreadable: {exc}") from None

    def _manifest(self, job_id: str, name: str, data: bytes) -> dict[str, dict[str, Any]]:
        """The archive's ``manifest.json``: its images by file name, each with an int index and seed."""
        try:
            if name != MANIFEST_NAME:
                raise ValueError(f"its first entry is {name}, not {MANIFEST_NAME}")
            listed = {}
            for item in json.loads(data)["images"]:
                item["index"], item["seed"] = int(item["index"]), int(item["seed"])
                listed[str(item["file"])] = item
            return listed
        except (ValueError, KeyError, TypeError) as exc:
            raise ClientError(f"the archive of job {job_id} from {self.base_url} has no readable manifest: {exc}") from None

    def _fetch_listed(self, job_id: str, status: dict[str, Any], have: set[int], on_image: Callable[[JobImage], None]) -> None:
        """A done job's images from its body (a server without archives): each link, or base64."""
        images, seeds = status.get("images"), status.get("seeds")
        if not isinstance(images, list) or not isinstance(seeds, list) or len(images) != len(seeds):
            raise ClientError(f"job {job_id} is done, but {self.base_url} did not list its images")
        for index, (value, seed) in enumerate(zip(images, seeds, strict=True)):
            if index in have:
                continue
            if value.startswith(("http://", "https://", "/")):
                # The link's host is the one the server believes it has: behind a tunnel, ours is the one that works.
                answer = self._request("GET", "/images/" + value.rsplit("/images/", 1)[-1])
                if answer.status in LOST_STATUSES:
                    raise _Lost(f"HTTP {answer.status}: {answer.detail()}")
                if answer.status != 200:
                    raise ClientError(f"image {index} of job {job_id} could not be fetched (HTTP {answer.status}): {answer.detail()}")
                data = answer.body
            else:
                data = b64decode(value)
            on_image(JobImage(index, int(seed), None, data))
            have.add(index)

    def images_done(self) -> int | None:
        """Images the server's workers have finished so far (from /health), or None if it cannot tell."""
        try:
            health = self.health_session.get(self.base_url + "/health", timeout=CONNECT_TIMEOUT_SECONDS).json()
            return sum(int(worker["images_done"]) for worker in health["workers"])
        except (requests.RequestException, ValueError, KeyError, TypeError):
            return None

    def _send_with_retries(
        self, method: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None, resend_on_break: bool = False
    ) -> Answer:
        """Send; a refused connection or a 503 is tried again (after ``Retry-After``) up to
        ``retries`` times, and so is a connection that broke mid-answer when ``resend_on_break``
        (the request is idempotent); the last answer is returned whatever it is."""
        for attempt in range(1, self.retries + 2):
            last_try = attempt > self.retries
            try:
                answer = self._request(method, path, body, headers, resend_on_break)
            except requests.ConnectionError as exc:  # refused or reset before an answer: maybe restarting
                if last_try or isinstance(exc, requests.Timeout):
                    raise ClientError(self._unreachable(exc)) from None
                wait = min(2**attempt, MAX_CONNECT_BACKOFF_SECONDS)
                self.on_retry(f"no answer from {self.base_url} ({_reason(exc)}); retrying in {wait} s ({attempt}/{self.retries})")
                self.sleep(wait)
                continue
            except requests.Timeout:
                raise ClientError(
                    f"{self.base_url} sent nothing for {self.read_timeout:g} s (our server sends a heartbeat every "
                    "10 s by default): raise --timeout for a server without heartbeats"
                ) from None
            except requests.RequestException as exc:  # a malformed URL and the like: fix the command line
                raise ClientError(f"cannot send the request to {self.base_url}: {exc}", exit_code=2) from None
            if answer.status == 503 and not last_try:
                wait = retry_after(answer.headers)
                self.on_retry(f"server busy: {answer.detail()} Retrying in {wait} s ({attempt}/{self.retries})")
                self.sleep(wait)
                continue
            return answer
        raise AssertionError("unreachable: the last try returns or raises")

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None, resend_on_break: bool = False
    ) -> Answer:
        url = self.base_url + path
        timeout = (CONNECT_TIMEOUT_SECONDS, self.read_timeout)
        with self.session.request(method, url, json=body, headers=headers, stream=True, timeout=timeout) as response:
            try:
                content = b"".join(response.iter_content(READ_CHUNK_BYTES))
            except requests.RequestException as exc:
                if method == "GET" or resend_on_break:  # a job poll, or a submit with a key: try again
                    raise requests.ConnectionError(f"the connection broke mid-answer ({_reason(exc)})") from None
                raise ClientError(
                    f"the connection to {self.base_url} broke while waiting for the images ({_reason(exc)}). "
                    f"If the server was silent for {self.read_timeout:g} s, raise --timeout."
                ) from None
            return Answer(response.status_code, response.headers, content)

    def _success(self, answer: Answer) -> dict[str, Any]:
        data = answer.json()
        if answer.status == 200 and isinstance(data, dict):
            if data.get("success") is False:  # failed after the heartbeats had started: told in the body
                raise ClientError(f"generation failed: {answer.detail()}")
            if isinstance(data.get("images"), list):
                return data
        if answer.status == 503:
            raise ClientError(f"the server is still unavailable after {self.retries} retries: {answer.detail()}")
        if 400 <= answer.status < 500:
            hint = HINTS.get(answer.status, "")
            raise ClientError(f"the server refused the request (HTTP {answer.status}): {answer.detail()}{hint}", exit_code=2)
        if answer.status >= 500:
            raise ClientError(f"generation failed (HTTP {answer.status}): {answer.detail()}")
        raise ClientError(f"unexpected answer from {self.base_url}/generate (HTTP {answer.status}): {answer.detail()}")

    def _unreachable(self, exc: requests.RequestException) -> str:
        if isinstance(exc, requests.Timeout):
            return f"{self.base_url} did not answer in time ({_reason(exc)}); is the URL right?"
        return f"cannot reach {self.base_url} ({_reason(exc)}): is the server running, and the URL right (--url)?"


@dataclass
class _Reattach:
    """How long a job has been out of reach, and what to do about it: wait (1, 2, 4 ... 10 s) and
    try again until ``reattach_seconds`` have passed."""

    client: GenerateClient
    job_id: str
    lost_since: float | None = None
    attempt: int = 0
    resumed: bool = False  # reattached after a loss: the next archive says where it goes on

    def lost(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.lost_since = self.lost_since or now
        lost_for = now - self.lost_since
        base = self.client.base_url
        if lost_for > self.client.reattach_seconds:
            raise ClientError(
                f"lost {base} for {lost_for:.0f} s ({_reason(exc)}); job {self.job_id} goes on without us: "
                f"its images stay at {base}/jobs/{self.job_id} for the server's retention time"
            )
        self.attempt += 1
        wait = min(2**self.attempt, MAX_REATTACH_BACKOFF_SECONDS)
        self.client.on_retry(f"connection lost ({_reason(exc)}); reattaching to job {self.job_id} in {wait} s")
        self.client.sleep(wait)

    def back(self) -> None:
        if self.lost_since is not None:
            self.client.on_retry(f"reattached to job {self.job_id}")
            self.lost_since, self.attempt, self.resumed = None, 0, True


def _arriving(response: requests.Response) -> Iterator[bytes]:
    """The body as it arrives, each piece as soon as the socket has it. ``iter_content`` waits
    for whole chunks of its size and drops the last, partial one when the connection breaks:
    the end of an image that did arrive."""
    if not hasattr(response.raw, "read1"):  # urllib3 1.x
        yield from response.iter_content(READ_CHUNK_BYTES)
        return
    while data := response.raw.read1(READ_CHUNK_BYTES, decode_content=True):
        yield data


def _key_header(key: str | None) -> dict[str, str] | None:
    return {IDEMPOTENCY_HEADER: key} if key else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def retry_after(headers: Mapping[str, str]) -> int:
    """Seconds to wait from a ``Retry-After`` header (our server sends whole seconds)."""
    try:
        wait = int(headers.get("Retry-After", ""))
    except ValueError:
        wait = DEFAULT_RETRY_AFTER_SECONDS
    return max(1, min(wait, MAX_RETRY_AFTER_SECONDS))


def _reason(exc: BaseException) -> str:
    """The cause in a few words: requests wraps urllib3's errors in long reprs; the errno text is
    what the user needs ("Connection refused")."""
    text = str(exc)
    errno_text = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if errno_text:
        return errno_text.group(1).strip()
    cut = re.search(r"IncompleteRead\((\d+) bytes read, (\d+) more expected\)", text)
    if cut:
        return f"cut off after {cut.group(1)} bytes, {cut.group(2)} more expected"
    if "RemoteDisconnected" in text:
        return "the server closed the connection without an answer"
    return text if len(text) <= 160 else text[:157] + "..."
