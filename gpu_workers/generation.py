"""Running one shard through a loaded pipeline (the device's part; encoding its images is the
host's part, ``gpu_workers.encoding``, which the worker loop runs beside the next shard)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from contract.formats import quality_for
from gpu_workers.encoding import encode
from gpu_workers.messages import ShardTask
from gpu_workers.receipts import WorkerFacts, receipt, receipt_text

log = logging.getLogger(__name__)


def generators_for(seeds: tuple[int, ...]) -> list[torch.Generator]:
    """One CPU generator per image: the starting noise then depends only on the image's seed,
    the same on any device and in any batch position."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def encode_image(image: Any, task: ShardTask, offset: int, facts: WorkerFacts) -> tuple[bytes, str]:
    """Image ``offset`` of ``task`` in the task's format with its receipt inside: ``(bytes, receipt
    JSON)``. Thread-safe: the worker loop runs it on its encode threads."""
    quality = quality_for(task.image_format, task.quality)
    fields = receipt(task, offset, facts, quality)
    return encode(image, task.image_format, quality, fields), receipt_text(fields)


def truncation_warnings(pipe: Any, prompts: tuple[str, ...]) -> tuple[str, ...]:
    """Name the prompts the CLIP text encoders will cut at their token limit."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return ()
    limit = tokenizer.model_max_length
    warnings = []
    for prompt in dict.fromkeys(prompts):
        length = len(tokenizer(prompt, truncation=False).input_ids)
        if length > limit:
            preview = prompt[:40] + ("..." if len(prompt) > 40 else "")
            warnings.append(
                f"Prompt '{preview}' is {length} tokens long; the text encoders read only the "
                f"first {limit}, the rest was ignored."
            )
    return tuple(warnings)


def generate_images(pipe: Any, task: ShardTask) -> list[Any]:
    """Generate the shard's images as one batch: PIL images, in order.

    The negative prompt only has an effect with classifier-free guidance (guidance_scale > 1);
    SDXL-Lightning runs at 0, where diffusers ignores it, so it is passed only when it counts.
    """
    kwargs: dict[str, Any] = {}
    if task.negative_prompt and task.guidance_scale > 1:
        kwargs["negative_prompt"] = [task.negative_prompt] * task.size
    with torch.inference_mode():
        output = pipe(
            prompt=list(task.prompts),
            num_inference_steps=task.steps,
            guidance_scale=task.guidance_scale,
            width=task.width,
            height=task.height,
            generator=generators_for(task.seeds),
            output_type="pil",
            **kwargs,
        )
    images = output.images
    if len(images) != task.size:
        raise RuntimeError(f"pipeline returned {len(images)} images for a shard of {task.size}")
    return list(images)


def generate_shard(pipe: Any, task: ShardTask, facts: WorkerFacts) -> list[bytes]:
    """The shard's images as encoded bytes, device and encoding in one call (the bare baseline of
    ``benchmarks/server_overhead.py`` and the tests' reference bytes)."""
    return [encode_image(image, task, offset, facts)[0] for offset, image in enumerate(generate_images(pipe, task))]


def _slice(task: ShardTask, start: int, stop: int) -> ShardTask:
    return dataclasses.replace(
        task, first_index=task.first_index + start, prompts=task.prompts[start:stop], seeds=task.seeds[start:stop]
    )


def device_memory_peak(device: str) -> int:
    """The worker's peak memory on its device so far: CUDA's peak allocated bytes, or on the CPU the
    process's peak resident set (what the metrics show per worker)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _free_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class BatchLimit:
    """The largest batch this worker's device has been seen to fit; learned from out-of-memory
    errors so later shards are cut before they fail rather than after."""

    def __init__(self) -> None:
        self.images: int | None = None

    def learn(self, images: int) -> None:
        if self.images is None or images < self.images:
            log.warning("out of memory: batches are limited to %d image(s) from now on", images)
            self.images = images


def generate_fitting(pipe: Any, task: ShardTask, limit: BatchLimit) -> list[Any]:
    """``generate_images``, but on CUDA out of memory free the cache, split the shard in halves and
    retry, down to one image; a single image that does not fit raises the OOM error.

    Splitting changes the batch composition, so the bytes may differ from an unsplit run by 1/255
    in a few pixels; the seeds, the count and the order stay exactly those of the request.
    """
    if limit.images is not None and task.size > limit.images:
        step = limit.images
        return [image for start in range(0, task.size, step) for image in generate_fitting(pipe, _slice(task, start, start + step), limit)]
    try:
        return generate_images(pipe, task)
    except torch.cuda.OutOfMemoryError:
        _free_cuda_cache()
        if task.size == 1:
            raise
        half = (task.size + 1) // 2
        limit.learn(half)
        return generate_fitting(pipe, _slice(task, 0, half), limit) + generate_fitting(pipe, _slice(task, half, task.size), limit)
