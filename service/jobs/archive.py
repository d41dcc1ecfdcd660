"""``GET /jobs/{id}/archive``: a job's images as one zip, for a client on a tunnel that drops.

The images go in as they are stored (no re-encoding; stored, not deflated: they are compressed
already) and the zip is streamed from the files while it is written, never built in memory
(zipstream-ng). Its size is known before the first byte (stored entries), so it is sent with a
Content-Length: a client can tell a cut-off archive from a whole one. ``manifest.json`` comes first
and says what follows (index, file, prompt, seed, sha256, bytes, receipt). ``?since=N`` leaves out
images before index N, so a client that lost its connection fetches only the rest; a running job's
archive holds the images finished so far.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zipstream import ZIP_STORED, ZipStream

from contract.batch import BatchSpec
from service.jobs.job_db import JobRecord, StoredImage
from service.jobs.variants import Variant

MANIFEST_NAME = "manifest.json"
# Bytes handed from the reading thread to the event loop at a time.
BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class ArchiveEntry:
    image: StoredImage
    path: Path
    file: str
    # A re-roll of the job's image ``variant.index`` (``service.jobs.variants``); None for the job's own.
    variant: Variant | None = None


def entry_name(spec: BatchSpec, index: int, name: str) -> str:
    """``0003_1237.webp``: index (sorts in request order), seed, the stored file's extension."""
    width = max(4, len(str(spec.total_images - 1)))
    return f"{index:0{width}d}_{spec.seeds[index]}.{name.rsplit('.', 1)[-1]}"


def manifest(record: JobRecord, since: int, entries: list[ArchiveEntry]) -> dict[str, Any]:
    prompts = record.spec.image_prompts()
    return {
        "job_id": record.job_id,
        "state": record.state,
        "images_total": record.images_total,
        "images_done": record.images_done,
        "since": since,
        "size": record.spec.size,
        "format": record.spec.image_format,
        "images": [
            {
                "index": entry.image.index,
                "file": entry.file,
                "prompt": prompts[entry.image.index],
                "seed": record.spec.seeds[entry.image.index],
                **_stored(entry.image),
            }
            for entry in entries
            if entry.variant is None
        ],
        "variants": [
            {
                "index": entry.variant.index,
                "variant": entry.variant.number,
                "job_id": entry.variant.record.job_id,
                "file": entry.file,
                "prompt": prompts[entry.variant.index],
                "seed": entry.variant.seed,
                **_stored(entry.image),
            }
            for entry in entries
            if entry.variant is not None
        ],
    }


def _stored(image: StoredImage) -> dict[str, Any]:
    return {"sha256": image.sha256, "bytes": image.bytes, "receipt": None if image.receipt is None else json.loads(image.receipt)}


def build_zip(record: JobRecord, since: int, entries: list[ArchiveEntry]) -> ZipStream:
    """The archive, not yet read: files are opened as the stream reaches them."""
    archive = ZipStream(compress_type=ZIP_STORED, sized=True)
    archive.add(json.dumps(manifest(record, since, entries), indent=1).encode(), MANIFEST_NAME)
    for entry in entries:
        archive.add_path(str(entry.path), entry.file)
    return archive


def _next_block(chunks: Iterator[bytes]) -> bytes:
    """Up to ``BLOCK_BYTES`` of the stream (blocking file reads: runs in a thread)."""
    parts, size = [], 0
    for chunk in chunks:
        parts.append(chunk)
        size += len(chunk)
        if size >= BLOCK_BYTES:
            break
    return b"".join(parts)


async def blocks(archive: ZipStream, run: Callable[..., Awaitable[bytes]] = asyncio.to_thread) -> Any:
    """The archive's bytes, read a block at a time in a thread (``run``: the image store's own)."""
    chunks = iter(archive)
    while block := await run(_next_block, chunks):
        yield block
