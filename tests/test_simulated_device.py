"""The simulated device (``benchmarks.simulated_device``) without a server.

The overlap benchmark's figures are only as good as its stand-in: pictures the PNG encoder treats
like real ones (not flat, not noise), the same picture for the same seed, and a trace line per
device call. These checks run in about two seconds.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.simulated_device import MS_PER_IMAGE_ENV, TRACE_ENV, SimulatedPipeline, factory

WIDTH, HEIGHT = 1024, 576
MS_PER_IMAGE = 5  # keeps the sleeps short; the device time itself is checked from the trace


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trace") / "device.trace"


@pytest.fixture(scope="module")
def pipe(trace_path: Path) -> SimulatedPipeline:
    """One factory call for the module: painting the picture bank is the slow part (~0.7 s)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MS_PER_IMAGE_ENV, str(MS_PER_IMAGE))
        patch.setenv(TRACE_ENV, str(trace_path))
        return factory("cpu", Path("unused"))


def generate(pipe: SimulatedPipeline, seeds: list[int], steps: int = 8) -> list[Image.Image]:
    """Call the pipeline the way the worker does: one CPU generator per image."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    output = pipe(
        prompt=["a lighthouse"] * len(seeds), generator=generators, num_inference_steps=steps,
        guidance_scale=0.0, width=WIDTH, height=HEIGHT, output_type="pil",
    )  # fmt: skip
    return output.images


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_count_size_and_mode(pipe: SimulatedPipeline) -> None:
    images = generate(pipe, [1, 2, 3])
    assert len(images) == 3
    assert all(image.size == (WIDTH, HEIGHT) and image.mode == "RGB" for image in images)


def test_same_seed_same_pixels_and_different_seeds_differ(pipe: SimulatedPipeline) -> None:
    first, again, other = generate(pipe, [42, 42, 43])
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    assert np.array_equal(pixels(generate(pipe, [42])[0]), pixels(first)), "a seed's picture must not depend on its batch"


def test_trace_has_one_line_per_call_with_its_images(pipe: SimulatedPipeline, trace_path: Path) -> None:
    trace_path.write_bytes(b"")
    generate(pipe, [1, 2])
    generate(pipe, [3], steps=1)  # the warm-up shape: 1 image, 1 step, an eighth of the time
    lines = [line.split() for line in trace_path.read_text().splitlines()]
    assert [int(images) for _, _, _, images in lines] == [2, 1]
    assert {int(pid) for pid, *_ in lines} == {os.getpid()}
    seconds = [float(end) - float(start) for _, start, end, _ in lines]
    assert seconds[0] >= 2 * MS_PER_IMAGE / 1000
    assert seconds[1] >= MS_PER_IMAGE / 1000 / 8


def test_a_picture_is_neither_flat_nor_noise(pipe: SimulatedPipeline) -> None:
    """A flat image would make PNG encoding nearly free and noise would make it dearer than a
    real picture (DESIGN.md section 6): both would skew the measurement."""
    image = generate(pipe, [7])[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    assert buffer.tell() >= 300_000
    horizontal_step = np.abs(np.diff(pixels(image), axis=1)).mean()
    assert horizontal_step < 12, f"neighbouring pixels differ by {horizontal_step:.1f} levels on average: noise"
