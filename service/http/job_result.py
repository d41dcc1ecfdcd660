"""One job's result, whichever way it is asked for.

A result is built once, from the events a handler followed (``from_live``) or from the job
database and the image store (``from_record``), and rendered three ways: the ``/generate`` JSON
body (before or after heartbeats), the summary line of an NDJSON stream, and ``GET /jobs/{id}``.
So the three answers cannot drift apart: the same images in the same order, the same fields, the
same failure body.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from contract.batch import BatchSpec
from contract.states import JobState
from service.jobs.admission import DRAINING_RETRY_AFTER
from service.edge.connections import BodyWriter
from service.edge.errors import json_error
from service.jobs.image_store import ImageStore, image_url
from service.jobs.job_db import StoredImage
from service.jobs.manager import JobEnded, LiveJob


def evicted_detail(job_id: str, missing: int) -> str:
    return f"Job {job_id} is done, but {missing} of its images were removed to keep the image folder within its disk budget."


def image_value(spec: BatchSpec, image: bytes | Path, image_id: str, base: str) -> bytes:
    """One image as the answer carries it: its URL, or its bytes in base64 (both as ASCII bytes)."""
    if spec.as_url:
        return image_url(base, image_id).encode()
    return base64.b64encode(image.read_bytes() if isinstance(image, Path) else image)


@dataclass(frozen=True)
class JobResult:
    job_id: str
    spec: BatchSpec
    state: JobState
    images_done: int
    warnings: tuple[str, ...] = ()
    detail: str | None = None
    # For a failure told before the status line went out (503: retrying later can help).
    status: int = 500
    # A done job's images in request order: bytes (just made) or stored files, and their names.
    images: tuple[bytes | Path, ...] = ()
    image_ids: tuple[str, ...] = ()
    # The store the files are read back from, on its own threads (None: images in memory).
    store: ImageStore | None = None

    @classmethod
    def from_live(
        cls, job: LiveJob, ended: JobEnded, stored: Sequence[StoredImage] | None = None, store: ImageStore | None = None
    ) -> JobResult:
        """From a job a handler followed to its end: ``stored`` are its images as the database names
        them; they are read back from the store's files when the body is written. Without them, a
        result to summarise (the NDJSON summary line), with no images to write."""
        result = cls(
            job_id=job.job_id,
            spec=job.spec,
            state=JobState(ended.state),
            images_done=job.images_done,
            warnings=tuple(job.warnings),
            detail=ended.detail,
            status=ended.status,
        )
        if not result.done or stored is None or store is None:
            return result
        return result.with_files(stored, store)

    def with_files(self, stored: Sequence[StoredImage], store: ImageStore) -> JobResult:
        """A done result whose images (``stored``: the database's rows) are read from their files as
        the body is written; a failure with 410 when the disk budget removed some of them."""
        names = {image.index: image.name for image in stored}
        image_ids = tuple(names.get(index, "") for index in range(self.spec.total_images))
        paths = [store.path_for(image_id) for image_id in image_ids]
        missing = sum(path is None for path in paths)
        if missing:
            return replace(self, state=JobState.FAILED, status=410, detail=evicted_detail(self.job_id, missing))
        return replace(self, images=tuple(path for path in paths if path is not None), image_ids=image_ids, store=store)

    @property
    def done(self) -> bool:
        return self.state == JobState.DONE

    def success_fields(self) -> dict[str, Any]:
        """Everything of a success body but the images."""
        total = self.spec.total_images
        return {
            "count": total,
            "message": f"Successfully generated {total} image(s)",
            "seeds": list(self.spec.seeds),
            "warnings": list(self.warnings),
            "job_id": self.job_id,
        }

    def failure_detail(self) -> str:
        return self.detail or f"The job ended {self.state}."

    def early_failure(self, headers: Mapping[str, str]) -> web.Response:
        """The failure with its true status, while the status line is still ours to pick."""
        status = 409 if self.state == JobState.CANCELLED else self.status
        extra = {"Retry-After": DRAINING_RETRY_AFTER} if status == 503 else {}
        return json_error(status, self.failure_detail(), headers={**headers, **extra}, job_id=self.job_id)

    async def write_body(self, writer: BodyWriter, base: str, extra: Mapping[str, Any] | None = None) -> None:
        """The JSON body of /generate (and of a done job's GET /jobs/{id}, with its state as ``extra``).

        A done job's body is written image by image: 150 base64 PNGs are some 200 MB, which as one
        string would sit in memory two or three times over. Base64 runs in a thread, so the event
        loop keeps serving. A failure after the status line went out is ``success: false``.
        """
        if not self.done:
            body = {"success": False, "detail": self.failure_detail(), "images": [], "count": 0, "job_id": self.job_id}
            await writer.write(json.dumps(body).encode())
            await writer.finish()
            return
        await writer.write(b'{"success": true, "images": [')
        for index, (image, image_id) in enumerate(zip(self.images, self.image_ids, strict=True)):
            if self.spec.as_url:
                value = image_value(self.spec, image, image_id, base)
            else:
                run = self.store.run if self.store is not None else asyncio.to_thread
                value = await run(image_value, self.spec, image, image_id, base)
            await writer.write((b'"' if index == 0 else b', "') + value + b'"')
        rest = json.dumps({**self.success_fields(), **(extra or {})})
        await writer.write(b"], " + rest[1:].encode())
        await writer.finish()

    def summary_line(self) -> dict[str, Any]:
        """The last line of an NDJSON stream."""
        summary: dict[str, Any] = {"type": "summary", "success": self.done, "state": self.state.value}
        if self.done:
            summary.update(self.success_fields())
        else:
            summary.update(job_id=self.job_id, detail=self.detail, images_done=self.images_done, images_total=self.spec.total_images)
        return summary
