"""``Accept: application/x-ndjson``: progress as it happens, one JSON object per line.

Lines: ``job`` first (id, total, seeds); one ``image`` line per image as soon as its shard is
stored (index, seed, and base64 or url); a ``progress`` line every heartbeat interval (images
done of total; tunnels cut silent connections, and a queue wait can be long); a ``summary`` last. Images come in the
order they finish, which with several workers is not request order: ``index`` says where each
belongs. The status is 200 from the start; a failure is told in the summary line.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from service.job_listening import base_url, follow
from service.job_result import JobResult, image_value
from service.jobs import JobEvent, LiveJob, ShardStored
from service.connections import BodyWriter
from service.keys import SETTINGS, STORE
from service.streaming import start_stream

NDJSON_CONTENT_TYPE = "application/x-ndjson"


def wants_ndjson(request: web.Request) -> bool:
    accepted = (part.split(";")[0].strip().lower() for part in request.headers.get("Accept", "").split(","))
    return NDJSON_CONTENT_TYPE in accepted


async def write_line(writer: BodyWriter, line: dict[str, Any]) -> None:
    await writer.write(json.dumps(line).encode() + b"\n")


async def stream_progress(
    request: web.Request, job: LiveJob, listener: asyncio.Queue[JobEvent], headers: dict[str, str]
) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    spec = job.spec
    links = base_url(request)
    seeds = spec.seeds
    image_field = "url" if spec.as_url else "base64"
    writer = await start_stream(request, headers, NDJSON_CONTENT_TYPE)
    await write_line(
        writer,
        {"type": "job", "job_id": job.job_id, "images_total": spec.total_images, "return_format": spec.return_format, "seeds": list(seeds)},
    )

    async def on_shard(stored: ShardStored) -> None:
        for offset, (png, image_id) in enumerate(zip(stored.pngs, stored.image_ids, strict=True)):
            index = stored.first_index + offset
            value = await asyncio.to_thread(image_value, spec, png, image_id, links)
            await write_line(writer, {"type": "image", "index": index, "seed": seeds[index], image_field: value.decode()})

    async def progress() -> None:
        await write_line(writer, {"type": "progress", "images_done": job.images_done, "images_total": spec.total_images})

    ended = await follow(request, listener, on_shard, progress, settings.heartbeat_interval)
    await write_line(writer, JobResult.from_live(job, ended, {}, request.app[STORE]).summary_line())
    await writer.finish()
    return writer.response
