"""How a request becomes shards: contiguous slices that depend only on the request and max_batch.

Batch composition changes the pixels (DESIGN.md section 6: batch 2 and batch 1 differ by 1/255
in a few pixels on CPU), so shard boundaries must never depend on how many workers are up or
how busy they are; that is what makes the same seed give the same bytes on 1 or N workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpu_workers.messages import DEFAULT_STEPS, ShardTask

SEED_SPACE = 2**32


@dataclass(frozen=True)
class GenerationRequest:
    """One accepted batch, after validation, as the pool sees it."""

    request_id: str
    prompts: tuple[str, ...]
    num_images_per_prompt: int
    base_seed: int
    negative_prompt: str | None
    guidance_scale: float
    steps: int = DEFAULT_STEPS

    @property
    def total_images(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    @property
    def seeds(self) -> tuple[int, ...]:
        """Image i uses ``base_seed + i``, wrapped into the 32-bit seed space."""
        return tuple((self.base_seed + i) % SEED_SPACE for i in range(self.total_images))

    def image_prompts(self) -> tuple[str, ...]:
        """The prompt of every image, prompt-major: all images of prompt 0, then prompt 1, ..."""
        return tuple(p for p in self.prompts for _ in range(self.num_images_per_prompt))


def split_into_shards(request: GenerationRequest, max_batch: int) -> list[ShardTask]:
    """Cut the request's images into consecutive shards of at most ``max_batch`` images."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    prompts = request.image_prompts()
    seeds = request.seeds
    return [
        ShardTask(
            request_id=request.request_id,
            shard_id=shard_id,
            first_index=start,
            prompts=prompts[start : start + max_batch],
            seeds=seeds[start : start + max_batch],
            negative_prompt=request.negative_prompt,
            guidance_scale=request.guidance_scale,
            steps=request.steps,
        )
        for shard_id, start in enumerate(range(0, len(seeds), max_batch))
    ]
