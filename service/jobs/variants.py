"""Re-rolls: one image of a job made again with another seed, kept by that job.

A re-roll is a one-image job of its own (admitted, queued, stored and expired like any other), whose
row names its parent job and the image's index there (``job_db.VariantOf``). So it belongs to the
job: ``GET /jobs/{id}`` lists it under ``variants`` on any browser, and the job's archive carries
it beside the image it remakes, named so that the pair sorts together
(``0003_1237.webp``, ``0003_1237_reroll-1_98765.webp``). ``GET /jobs`` lists only the parents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.generate import GenerateRequestSchema
from service.jobs.job_db import JobDatabase, JobRecord, StoredImage
from service.jobs.image_store import image_url


@dataclass(frozen=True)
class Variant:
    """A re-roll of image ``index`` of its parent, its job, its ``number`` among that image's
    re-rolls (1, 2, ...), and its stored image once made."""

    index: int
    number: int
    record: JobRecord
    image: StoredImage | None

    @property
    def seed(self) -> int:
        return self.record.spec.seeds[0]


def variant_batch(parent: JobRecord, index: int, seed: int | None) -> dict[str, Any]:
    """The body of the one-image batch that remakes image ``index`` of ``parent``, with the
    parent's settings, validated as a ``POST /jobs`` body is (so admission reads it the same way)."""
    spec = parent.spec
    return GenerateRequestSchema().load(
        {
            "prompts": [spec.image_prompts()[index]],
            "negative_prompt": spec.negative_prompt,
            "guidance_scale": spec.guidance_scale,
            "size": spec.size,
            "format": spec.image_format,
            "quality": spec.quality,
            "return_format": "url",
            "seed": seed,
        }
    )


def variants_of(db: JobDatabase, parent_job_id: str) -> list[Variant]:
    """The job's re-rolls, oldest first, numbered per image (a database call: run it on its threads)."""
    numbers: dict[int, int] = {}
    found = []
    for index, record, image in db.variants(parent_job_id):
        numbers[index] = numbers.get(index, 0) + 1
        found.append(Variant(index, numbers[index], record, image))
    return found


def variant_lines(variants: list[Variant], links: str) -> list[dict[str, Any]]:
    """``variants`` of ``GET /jobs/{id}`` (``schemas.variants.VariantSchema``)."""
    return [
        {
            "index": variant.index,
            "job_id": variant.record.job_id,
            "state": variant.record.state,
            "seed": variant.seed,
            "url": None if variant.image is None else image_url(links, variant.image.name),
            "detail": variant.record.detail,
        }
        for variant in variants
    ]


def variant_file(original_file: str, variant: Variant, stored_name: str) -> str:
    """``0003_1237_reroll-1_98765.webp`` beside ``0003_1237.webp``: the pair sorts together."""
    stem = original_file.rsplit(".", 1)[0]
    return f"{stem}_reroll-{variant.number}_{variant.seed}.{stored_name.rsplit('.', 1)[-1]}"
