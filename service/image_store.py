"""PNG files of ``return_format: "url"`` requests, under unguessable ids, within a time and disk budget.

Ids are 128 random bits in hex, and a lookup accepts nothing but that shape, so a path can never
leave the folder. Writes go to a temporary name and are renamed, so a reader never sees half a file.
Images older than the retention time go, and when the folder passes its byte budget the oldest go
first: a public server must not let anyone fill its disk.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_ID = re.compile(r"[0-9a-f]{32}")


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

    @property
    def used_bytes(self) -> int:
        return self._used

    def save(self, png: bytes) -> str:
        """Store one image and return its id (blocking I/O: call it from a thread)."""
        image_id = secrets.token_hex(16)
        final = self.directory / f"{image_id}.png"
        partial = final.with_suffix(".part")
        partial.write_bytes(png)
        os.replace(partial, final)
        with self._lock:
            self._sizes[image_id] = len(png)
            self._used += len(png)
            self._enforce_budget()
        return image_id

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

    def evict_expired(self, now: float | None = None) -> int:
        """Delete images older than the retention time; returns how many went."""
        cutoff = (time.time() if now is None else now) - self.retention_seconds
        removed = 0
        for path in self.directory.glob("*.png"):
            try:
                if path.stat().st_mtime < cutoff:
                    self._remove(path.stem)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

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
