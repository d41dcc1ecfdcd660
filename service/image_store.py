"""PNG files of ``return_format: "url"`` requests, under unguessable ids, kept for a retention time.

Ids are 128 random bits in hex, and a lookup accepts nothing but that shape, so a path can never
leave the folder. Writes go to a temporary name and are renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

IMAGE_ID = re.compile(r"[0-9a-f]{32}")


class ImageStore:
    def __init__(self, directory: Path, retention_seconds: float) -> None:
        self.directory = directory
        self.retention_seconds = retention_seconds
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, png: bytes) -> str:
        """Store one image and return its id (blocking I/O: call it from a thread)."""
        image_id = secrets.token_hex(16)
        final = self.directory / f"{image_id}.png"
        partial = final.with_suffix(".part")
        partial.write_bytes(png)
        os.replace(partial, final)
        return image_id

    def path_for(self, image_id: str) -> Path | None:
        if not IMAGE_ID.fullmatch(image_id):
            return None
        path = self.directory / f"{image_id}.png"
        return path if path.is_file() else None

    def evict_expired(self, now: float | None = None) -> int:
        """Delete images older than the retention time; returns how many went."""
        cutoff = (time.time() if now is None else now) - self.retention_seconds
        removed = 0
        for path in self.directory.glob("*.png"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
