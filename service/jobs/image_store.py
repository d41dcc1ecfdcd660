"""Every job's image files, under unguessable names, within a disk budget.

A name is 128 random bits in hex and the format's extension (``<id>.webp``); a lookup accepts
nothing but that shape, so a path can never leave the folder. (Rows written before formats existed
name a bare id: that is ``<id>.png``.) Writes go to a temporary name and are renamed, so a reader never sees half a file.
When the folder passes its byte budget the oldest go first: a public server must not let anyone
fill its disk. How long images live is the jobs' business (``JobManager.expire``: a job's
retention counts from when it finished), never a file's age: a server that was down longer than
the retention must not lose the images of a job still unfinished.

A disk fault (full, read-only, the folder gone) is the caller's to wait out (``JobManager``): it
reports it here (``problem``, for /health and admission) in words without a server path.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import secrets
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from contract.formats import CONTENT_TYPES

log = logging.getLogger(__name__)

IMAGE_NAME = re.compile(r"(?P<id>[0-9a-f]{32})(?:\.(?P<ext>" + "|".join(CONTENT_TYPES) + r"))?")
# What an image is assumed to weigh before any was stored: a 1024x576 PNG at level 1 is 0.8-1.4 MB.
FIRST_BYTES_PER_IMAGE = 1_500_000
# Threads of the store's own: saves, reads for base64 answers, archives, sweeps.
STORE_THREADS = 4
T = TypeVar("T")


class ImageStore:
    def __init__(self, directory: Path, retention_seconds: float, max_bytes: int | None = None) -> None:
        self.directory = directory
        self.retention_seconds = retention_seconds
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # saves run in worker threads
        self._sizes: OrderedDict[str, int] = OrderedDict()  # oldest first
        for path in sorted(directory.iterdir(), key=lambda p: p.stat().st_mtime):
            if file_name(path.name) == path.name:
                self._sizes[path.name] = path.stat().st_size
        self._used = sum(self._sizes.values())
        self.bytes_per_image = float(FIRST_BYTES_PER_IMAGE)
        self._sizes_seen = 0
        self.problem: str | None = None
        # The store's own threads: a slow thing elsewhere (a name to resolve, a database call)
        # never queues a shard's save or an archive's read behind it, nor the reverse.
        self.executor = ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="image-store")

    async def run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call(*args, **kwargs)`` (file work: a save, a read, an archive's next block) on the
        store's own threads."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(call, *args, **kwargs))

    def close(self) -> None:
        """Let the store's threads go once the app has stopped (its last writes are done by then)."""
        self.executor.shutdown(wait=False)

    @property
    def used_bytes(self) -> int:
        return self._used

    def free_bytes(self) -> int:
        """Free space on the image disk (of the nearest folder that exists, if the folder is gone)."""
        where = self.directory
        while not where.is_dir() and where != where.parent:
            where = where.parent
        try:
            return shutil.disk_usage(where).free
        except OSError:
            return 0

    def save(self, data: bytes, extension: str) -> str:
        """Store one image and return its name (blocking I/O: call it from a thread). A folder that
        was removed is made again; any other fault raises ``OSError`` and leaves no partial file."""
        if extension not in CONTENT_TYPES:
            raise ValueError(f"not an image extension: {extension!r}")
        name = f"{secrets.token_hex(16)}.{extension}"
        final = self.directory / name
        partial = final.with_suffix(".part")
        try:
            try:
                partial.write_bytes(data)
            except FileNotFoundError:
                self.directory.mkdir(parents=True, exist_ok=True)
                partial.write_bytes(data)
            os.replace(partial, final)
        except OSError:
            if partial.parent.is_dir():
                partial.unlink(missing_ok=True)
            raise
        with self._lock:
            self._sizes[name] = len(data)
            self._used += len(data)
            self._learn_size(len(data))
            self._enforce_budget()
        return name

    def _learn_size(self, size: int) -> None:
        """A moving average of bytes per image, for admission's estimate of a batch's disk space."""
        self.bytes_per_image = size if self._sizes_seen == 0 else 0.9 * self.bytes_per_image + 0.1 * size
        self._sizes_seen += 1

    def report(self, exc: BaseException | None) -> None:
        """A write failed (``exc``) or worked again (None): what /health and admission say."""
        if exc is None:
            if self.problem is not None:
                log.info("the image folder takes images again")
            self.problem = None
            return
        errno = getattr(exc, "errno", None)
        reason = os.strerror(errno) if isinstance(errno, int) else type(exc).__name__
        problem = f"cannot write images: {reason}"
        if problem != self.problem:
            log.error("%s (%s); the jobs wait and retry", problem, exc)
        self.problem = problem

    def sweep(self, known: set[str]) -> int:
        """Delete what no job names: partial files, and images whose database row was never written
        (a kill between the two). Run at start, before any job resumes."""
        known = {file_name(name) for name in known}
        removed = 0
        for path in list(self.directory.iterdir()):
            if path.suffix == ".part":
                path.unlink(missing_ok=True)
            elif file_name(path.name) == path.name and path.name not in known:
                self._remove(path.name)
            else:
                continue
            removed += 1
        return removed

    def path_for(self, name: str) -> Path | None:
        """The file of an image name (``<id>.<ext>``, or a bare id from before formats), if it is
        one of ours and still there."""
        stored = file_name(name)
        if stored is None:
            return None
        path = self.directory / stored
        return path if path.is_file() else None

    def remove_all(self, names: list[str]) -> None:
        """Delete these images (an expired job's); names that are already gone are skipped."""
        for name in names:
            stored = file_name(name)
            if stored is not None:
                self._remove(stored)

    def _enforce_budget(self) -> None:
        """Drop the oldest images until the folder fits its budget (the newest always stays)."""
        if self.max_bytes is None:
            return
        while self._used > self.max_bytes and len(self._sizes) > 1:
            oldest = next(iter(self._sizes))
            log.info("image folder over its %d-byte budget: removing %s", self.max_bytes, oldest)
            self._remove(oldest, locked=True)

    def _remove(self, name: str, locked: bool = False) -> None:
        if not locked:
            with self._lock:
                self._remove(name, locked=True)
            return
        self._used -= self._sizes.pop(name, 0)
        (self.directory / name).unlink(missing_ok=True)


def file_name(name: str) -> str | None:
    """The file name an image name stands for, or None when it is not one of ours."""
    match = IMAGE_NAME.fullmatch(name)
    if match is None:
        return None
    return f"{match['id']}.{match['ext'] or 'png'}"


def image_url(base: str, name: str) -> str:
    """The link of a stored image (``<id>.<ext>``; a bare id from before formats is a PNG): in
    answers, job pages, re-rolls and webhooks alike."""
    return f"{base}/images/{file_name(name)}"


def content_type(name: str) -> str:
    """The Content-Type of a stored image, by its extension."""
    return CONTENT_TYPES[name.rsplit(".", 1)[-1]]
