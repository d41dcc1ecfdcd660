"""``Accept: application/x-ndjson``: progress as it happens, one JSON object per line.

Lines: ``job`` first (id, total, seeds); one ``image`` line per image as soon as its shard is
stored (index, seed, and base64 or url); a ``progress`` line every heartbeat interval (images
done of total; tunnels cut silent connections, and a queue wait can be long); a ``summary`` last. Images come in the
order they finish, which with several workers is not request order: ``index`` says where each
belongs. The status is 200 from the start; a failure is told in the summary line. A stream of a
job that already has images (an idempotent retry) starts with a line for each of them.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from service.edge.connections import BodyWriter
from service.http.asked import NDJSON_CONTENT_TYPE
from service.http.job_listening import follow
from service.http.job_result import JobResult, image_value
from service.http.streaming import Reply
from service.jobs.manager import JobEvent, JobManager, LiveJob, ShardStored


async def write_line(writer: BodyWriter, line: dict[str, Any]) -> None:
    await writer.write(json.dumps(line).encode() + b"\n")


async def stream_progress(
    reply: Reply,
    jobs: JobManager,
    job: LiveJob,
    listener: asyncio.Queue[JobEvent],
    headers: dict[str, str],
    links: str,
    interval: float,
) -> BodyWriter:
    """The job's lines, written as it runs; ``links``: the base of image links, ``interval``: the
    heartbeat interval between progress lines."""
    spec = job.spec
    store = jobs.store
    seeds = spec.seeds
    image_field = "url" if spec.as_url else "base64"
    writer = await reply.start(headers, NDJSON_CONTENT_TYPE)
    await write_line(
        writer,
        {"type": "job", "job_id": job.job_id, "images_total": spec.total_images, "return_format": spec.return_format, "seeds": list(seeds)},
    )

    sent: set[int] = set()

    async def image_line(index: int, data: bytes | Path, name: str) -> None:
        if index in sent:
            return
        sent.add(index)
        value = await store.run(image_value, spec, data, name, links)
        await write_line(writer, {"type": "image", "index": index, "seed": seeds[index], image_field: value.decode()})

    for image in await jobs.stored_images(job.job_id):  # after listening: none is missed
        path = store.path_for(image.name)
        if path is not None:
            await image_line(image.index, path, image.name)

    async def on_shard(stored: ShardStored) -> None:
        for offset, (data, name) in enumerate(zip(stored.images, stored.image_ids, strict=True)):
            await image_line(stored.first_index + offset, data, name)

    async def progress() -> None:
        await write_line(writer, {"type": "progress", "images_done": job.images_done, "images_total": spec.total_images})

    ended = await follow(reply.client_gone, listener, on_shard, progress, interval)
    await write_line(writer, JobResult.from_live(job, ended).summary_line())
    await writer.finish()
    return writer
