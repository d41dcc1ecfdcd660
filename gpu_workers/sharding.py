"""How a batch becomes shards: contiguous slices that depend only on the batch and its shard size.

Batch composition changes the pixels (DESIGN.md section 6: batch 2 and batch 1 differ by 1/255
in a few pixels on CPU), so shard boundaries must never depend on how many workers are up or
how busy they are; that is what makes the same seed give the same bytes on 1 or N workers.
"""

from __future__ import annotations

from contract.batch import BatchSpec
from gpu_workers.messages import ShardTask


def split_into_shards(request_id: str, spec: BatchSpec) -> list[ShardTask]:
    """Cut the batch's images into consecutive shards of at most ``spec.shard_size`` images."""
    size = spec.shard_size
    if size < 1:
        raise ValueError(f"the shard size must be at least 1, got {size}")
    prompts = spec.image_prompts()
    seeds = spec.seeds
    return [
        ShardTask(
            request_id=request_id,
            shard_id=shard_id,
            first_index=start,
            prompts=prompts[start : start + size],
            seeds=seeds[start : start + size],
            negative_prompt=spec.negative_prompt,
            guidance_scale=spec.guidance_scale,
            steps=spec.steps,
            width=spec.width,
            height=spec.height,
            image_format=spec.image_format,
            quality=spec.quality,
        )
        for shard_id, start in enumerate(range(0, len(seeds), size))
    ]
