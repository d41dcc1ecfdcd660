"""What each image format costs, and the default quality of WebP and JPEG (issue 16).

On real photographs (colour samples bundled with scikit-image, ``skimage.data``: nothing to
download), centre-cropped to 16:9 and resized to the contract's 1024x576, every image is encoded
with the worker's own encoder, ``gpu_workers.encoding.encode`` (with a receipt inside, as the worker
writes it): PNG at zlib level 1, WebP and JPEG at a range of qualities. Per format and quality:

- **bytes** per image (median over the photographs), and a **150-image batch** as the JSON body of
  ``return_format: base64`` (150 x the base64 length of the median image, 4 * ceil(n / 3));
- **encode ms** per image: the median over the photographs of each one's median of ``--runs``
  encodes, in CPU time of the encoding thread (``time.thread_time``: on a shared machine, waiting
  for a CPU is not the encoder's cost; the wall-clock medians are printed too). Runs are interleaved
  across formats, so a slow moment of the machine falls on all of them alike;
- **quality** against the original: PSNR (dB, over RGB) and SSIM (``skimage.metrics``, per channel);
- the ratios against PNG level 1: how many times smaller the batch is, and the encode time.

The issue's goal: a WebP batch at least 8x smaller than the PNG one, encoded no slower than PNG at
level 1. It is judged at the WebP default in ``contract.formats`` (exit status 0 when it holds).

``--params`` also measures the encoder's own settings at the default qualities: WebP ``method``
0-6 (``gpu_workers.encoding.WEBP_METHOD`` is 4, libwebp's default) and JPEG's ``optimize``,
``progressive`` and chroma subsampling; ``--simulated N`` encodes N pictures of
``benchmarks.simulated_device`` (what ``benchmarks.device_overlap`` encodes) for comparison.

    .venv/bin/python -m benchmarks.image_formats [--runs 5] [--webp-qualities 60,70,...] [--jpeg-qualities 70,80,...]
        [--params] [--simulated 8] [--json PATH]

Needs scikit-image (``pip install -e '.[bench]'``). About three minutes on a 2-core machine with
``--webp-methods 4,2,0 --jpeg-444 --params --simulated 8`` (the run in BENCHMARKS.md), 15 s with
``--runs 1 --no-ssim``.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.harness.report import Column, JsonOut, cpu_model, load_line, report
from contract.formats import IMAGE_FORMATS
from gpu_workers import encoding
from gpu_workers.encoding import encode
from gpu_workers.exif import JPEG_EXIF_LIMIT

WIDTH, HEIGHT = 1024, 576
BATCH = 150  # the largest batch a request may ask for: its body is what the issue is about
# Colour photographs that ship inside scikit-image (others are fetched with pooch, from the network).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "stereo_motorcycle", "immunohistochemistry")
WEBP_QUALITIES = (60, 70, 75, 80, 85, 90, 95)
JPEG_QUALITIES = (70, 80, 85, 90, 95)
GOAL_SMALLER = 8.0  # the WebP batch at least this many times smaller than the PNG batch
GOAL_TIME = 1.0  # and its encoding no slower than PNG at level 1
# A receipt like the worker's (gpu_workers.receipts.receipt): it is part of every image's bytes.
FIELDS: dict[str, Any] = {
    "format": "sdxl-receipt/1",
    "prompt": "a lighthouse on a rocky coast at dusk, waves, dramatic sky, 35mm photograph",
    "negative_prompt": "blurry, low quality",
    "seed": 1234567890123,
    "steps": 8,
    "guidance_scale": 0.0,
    "width": WIDTH,
    "height": HEIGHT,
    "image_format": "png",
    "quality": None,
    "model": "sdxl-lightning-8step",
    "model_fingerprint": "ByteDance/SDXL-Lightning@c9a24f48e1c025556787b0c58dd67a091ece2e44",
    "device_name": "NVIDIA H100 80GB HBM3",
    "torch_version": "2.13.0+cu128",
    "diffusers_version": "0.42.1",
}


# --------------------------------------------------------------------------------------------------
# The photographs


def photograph(name: str) -> Image.Image:
    """A bundled skimage sample, centre-cropped to 16:9 and resized (Lanczos) to 1024x576, RGB."""
    import skimage.data

    array = getattr(skimage.data, name)()
    if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
        array = array[0]
    image = Image.fromarray(np.ascontiguousarray(array[..., :3])).convert("RGB")
    width, height = image.size
    if width * HEIGHT > height * WIDTH:  # wider than 16:9: crop the sides
        crop = round(height * WIDTH / HEIGHT)
        box = ((width - crop) // 2, 0, (width - crop) // 2 + crop, height)
    else:  # taller: crop top and bottom
        crop = round(width * HEIGHT / WIDTH)
        box = (0, (height - crop) // 2, width, (height - crop) // 2 + crop)
    return image.resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS, box=box)


def simulated_pictures(count: int) -> list[Image.Image]:
    from benchmarks.simulated_device import PictureBank

    bank = PictureBank.paint(WIDTH, HEIGHT)
    return [bank.picture(seed).convert("RGB") for seed in range(count)]


# --------------------------------------------------------------------------------------------------
# Measuring


@dataclass(frozen=True)
class Setting:
    """One way to encode: a format and quality through the worker's encoder, or (``label`` set) a
    variant of the encoder's own parameters."""

    image_format: str
    quality: int | None
    label: str = ""
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        base = self.label or self.image_format
        return base if self.quality is None else f"{base} q{self.quality}"

    def encoder(self) -> Callable[[Image.Image], bytes]:
        fields = {**FIELDS, "image_format": self.image_format, "quality": self.quality}
        if not self.options:
            return lambda image: encode(image, self.image_format, self.quality, fields)
        # A variant: what encode() does for this format (the same EXIF), with other keyword arguments for Pillow.
        options = dict(self.options)

        def variant(image: Image.Image) -> bytes:
            buffer = io.BytesIO()
            if self.image_format == "jpeg":
                image = image.convert("RGB")
            exif = encoding.receipt_exif(fields, image.size, JPEG_EXIF_LIMIT if self.image_format == "jpeg" else None)
            image.save(buffer, format=self.image_format.upper(), quality=self.quality, exif=exif, **options)
            return buffer.getvalue()

        return variant


