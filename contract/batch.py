"""The one description of an accepted batch: what the job database stores, what the engine cuts
into shards, and what a restart cuts into the very same shards again."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from contract.formats import DEFAULT_FORMAT

SEED_SPACE = 2**32
DEFAULT_STEPS = 8  # what the 8-step Lightning UNet was distilled for
IMAGE_WIDTH = 1024
IMAGE_HEIGHT = 576


@dataclass(frozen=True)
class BatchSpec:
    """What was asked, as accepted: the seed is already drawn and the shard size fixed, so the batch
    can be cut into the same shards after a restart (same shards, same bytes)."""

    prompts: tuple[str, ...]
    num_images_per_prompt: int
    seed: int
    negative_prompt: str | None
    guidance_scale: float
    return_format: str
    shard_size: int
    steps: int = DEFAULT_STEPS
    width: int = IMAGE_WIDTH
    height: int = IMAGE_HEIGHT
    image_format: str = DEFAULT_FORMAT
    quality: int | None = None  # None: the format's default (``contract.formats``)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def total_images(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    @property
    def as_url(self) -> bool:
        return self.return_format == "url"

    @property
    def seeds(self) -> tuple[int, ...]:
        """Image i uses ``seed + i``, wrapped into the 32-bit seed space."""
        return tuple((self.seed + i) % SEED_SPACE for i in range(self.total_images))

    def image_prompts(self) -> tuple[str, ...]:
        """The prompt of every image, prompt-major: all images of prompt 0, then prompt 1, ..."""
        return tuple(p for p in self.prompts for _ in range(self.num_images_per_prompt))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BatchSpec:
        """Rows written before a field existed take its default (``steps``, the size, the format)."""
        data = json.loads(text)
        data["prompts"] = tuple(data["prompts"])
        return cls(**data)
