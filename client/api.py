"""Requests the way a long batch needs them: 503 retried after ``Retry-After``, dropped
connections survived, and every failure turned into one sentence for the user.

Our server takes a batch as a job (``POST /jobs``) whose progress is polled and whose result waits
on the server, so a tunnel that drops at minute 3 costs a reattach, not the batch. A server without
jobs (the reference one) gets one ``POST /generate``: the server holds the status line for up to
one heartbeat interval and then sends a space every interval until the JSON comes, so the read
timeout is the longest silence allowed, not the length of the whole request.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests

CONNECT_TIMEOUT_SECONDS = 15.0
DEFAULT_RETRY_AFTER_SECONDS = 10
# A server that asks for a longer wait than this is waited on for this long, then asked again.
MAX_RETRY_AFTER_SECONDS = 300
MAX_CONNECT_BACKOFF_SECONDS = 30
MAX_REATTACH_BACKOFF_SECONDS = 10
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
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

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        """The success body of ``POST /generate``; ``ClientError`` for anything else."""
        return self._success(self._send_with_retries("POST", "/generate", body))

    def start_job(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """``POST /jobs``: the accepted job (``job_id``, ``images_total``), or None when the server
        has no jobs API (the reference server answers 404 or 405): then use ``generate``."""
        answer = self._send_with_retries("POST", "/jobs", body)
        if answer.status in (404, 405):
            return None
        data = answer.json()
        if answer.status == 202 and isinstance(data, dict) and isinstance(data.get("job_id"), str):
            return data
        self._success(answer)  # raises the right error for what the server said
        raise ClientError(f"unexpected answer from {self.base_url}/jobs (HTTP {answer.status}): {answer.detail()}")

    def wait_for_job(self, job_id: str, on_progress: Callable[[int, int], None]) -> dict[str, Any]:
        """Poll ``GET /jobs/{id}`` until the job ends; its body then holds the images. A dropped
        connection (a tunnel cut, a server restart) is not the end of the job: keep reattaching to
        it for ``reattach_seconds`` instead of starting over."""
        lost_since: float | None = None
        attempt = 0
        while True:
            try:
                answer = self._request("GET", f"/jobs/{job_id}")
                if answer.status in LOST_STATUSES:
                    raise _Lost(f"HTTP {answer.status}: {answer.detail()}")
            except (requests.ConnectionError, requests.Timeout, _Lost) as exc:
                lost_since = lost_since or time.monotonic()
                lost_for = time.monotonic() - lost_since
                if lost_for > self.reattach_seconds:
                    raise ClientError(
                        f"lost {self.base_url} for {lost_for:.0f} s ({_reason(exc)}); job {job_id} goes on without us: "
                        f"its result stays at {self.base_url}/jobs/{job_id} for the server's retention time"
                    ) from None
                attempt += 1
                wait = min(2**attempt, MAX_REATTACH_BACKOFF_SECONDS)
                self.on_retry(f"connection lost ({_reason(exc)}); reattaching to job {job_id} in {wait} s")
                self.sleep(wait)
                continue
            if lost_since is not None:
                self.on_retry(f"reattached to job {job_id}")
                lost_since, attempt = None, 0
            data = answer.json()
            if answer.status == 404:
                raise ClientError(f"job {job_id} is gone from {self.base_url} (it expired, or the server lost its job database)")
            if answer.status != 200 or not isinstance(data, dict) or data.get("state") not in JOB_STATES:
                self._success(answer)
                raise ClientError(f"unexpected answer from {self.base_url}/jobs/{job_id} (HTTP {answer.status}): {answer.detail()}")
            on_progress(int(data.get("images_done", 0)), int(data.get("images_total", 0)))
            if data["state"] == "done":
                return self._success(answer)
            if data["state"] in ("failed", "cancelled"):
                raise ClientError(f"job {job_id} {data['state']}: {data.get('detail') or 'no detail given'}")
            self.sleep(self.poll_seconds)

    def images_done(self) -> int | None:
        """Images the server's workers have finished so far (from /health), or None if it cannot tell."""
        try:
            health = self.health_session.get(self.base_url + "/health", timeout=CONNECT_TIMEOUT_SECONDS).json()
            return sum(int(worker["images_done"]) for worker in health["workers"])
        except (requests.RequestException, ValueError, KeyError, TypeError):
            return None

    def _send_with_retries(self, method: str, path: str, body: dict[str, Any]) -> Answer:
        """Send; a refused connection or a 503 is tried again (after ``Retry-After``) up to
        ``retries`` times; the last answer is returned whatever it is."""
        for attempt in range(1, self.retries + 2):
            last_try = attempt > self.retries
            try:
                answer = self._request(method, path, body)
            except requests.ConnectionError as exc:  # refused or reset before an answer: maybe restarting
                if last_try or isinstance(exc, requests.Timeout):
                    raise ClientError(self._unreachable(exc)) from None
                wait = min(2**attempt, MAX_CONNECT_BACKOFF_SECONDS)
                self.on_retry(f"cannot connect to {self.base_url}; retrying in {wait} s ({attempt}/{self.retries})")
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

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Answer:
        url = self.base_url + path
        timeout = (CONNECT_TIMEOUT_SECONDS, self.read_timeout)
        with self.session.request(method, url, json=body, stream=True, timeout=timeout) as response:
            try:
                content = b"".join(response.iter_content(READ_CHUNK_BYTES))
            except requests.RequestException as exc:
                if method == "GET":  # a job poll: the caller reattaches
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
    return text if len(text) <= 160 else text[:157] + "..."