@dataclass
class Sample:
    """One setting on one picture."""

    picture: str
    bytes: int
    cpu_ms: list[float] = field(default_factory=list)
    wall_ms: list[float] = field(default_factory=list)
    psnr: float = math.inf
    ssim: float = 1.0


@dataclass(frozen=True)
class Row:
    """One setting over all the pictures."""

    setting: Setting
    samples: tuple[Sample, ...]

    @property
    def median_bytes(self) -> float:
        return statistics.median(s.bytes for s in self.samples)

    @property
    def batch_bytes(self) -> int:
        return BATCH * base64_length(self.median_bytes)

    @property
    def cpu_ms(self) -> float:
        return statistics.median(statistics.median(s.cpu_ms) for s in self.samples)

    @property
    def wall_ms(self) -> float:
        return statistics.median(statistics.median(s.wall_ms) for s in self.samples)

    @property
    def psnr(self) -> float:
        return statistics.median(s.psnr for s in self.samples)

    @property
    def min_psnr(self) -> float:
        return min(s.psnr for s in self.samples)

    @property
    def ssim(self) -> float:
        return statistics.median(s.ssim for s in self.samples)

    def smaller_than(self, reference: Row) -> float:
        return reference.batch_bytes / self.batch_bytes

    def per_picture_smaller(self, reference: Row) -> tuple[float, float]:
        """The smallest and largest per-picture size ratio against ``reference`` (same pictures)."""
        ratios = [r.bytes / s.bytes for s, r in zip(self.samples, reference.samples, strict=True)]
        return min(ratios), max(ratios)

    def time_ratio(self, reference: Row) -> float:
        return self.cpu_ms / reference.cpu_ms


def base64_length(size: float) -> int:
    return 4 * math.ceil(size / 3)


