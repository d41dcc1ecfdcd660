"""A simulated GPU: a pipeline that spends "device time" as a GIL-free sleep and returns pictures.

Whether the worker keeps a GPU busy is a property of the host side (taking shards, encoding PNGs,
sending results), not of the model, so it can be measured on a CPU-only box if something stands
in for the device. This module is that stand-in, loaded through the server's extension point::

    SDXL_SIM_MS_PER_IMAGE=100 SDXL_SIM_TRACE=/tmp/trace PYTHONPATH=. \\
        python -m service --model benchmarks.simulated_device:factory

- **Device time**: a call sleeps ``ms_per_image * images * steps / 8`` (``SDXL_SIM_MS_PER_IMAGE``,
  default 100 ms: "GPU speed" in DESIGN.md section 3; an H100's floor is 44 ms). ``time.sleep``
  releases the GIL and takes no CPU, like a thread waiting on a CUDA stream, so the host work
  around it (encoding, sending) competes for the cores exactly as it would on a GPU box.
- **Pictures**: the PNG encoder's cost depends on the content (DESIGN.md section 6: natural
  1024x576 pictures cost 36-73 ms at level 1, noise more), so the images must look like pictures:
  smooth shapes (sky and ground gradients, a wavy horizon, soft ellipses) plus mild per-pixel grain.
  Making them is "the GPU's" work, so it must cost the host little: a bank of 8 base pictures is
  painted once with numpy, and each image is one uint8 addition of a shifted (and maybe mirrored)
  window of a base and a window of a precomputed grain tile. The choice comes from a
  seed drawn from the image's own ``torch.Generator``, so the same seed gives the same picture.
  Measured 2026-12-01 on this 2-core Xeon, one core, Pillow 13 (``python -m benchmarks.simulated_device``,
  32 seeds): PNG at compress_level=1 of one picture costs 50-55 ms (median 50) and is 1.13 MB, the
  middle of the real pictures' 36-73 ms and 0.8-1.2 MB; making it costs ~3-4 ms, painting the bank
  at start 0.7 s. (``GRAIN_LEVELS`` sets the cost: 8 gives 45 ms and 1.0 MB, 16 gives 56 ms and 1.2 MB.)
- **Trace**: when ``SDXL_SIM_TRACE`` names a file, every call appends ``"{pid} {start} {end}
  {images}\\n"``, the device interval in ``time.monotonic()`` seconds. CLOCK_MONOTONIC is
  system-wide on Linux, so the intervals of several worker processes and the client's clock compare
  directly. Each line is one ``os.write`` on an ``O_APPEND`` descriptor, so concurrent workers never
  interleave within a line. The interval is the sleep only: the picture making after it is host
  work, as the postprocessing after a real pipeline's last kernel is.
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from contract.batch import DEFAULT_STEPS, IMAGE_HEIGHT, IMAGE_WIDTH

MS_PER_IMAGE_ENV = "SDXL_SIM_MS_PER_IMAGE"
TRACE_ENV = "SDXL_SIM_TRACE"
DEFAULT_MS_PER_IMAGE = 100.0
BASE_PICTURES = 8
MARGIN = 32  # pixels of slack on every side of a base picture: the room for the per-image shift
GRAIN_LEVELS = 12  # grain is uniform in 0..GRAIN_LEVELS per channel: 1.1 MB, ~50 ms at PNG level 1
BANK_SEED = 20261201  # the bank is the same in every worker, so a seed's picture is too
SEED_BOUND = 2**62
# (top, horizon) colours of the sky: day, haze, dusk, night; the ground is drawn from earthy ranges.
SKIES = (
    ((40, 90, 190), (170, 200, 235)),
    ((120, 150, 180), (215, 215, 205)),
    ((60, 40, 110), (245, 150, 80)),
    ((10, 15, 40), (60, 70, 110)),
)


@dataclass(frozen=True)
class SimulatedOutput:
    """What diffusers' pipelines return, as far as the worker reads it."""

    images: list[Image.Image]


@dataclass(frozen=True)
class PictureBank:
    """Base pictures (with margins) and a grain tile for one image size, painted once.

    The bases are scaled into 0..255-GRAIN_LEVELS so that base + grain never overflows uint8:
    one plain ``np.add`` per image, no clipping pass.
    """

    bases: tuple[np.ndarray, ...]
    grain: np.ndarray
    width: int
    height: int

    @classmethod
    def paint(cls, width: int, height: int, count: int = BASE_PICTURES) -> PictureBank:
        rng = np.random.default_rng(BANK_SEED)
        shape = (height + 2 * MARGIN, width + 2 * MARGIN)
        scale = (255 - GRAIN_LEVELS) / 255
        bases = tuple((_landscape(rng, *shape) * scale).astype(np.uint8) for _ in range(count))
        grain = rng.integers(0, GRAIN_LEVELS + 1, (*shape, 3), dtype=np.uint8)
        return cls(bases, grain, width, height)

    def picture(self, seed: int) -> Image.Image:
        """The picture of one seed: a base, shifted and maybe mirrored, plus a window of grain."""
        rng = np.random.default_rng(seed)
        base_index, dy, dx, gy, gx, mirror = rng.integers(0, [len(self.bases), *[2 * MARGIN + 1] * 4, 2])
        base = self.bases[base_index][dy : dy + self.height, dx : dx + self.width]
        if mirror:
            base = base[:, ::-1]
        grain = self.grain[gy : gy + self.height, gx : gx + self.width]
        return Image.fromarray(np.add(base, grain))


