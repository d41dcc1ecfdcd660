"""The image formats and sizes a request may ask for: one table read by the request schema, the
worker's encode stage, the image store (file extensions) and the routes (Content-Type)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageFormat:
    name: str
    extension: str
    content_type: str
    # None: the format has no quality setting (PNG is lossless; its zlib level is ours to pick).
    default_quality: int | None


PNG = ImageFormat("png", "png", "image/png", None)
# Chosen by ``python -m benchmarks.image_formats`` on 7 photographs at 1024x576 (BENCHMARKS.md, "Image
# formats"). WebP 85: 69 KB an image against PNG level 1's 849 KB, PSNR 37.8 dB, SSIM 0.964; every
# photo at least 10x smaller than its PNG (at 90 the least-upscaled ones fall to 7-8x, under the
# issue's 8x), and past 80 each byte buys less (PSNR +1.2 dB per 10 KB up to 80, +0.9 to 85, +0.8
# to 90, +0.5 to 95). JPEG 85: the picture of WebP 85 (37.9 dB, SSIM 0.965) at 105 KB, 8x smaller
# than PNG; JPEG's curve has no knee in 70-95, so it matches WebP's default rather than a knee.
WEBP = ImageFormat("webp", "webp", "image/webp", 85)
JPEG = ImageFormat("jpeg", "jpg", "image/jpeg", 85)
IMAGE_FORMATS: dict[str, ImageFormat] = {f.name: f for f in (PNG, WEBP, JPEG)}
DEFAULT_FORMAT = PNG.name  # what the reference clients have always got
CONTENT_TYPES: dict[str, str] = {f.extension: f.content_type for f in IMAGE_FORMATS.values()}
MIN_QUALITY, MAX_QUALITY = 1, 100

DEFAULT_SIZE = "1024x576"  # the contract's 16:9
# 9:16 for Shorts and Reels, and the square SDXL was trained on.
DEFAULT_ALLOWED_SIZES = ("1024x576", "576x1024", "1024x1024")
_SIZE = re.compile(r"^(?P<width>[1-9][0-9]{1,4})x(?P<height>[1-9][0-9]{1,4})$")


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x576"`` as ``(1024, 576)``; ``ValueError`` for anything else. SDXL works in latents
    of 1/8 the size, so both sides must be multiples of 8."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not WIDTHxHEIGHT (such as 1024x576)")
    width, height = int(match["width"]), int(match["height"])
    if width % 8 or height % 8:
        raise ValueError(f"{text!r}: width and height must be multiples of 8")
    return width, height


def quality_for(image_format: str, quality: int | None) -> int | None:
    """The quality an image is encoded at: the one asked for, else the format's default."""
    return IMAGE_FORMATS[image_format].default_quality if quality is None else quality