def quality_figures(original: np.ndarray, data: bytes, ssim: bool) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    with Image.open(io.BytesIO(data)) as opened:
        decoded = np.asarray(opened.convert("RGB"))
    if np.array_equal(decoded, original):
        return math.inf, 1.0
    psnr = float(peak_signal_noise_ratio(original, decoded, data_range=255))
    return psnr, float(structural_similarity(original, decoded, channel_axis=2, data_range=255)) if ssim else math.nan


def measure(pictures: dict[str, Image.Image], settings: Sequence[Setting], runs: int, ssim: bool = True) -> list[Row]:
    """Every setting on every picture: ``runs`` timed encodes each (interleaved across the settings),
    then the bytes' quality against the picture."""
    encoders = [s.encoder() for s in settings]
    rows: dict[Setting, list[Sample]] = {s: [] for s in settings}
    for name, image in pictures.items():
        image.load()
        original = np.asarray(image)
        outputs: list[bytes] = [b""] * len(settings)
        samples = [Sample(name, 0) for _ in settings]
        for index, encoder in enumerate(encoders):  # one untimed encode each: first-call costs
            outputs[index] = encoder(image)
        for _ in range(runs):
            for index, encoder in enumerate(encoders):
                wall, cpu = time.perf_counter(), time.thread_time()
                data = encoder(image)
                samples[index].cpu_ms.append(1000 * (time.thread_time() - cpu))
                samples[index].wall_ms.append(1000 * (time.perf_counter() - wall))
                if data != outputs[index]:
                    raise RuntimeError(f"{settings[index].name} on {name}: not deterministic")
        for index, setting in enumerate(settings):
            samples[index].bytes = len(outputs[index])
            samples[index].psnr, samples[index].ssim = quality_figures(original, outputs[index], ssim)
            rows[setting].append(samples[index])
        print(f"   {name}: {image.size[0]}x{image.size[1]}, PNG {len(outputs[0]) / 1e6:.2f} MB", file=sys.stderr, flush=True)
    return [Row(setting, tuple(samples)) for setting, samples in rows.items()]


# --------------------------------------------------------------------------------------------------
# Report


def megabytes(size: float) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} KB"


def db(value: float) -> str:
    return "lossless" if math.isinf(value) else f"{value:.2f}"


TABLE_COLUMNS = [
    Column("format", align="<"), Column("quality"), Column("median_bytes", "bytes/image (median)", megabytes),
    Column("batch_base64_bytes", "150-image base64 body", megabytes),
    Column("smaller", "smaller than PNG (batch; per photo)", lambda v: f"{v[0]:.1f}x ({v[1]:.1f}-{v[2]:.1f}x)"),
    Column("cpu_ms", "encode ms (CPU, median)", ".1f"), Column("wall_ms", "wall ms", ".1f"), Column("time_vs_png", "time vs PNG", lambda v: f"{v:.2f}x"),
    Column("psnr", "PSNR dB (median; min)", lambda v: f"{db(v[0])} ({db(v[1])})"), Column("ssim", "SSIM (median)", lambda v: "-" if math.isnan(v) else f"{v:.4f}"),
    Column("db_per_10kb", "dB per +10 KB", ".2f"),
]  # fmt: skip


def table(rows: Sequence[Row], reference: Row, json_out: JsonOut | None = None, name: str = "formats") -> str:
    """The markdown table of ``rows`` against ``reference`` (PNG); their figures (``row_json``) to ``json_out``."""
    cells: list[dict[str, Any]] = []
    previous: Row | None = None
    for row in rows:
        low, high = row.per_picture_smaller(reference)
        slope = None
        if previous is not None and (previous.setting.image_format, previous.setting.label) == (row.setting.image_format, row.setting.label) and not math.isinf(row.psnr):
            extra = (row.median_bytes - previous.median_bytes) / 1e4
            slope = (row.psnr - previous.psnr) / extra if extra > 0 else None
        cells.append({
            "format": row.setting.label or row.setting.image_format, "quality": row.setting.quality, "median_bytes": row.median_bytes,
            "batch_base64_bytes": row.batch_bytes, "smaller": (row.smaller_than(reference), low, high), "cpu_ms": row.cpu_ms, "wall_ms": row.wall_ms,
            "time_vs_png": row.time_ratio(reference), "psnr": (row.psnr, row.min_psnr), "ssim": row.ssim, "db_per_10kb": slope,
        })  # fmt: skip
        previous = row
    text = report(cells, TABLE_COLUMNS, markdown=True, echo=False)
    if json_out is not None:
        json_out.add(name, [row_json(row, reference) for row in rows])
    return text