def _landscape(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth float picture in 0..255: sky gradient, a wavy anti-aliased horizon over a ground
    gradient, and a few soft ellipses (sun, clouds, bushes). Only low frequencies and one edge,
    like a photo's large structures; the fine texture is the grain added per image."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    top, low = (np.asarray(c, np.float32) + rng.uniform(-20, 20, 3).astype(np.float32) for c in SKIES[rng.integers(len(SKIES))])
    horizon = rng.uniform(0.4, 0.7)
    sky = _blend(top, low, np.clip(y / horizon, 0, 1))
    near, far = rng.uniform([20, 40, 10], [140, 150, 80], (2, 3)).astype(np.float32)
    line = horizon + sum(rng.uniform(0.01, 0.04) * np.sin(2 * np.pi * (x * rng.uniform(1, 8) + rng.uniform())) for _ in range(2))
    ground = _blend(far, near, np.clip((y - line) / (1 - line), 0, 1))
    picture = _blend(sky, ground, np.clip((y - line) * height, 0, 1))
    for _ in range(rng.integers(3, 7)):
        centre, radius = rng.uniform(0, 1, 2), rng.uniform([0.03, 0.03], [0.2, 0.15])
        distance = ((x - centre[0]) / radius[0]) ** 2 + ((y - centre[1]) / radius[1]) ** 2
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        picture = _blend(picture, colour, np.exp(-distance * distance) * rng.uniform(0.4, 0.9))
    return np.clip(picture, 0, 255)


def _blend(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t


class SimulatedPipeline:
    """Called like ``StableDiffusionXLPipeline``; sleeps for the device and returns bank pictures."""

    tokenizer = None  # no truncation warnings: the worker skips them without a tokenizer

    def __init__(self, ms_per_image: float, trace: Path | None) -> None:
        self.ms_per_image = ms_per_image
        self.trace = trace
        self._banks = {(IMAGE_WIDTH, IMAGE_HEIGHT): PictureBank.paint(IMAGE_WIDTH, IMAGE_HEIGHT)}

    def __call__(
        self,
        prompt: Sequence[str],
        generator: torch.Generator | Sequence[torch.Generator],
        num_inference_steps: int = DEFAULT_STEPS,
        width: int = IMAGE_WIDTH,
        height: int = IMAGE_HEIGHT,
        output_type: str = "pil",
        **_: Any,  # guidance_scale, negative_prompt: no effect on a simulated device
    ) -> SimulatedOutput:
        if output_type != "pil":
            raise ValueError(f"the simulated device returns PIL images only, not {output_type!r}")
        seeds = _seeds(generator, len(prompt))  # drawn first, as a pipeline draws its latents
        start = time.monotonic()
        time.sleep(self.device_seconds(len(seeds), num_inference_steps))
        end = time.monotonic()
        self._record(start, end, len(seeds))
        bank = self._bank(width, height)
        return SimulatedOutput([bank.picture(seed) for seed in seeds])

    def device_seconds(self, images: int, steps: int) -> float:
        """The configured cost is for the default step count; the 1-step warm-up costs an eighth."""
        return self.ms_per_image / 1000 * images * steps / DEFAULT_STEPS

    def _bank(self, width: int, height: int) -> PictureBank:
        """Other sizes get a bank of their own on first use (a fraction of a second, once)."""
        key = (width, height)
        if key not in self._banks:
            self._banks[key] = PictureBank.paint(width, height)
        return self._banks[key]

    def _record(self, start: float, end: float, images: int) -> None:
        if self.trace is None:
            return
        line = f"{os.getpid()} {start:.6f} {end:.6f} {images}\n".encode()
        fd = os.open(self.trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def _seeds(generator: torch.Generator | Sequence[torch.Generator], count: int) -> list[int]:
    """One seed per image from its own generator (a single generator serves all, in turn)."""
    generators = [generator] * count if isinstance(generator, torch.Generator) else list(generator)
    if len(generators) != count:
        raise ValueError(f"{len(generators)} generators for {count} prompts")
    return [int(torch.randint(0, SEED_BOUND, (1,), generator=g)) for g in generators]


def factory(device: str, model_cache: Path) -> SimulatedPipeline:
    """The ``--model benchmarks.simulated_device:factory`` entry point; the device and the model
    cache are unused (nothing runs on the device, nothing is loaded)."""
    ms = float(os.environ.get(MS_PER_IMAGE_ENV) or DEFAULT_MS_PER_IMAGE)
    trace = os.environ.get(TRACE_ENV)
    return SimulatedPipeline(ms, Path(trace) if trace else None)


def measure_encoding(pictures: int = 16) -> None:
    """Print what one picture costs to make and to PNG-encode at level 1 (the worker's level), the
    numbers quoted in the module docstring."""
    bank = PictureBank.paint(IMAGE_WIDTH, IMAGE_HEIGHT)
    make, encode, sizes = [], [], []
    for seed in range(pictures):
        started = time.perf_counter()
        image = bank.picture(seed)
        made = time.perf_counter()
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        encode.append(time.perf_counter() - made)
        make.append(made - started)
        sizes.append(buffer.tell())
    print(
        f"{pictures} pictures {IMAGE_WIDTH}x{IMAGE_HEIGHT}: make median {1000 * statistics.median(make):.1f} ms; "
        f"PNG level 1 {1000 * min(encode):.0f}-{1000 * max(encode):.0f} ms (median {1000 * statistics.median(encode):.0f}), "
        f"{min(sizes) / 1e6:.2f}-{max(sizes) / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    measure_encoding(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
