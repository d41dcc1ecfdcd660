"""Whether a valid body becomes a job: the limits that are settings of the running server, then
whether the server can take the work now (503 with Retry-After before any work, never after)."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from contract.batch import SEED_SPACE, BatchSpec
from contract.formats import parse_size
from gpu_workers.backend import ShardBackend
from service.jobs.image_store import ImageStore
from service.jobs.manager import JobManager
from service.jobs.refusal import Refusal
from service.lifecycle import Lifecycle
from service.settings import Settings

NO_WORKER_RETRY_AFTER = "10"
DRAINING_RETRY_AFTER = "30"


@dataclass
class Admission:
    """What admission reads of the running server, made once with the app."""

    settings: Settings
    pool: ShardBackend
    store: ImageStore
    lifecycle: Lifecycle
    jobs: JobManager
    # How many API keys the server has: with two or more, each gets a share of the queue.
    key_count: int
    # Told every admitted batch (owner, images): the metrics count them per key.
    on_accepted: Callable[[str, int], None] = lambda owner, images: None

    def admit(self, owner: str, data: dict[str, Any]) -> BatchSpec | Refusal:
        """The job to run for a validated body, or why it is refused."""
        settings = self.settings
        total = len(data["prompts"]) * data["num_images_per_prompt"]
        problem = _limit_problem(data, total, settings)
        if problem:
            return Refusal(400, problem)
        refusal = self._refusal(owner, total)
        if refusal is not None:
            return refusal
        seed = data["seed"]
        if seed is None or seed == -1:
            seed = secrets.randbelow(SEED_SPACE)
        self.jobs.reserve(total, owner)  # before any await: JobManager.create releases it
        self.on_accepted(owner, total)
        width, height = parse_size(data["size"])
        return BatchSpec(
            prompts=tuple(data["prompts"]),
            num_images_per_prompt=data["num_images_per_prompt"],
            seed=seed,
            negative_prompt=data["negative_prompt"],
            guidance_scale=data["guidance_scale"],
            return_format=data["return_format"],
            shard_size=settings.max_batch,
            width=width,
            height=height,
            image_format=data["image_format"],
            quality=data["quality"],
        )

    def _refusal(self, owner: str, images: int) -> Refusal | None:
        settings, pool, store, jobs = self.settings, self.pool, self.store, self.jobs
        if self.lifecycle.draining:
            return Refusal(503, "The server is shutting down and takes no new requests.", headers={"Retry-After": DRAINING_RETRY_AFTER})
        if pool.ready_workers == 0:
            errors = {w.error for w in pool.snapshot() if w.error}
            cause = f" Worker error: {'; '.join(sorted(errors))}" if errors else ""
            if pool.problem:
                cause = f" {pool.problem}.{cause}"
            return Refusal(
                503,
                "No worker is ready (the model is loading, or failed to load: see /health)." + cause,
                headers={"Retry-After": NO_WORKER_RETRY_AFTER},
            )
        if store.problem is not None:
            return Refusal(507, f"The server {store.problem} now; retry when /health shows storage without a problem.", headers={"Retry-After": NO_WORKER_RETRY_AFTER})
        pending = jobs.pending_images
        need = (pending + images) * store.bytes_per_image
        free = store.free_bytes()
        if need > free:
            return Refusal(
                507,
                f"The image disk cannot hold this batch: {free / 1e6:.1f} MB free, and {pending + images} image(s) of about "
                f"{store.bytes_per_image / 1e6:.2f} MB each ({need / 1e6:.1f} MB) are to be stored.",
            )
        share = settings.queued_images_per_key(self.key_count)
        if share:
            mine = jobs.pending_images_of(owner)
            if mine + images > share:
                wait = math.ceil(pool.estimated_wait(mine + images - share))
                return Refusal(
                    429,
                    f"This API key has {mine} image(s) queued and this request would take it past its share of {share}; "
                    f"other keys are still served. Retry in about {wait} s.",
                    headers={"Retry-After": str(max(1, wait))},
                )
        if pending + images > settings.max_queued_images:
            wait = math.ceil(pool.estimated_wait(pending + images - settings.max_queued_images))
            return Refusal(
                503,
                f"The server is busy: {pending} image(s) are queued and this request would take the total past "
                f"the limit of {settings.max_queued_images}. Retry in about {wait} s.",
                headers={"Retry-After": str(max(1, wait))},
            )
        return None


def _limit_problem(data: dict[str, Any], total: int, settings: Settings) -> str | None:
    if total > settings.max_images:
        return (
            f"Too many images: {len(data['prompts'])} prompt(s) x {data['num_images_per_prompt']} = {total}; "
            f"the limit is {settings.max_images} per request."
        )
    if data["size"] not in settings.allowed_sizes():
        return f"size {data['size']} is not served here; this server makes {', '.join(settings.allowed_sizes())}."
    for index, prompt in enumerate(data["prompts"]):
        if len(prompt) > settings.max_prompt_chars:
            return f"prompts[{index}] is {len(prompt)} characters long; the limit is {settings.max_prompt_chars}."
    negative = data.get("negative_prompt") or ""
    if len(negative) > settings.max_prompt_chars:
        return f"negative_prompt is {len(negative)} characters long; the limit is {settings.max_prompt_chars}."
    return None