def row_json(row: Row, reference: Row) -> dict[str, Any]:
    return {
        "setting": {**asdict(row.setting), "name": row.setting.name},
        "median_bytes": row.median_bytes,
        "batch_base64_bytes": row.batch_bytes,
        "smaller_than_png": row.smaller_than(reference),
        "cpu_ms": row.cpu_ms,
        "wall_ms": row.wall_ms,
        "time_vs_png": row.time_ratio(reference),
        "psnr": None if math.isinf(row.psnr) else row.psnr,
        "ssim": None if math.isnan(row.ssim) else row.ssim,
        "pictures": [
            {**asdict(s), "psnr": None if math.isinf(s.psnr) else s.psnr, "ssim": None if math.isnan(s.ssim) else s.ssim} for s in row.samples
        ],
    }


def machine_line() -> str:
    from PIL import __version__ as pillow, features

    return (
        f"{cpu_model()}, {os.cpu_count()} cores; Python {sys.version.split()[0]}, Pillow {pillow} "
        f"(libwebp {features.version('webp')}, libjpeg {features.version('jpg')}, zlib {features.version('zlib')}); {load_line()}"
    )


def parameter_settings() -> list[Setting]:
    """The encoder's own parameters, at the contract's default qualities."""
    webp, jpeg = IMAGE_FORMATS["webp"].default_quality, IMAGE_FORMATS["jpeg"].default_quality
    settings = [Setting("png", None)]
    for method in range(7):
        mark = " (encoder)" if method == encoding.WEBP_METHOD else ""
        settings.append(Setting("webp", webp, f"webp method {method}{mark}", (("method", method),)))
    settings += [
        Setting("jpeg", jpeg, "jpeg (encoder: 4:2:0, baseline)", (("optimize", False),)),
        Setting("jpeg", jpeg, "jpeg optimize", (("optimize", True),)),
        Setting("jpeg", jpeg, "jpeg progressive", (("optimize", False), ("progressive", True))),
        Setting("jpeg", jpeg, "jpeg 4:4:4", (("optimize", False), ("subsampling", 0))),
    ]
    return settings


def sweep_settings(webp: Sequence[int], jpeg: Sequence[int], webp_methods: Sequence[int], jpeg_444: bool) -> list[Setting]:
    """PNG, then WebP at every quality (through ``encode``, or with another ``method`` for each of
    ``webp_methods`` that is not the encoder's), then JPEG (and with 4:4:4 chroma when asked)."""
    settings = [Setting("png", None)]
    for method in dict.fromkeys(webp_methods or (encoding.WEBP_METHOD,)):
        if method == encoding.WEBP_METHOD:
            settings += [Setting("webp", q) for q in webp]
        else:
            settings += [Setting("webp", q, f"webp method {method}", (("method", method),)) for q in webp]
    settings += [Setting("jpeg", q) for q in jpeg]
    if jpeg_444:
        settings += [Setting("jpeg", q, "jpeg 4:4:4", (("optimize", False), ("subsampling", 0))) for q in jpeg]
    return settings


