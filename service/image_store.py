"""Every job's PNG files, under unguessable ids, within a disk budget.

Ids are 128 random bits in hex, and a lookup accepts nothing but that shape, so a path can never
leave the folder. Writes go to a temporary name and are renamed, so a reader never sees half a file.
When the folder passes its byte budget the oldest go first: a public server must not let anyone
fill its disk. How long images live is the jobs' business (``JobManager.expire``: a job's
retention counts from when it finished), never a file's age: a server that was down longer than
the retention must not lose the images of a job still unfinished.

A disk fault (full, read-only, the folder gone) is the caller's to wait out (``JobManager``): it
reports it here (``problem``, for /health and admission) in words without a server path.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_ID = re.compile(r"[0-9a-f]{32}")
# What an image is assumed to weigh before any was stored: a 1024x576 PNG at level 1 is 0.8-1.4 MB.
FIRST_BYTES_PER_IMAGE = 1_500_000


class ImageStore:
    def __init__(self, directory: Path, retention_seconds: float, max_bytes: int | None = None) -> None:
        self.directory = directory
        self.retention_seconds = retention_seconds
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # saves run in worker threads
        self._sizes: OrderedDict[str, int] = OrderedDict()  # oldest first
        for path in sorted(directory.glob("*.png"), key=lambda p: p.stat().st_mtime):
            if IMAGE_ID.fullmatch(path.stem):
                self._sizes[path.stem] = path.stat().st_size
        self._used = sum(self._sizes.values())
        self.bytes_per_image = float(FIRST_BYTES_PER_IMAGE)
        self._sizes_seen = 0
        self.problem: str | None = None

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

    def save(self, png: bytes) -> str:
        """Store one image and return its id (blocking I/O: call it from a thread). A folder that
        was removed is made again; any other fault raises ``OSError`` and leaves no partial file."""
        image_id = secrets.token_hex(16)
        final = self.directory / f"{image_id}.png"
        partial = final.with_suffix(".part")
        try:
            try:
                partial.write_bytes(png)
            except FileNotFoundError:
                self.directory.mkdir(parents=True, exist_ok=True)
                partial.write_bytes(png)
            os.replace(partial, final)
        except OSError:
            if partial.parent.is_dir():
                partial.unlink(missing_ok=True)
            raise
        with self._lock:
            self._sizes[image_id] = len(png)
            self._used += len(png)
            self._learn_size(len(png))
            self._enforce_budget()
        return image_id

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
        removed = 0
        for path in list(self.directory.glob("*.part")) + list(self.directory.glob("*.png")):
            if path.suffix == ".png" and path.stem in known:
                continue
            if path.suffix == ".png":
                self._remove(path.stem)
            else:
                path.unlink(missing_ok=True)
            removed += 1
        return removed

    def path_for(self, image_id: str) -> Path | None:
        if not IMAGE_ID.fullmatch(image_id):
            return None
        path = self.directory / f"{image_id}.png"
        return path if path.is_file() else None

    def remove_all(self, image_ids: list[str]) -> None:
        """Delete these images (an expired job's); ids that are already gone are skipped."""
        for image_id in image_ids:
            if IMAGE_ID.fullmatch(image_id):
                self._remove(image_id)

    def _enforce_budget(self) -> None:
        """Drop the oldest images until the folder fits its budget (the newest always stays)."""
        if self.max_bytes is None:
            return
        while self._used > self.max_bytes and len(self._sizes) > 1:
            oldest = next(iter(self._sizes))
            log.info("image folder over its %d-byte budget: removing %s", self.max_bytes, oldest)
            self._remove(oldest, locked=True)

    def _remove(self, image_id: str, locked: bool = False) -> None:
        if not locked:
            with self._lock:
                self._remove(image_id, locked=True)
            return
        self._used -= self._sizes.pop(image_id, 0)
        (self.directory / f"{image_id}.png").unlink(missing_ok=True)
