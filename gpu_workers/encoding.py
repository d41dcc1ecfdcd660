"""Images to bytes in the format a request asked for, each with its receipt inside (the host's part
of a shard, which the worker loop runs beside the next shard: ``gpu_workers.worker_loop``).

Where the receipt goes, so that Pillow, exiftool and image viewers can read it:
- PNG: an iTXt chunk ``sdxl-receipt`` (the JSON) and ``parameters`` (the prompt line that A1111
  and ComfyUI users know), both uncompressed so ``strings`` finds them too;
- WebP and JPEG: EXIF ImageDescription (0x010E) holds the JSON, Software names the model.
Encoding is deterministic: the same image, format and quality give the same bytes.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, PngImagePlugin

from contract.formats import IMAGE_FORMATS
from gpu_workers.receipts import RECEIPT_KEY, receipt_text

# zlib level 1 is several times faster than PIL's default (6) for a few percent more bytes;
# at GPU speeds PNG encoding is on the critical path of every image.
PNG_COMPRESS_LEVEL = 1
# libwebp's effort (0 fastest - 6 smallest). 2 is the last before its rate-distortion search (3+):
# half PNG level 1's encode time for 4 % more bytes than 4, libwebp's default, which encodes slower
# than PNG (BENCHMARKS.md, "Image formats").
WEBP_METHOD = 2
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_SOFTWARE = 0x0131


def parameters_line(fields: dict[str, Any]) -> str:
    """The prompt and settings as one readable text (A1111's ``parameters`` convention)."""
    negative = f"\nNegative prompt: {fields['negative_prompt']}" if fields.get("negative_prompt") else ""
    return (
        f"{fields['prompt']}{negative}\nSteps: {fields['steps']}, Sampler: Euler trailing, CFG scale: "
        f"{fields['guidance_scale']}, Seed: {fields['seed']}, Size: {fields['width']}x{fields['height']}, "
        f"Model: {fields['model']}, Model hash: {fields['model_fingerprint']}"
    )


def encode(image: Image.Image, image_format: str, quality: int | None, fields: dict[str, Any] | None = None) -> bytes:
    """``image`` as ``image_format`` bytes (``quality`` for WebP and JPEG), with ``fields`` as its
    receipt when given."""
    buffer = io.BytesIO()
    if image_format == "png":
        info = PngImagePlugin.PngInfo()
        if fields is not None:
            info.add_itxt(RECEIPT_KEY, receipt_text(fields))
            info.add_itxt("parameters", parameters_line(fields))
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, pnginfo=info)
        return buffer.getvalue()
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}")
    exif = Image.Exif()
    if fields is not None:
        exif[EXIF_IMAGE_DESCRIPTION] = receipt_text(fields)
        exif[EXIF_SOFTWARE] = f"sdxl-lightning-server ({fields['model']})"
    if image_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=WEBP_METHOD, exif=exif)
    else:
        # Progressive: 5-7 % fewer bytes, the same pixels, some 6 ms more (still a fifth of PNG's time).
        image.convert("RGB").save(buffer, format="JPEG", quality=quality, exif=exif, progressive=True)
    return buffer.getvalue()


def read_receipt(data: bytes) -> dict[str, Any] | None:
    """The receipt inside image bytes of any of our formats, or None (the client and tests)."""
    import json

    with Image.open(io.BytesIO(data)) as image:
        text = image.info.get(RECEIPT_KEY)
        if text is None:
            text = image.getexif().get(EXIF_IMAGE_DESCRIPTION)
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