def parse_qualities(text: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in text.split(",") if part.strip())
    if not values or any(not 1 <= v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated qualities 1-100")
    return values


def parse_methods(text: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in text.split(",") if part.strip())
    if not values or any(not 0 <= v <= 6 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated WebP methods 0-6")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bytes, encode time and quality of PNG, WebP and JPEG on photographs at 1024x576.")
    parser.add_argument("--runs", type=int, default=5, help="timed encodes per picture and setting (the median counts)")
    parser.add_argument("--webp-qualities", type=parse_qualities, default=WEBP_QUALITIES)
    parser.add_argument("--jpeg-qualities", type=parse_qualities, default=JPEG_QUALITIES)
    parser.add_argument(
        "--webp-methods", type=parse_methods, default=(), help=f"sweep the WebP qualities with each of these methods (default: the encoder's, {encoding.WEBP_METHOD})"
    )
    parser.add_argument("--jpeg-444", action="store_true", help="also sweep the JPEG qualities with 4:4:4 chroma (no subsampling)")
    parser.add_argument("--params", action="store_true", help="also measure WebP method 0-6 and JPEG options at the default qualities")
    parser.add_argument("--simulated", type=int, default=0, metavar="N", help="also encode N pictures of benchmarks.simulated_device")
    parser.add_argument("--no-ssim", action="store_true", help="skip SSIM (about 0.4 s per figure)")
    parser.add_argument("--json", help="also write every figure as JSON here")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    began = time.monotonic()
    webp_default, jpeg_default = IMAGE_FORMATS["webp"].default_quality, IMAGE_FORMATS["jpeg"].default_quality
    print("## image formats: PNG (level 1), WebP and JPEG through gpu_workers.encoding.encode")
    print(f"machine: {machine_line()}")
    print(f"photographs (skimage.data, centre-cropped to 16:9, Lanczos to {WIDTH}x{HEIGHT}): {', '.join(PHOTOS)}")
    print(f"encode: median of {args.runs} runs per photo (thread CPU time), then median over the photos; defaults now: "
          f"webp {webp_default}, jpeg {jpeg_default}, WEBP_METHOD {encoding.WEBP_METHOD}, PNG_COMPRESS_LEVEL {encoding.PNG_COMPRESS_LEVEL}\n")

    photos = {name: photograph(name) for name in PHOTOS}
    settings = sweep_settings(args.webp_qualities, args.jpeg_qualities, args.webp_methods, args.jpeg_444)
    rows = measure(photos, settings, args.runs, ssim=not args.no_ssim)
    reference = rows[0]
    json_out = JsonOut(args.json, "benchmarks.image_formats", pillow=machine_line(), photos=list(PHOTOS), runs=args.runs)
    print(table(rows, reference, json_out, "formats"))

    goal_row = next((r for r in rows if r.setting == Setting("webp", webp_default)), None)
    print()
    for row in rows[1:]:
        if row.setting.image_format == "webp":
            print(f"{row.setting.name}: batch {row.smaller_than(reference):.1f}x smaller than PNG level 1, encode {row.time_ratio(reference):.2f}x its time")
    ok = True
    if goal_row is None:
        print(f"\ngoal not judged: the default WebP quality {webp_default} was not measured")
    else:
        smaller, slower = goal_row.smaller_than(reference), goal_row.time_ratio(reference)
        ok = smaller >= GOAL_SMALLER and slower <= GOAL_TIME
        print(
            f"\n{'PASS' if ok else 'MISS'}  webp q{webp_default} (the default): the 150-image base64 body is {megabytes(goal_row.batch_bytes)} "
            f"against PNG's {megabytes(reference.batch_bytes)} = {smaller:.1f}x smaller (goal >= {GOAL_SMALLER:g}x); "
            f"encode {goal_row.cpu_ms:.1f} ms against {reference.cpu_ms:.1f} ms = {slower:.2f}x (goal <= {GOAL_TIME:g}x)"
        )

    if args.params:
        print(f"\n### the encoder's parameters (webp q{webp_default}, jpeg q{jpeg_default}; same photographs)\n")
        params = measure(photos, parameter_settings(), args.runs, ssim=not args.no_ssim)
        print(table(params, params[0], json_out, "params"))

    if args.simulated:
        print(f"\n### {args.simulated} pictures of benchmarks.simulated_device (what benchmarks.device_overlap encodes)\n")
        pictures = {f"simulated {seed}": image for seed, image in enumerate(simulated_pictures(args.simulated))}
        simulated = measure(pictures, [Setting("png", None), Setting("webp", webp_default), Setting("jpeg", jpeg_default)], args.runs, ssim=not args.no_ssim)
        print(table(simulated, simulated[0], json_out, "simulated"))

    print(f"\n{time.monotonic() - began:.0f} s; at the end: {load_line()}")
    json_out.add("goal", {"webp_quality": webp_default, "passed": ok})
    json_out.announce()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
