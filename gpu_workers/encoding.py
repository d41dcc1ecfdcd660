"""Images to bytes in the format a request asked for, each with its receipt inside (the host's part
of a shard, which the worker loop runs beside the next shard: ``gpu_workers.worker_loop``).

Where the receipt goes, so that Pillow, exiftool and image viewers can read it:
- PNG: an iTXt chunk ``sdxl-receipt`` (the JSON) and ``parameters`` (the prompt line that A1111
  and ComfyUI users know), both uncompressed so ``strings`` finds them too;
- WebP and JPEG: EXIF (``gpu_workers.exif``): ImageDescription (0x010E) holds the JSON, UserComment
  (0x9286) the same ``parameters`` text (where A1111's and Civitai's readers look), Software names
  the model. JPEG's EXIF segment holds 64 KiB at most: a receipt that would not fit has its prompts
  cut there, and says so (``receipts.cut_prompts``); WebP, PNG and the job keep them whole.
Encoding is deterministic: the same image, format and quality give the same bytes.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, PngImagePlugin

from contract.formats import IMAGE_FORMATS
from gpu_workers.exif import IMAGE_DESCRIPTION, JPEG_EXIF_LIMIT, exif_block
from gpu_workers.receipts import CUTTABLE_FIELDS, RECEIPT_KEY, cut_prompts, receipt_text

# zlib level 1 is several times faster than PIL's default (6) for a few percent more bytes;
# at GPU speeds PNG encoding is on the critical path of every image.
PNG_COMPRESS_LEVEL = 1
# libwebp's effort (0 fastest - 6 smallest). 2 is the last before its rate-distortion search (3+):
# half PNG level 1's encode time for 4 % more bytes than 4, libwebp's default, which encodes slower
# than PNG (BENCHMARKS.md, "Image formats").
WEBP_METHOD = 2


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
    exif = b"" if fields is None else receipt_exif(fields, image.size, JPEG_EXIF_LIMIT if image_format == "jpeg" else None)
    if image_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=WEBP_METHOD, exif=exif)
    else:
        # Progressive: 5-7 % fewer bytes, the same pixels, some 6 ms more (still a fifth of PNG's time).
        image.convert("RGB").save(buffer, format="JPEG", quality=quality, exif=exif, progressive=True)
    return buffer.getvalue()


def _exif_of(fields: dict[str, Any], size: tuple[int, int]) -> bytes:
    return exif_block(receipt_text(fields), f"sdxl-lightning-server ({fields['model']})", parameters_line(fields), size)


def receipt_exif(fields: dict[str, Any], size: tuple[int, int], limit: int | None = None) -> bytes:
    """The EXIF block with ``fields`` inside, at most ``limit`` bytes: when the whole receipt is
    larger, its prompts are cut to the most characters that fit (a binary search: a dozen tries for
    3,000 characters, only for receipts that need it). Deterministic like the rest."""
    block = _exif_of(fields, size)
    if limit is None or len(block) <= limit:
        return block
    best = _exif_of(cut_prompts(fields, 0), size)
    if len(best) > limit:
        raise ValueError(f"the receipt takes more than {limit} bytes of EXIF even without its prompts")
    fits, too_long = 0, max(len(fields.get(name) or "") for name in CUTTABLE_FIELDS)
    while too_long - fits > 1:
        keep = (fits + too_long) // 2
        candidate = _exif_of(cut_prompts(fields, keep), size)
        if len(candidate) <= limit:
            fits, best = keep, candidate
        else:
            too_long = keep
    return best


def read_receipt(data: bytes) -> dict[str, Any] | None:
    """The receipt inside image bytes of any of our formats, or None (the client and tests)."""
    import json

    with Image.open(io.BytesIO(data)) as image:
        text = image.info.get(RECEIPT_KEY)
        if text is None:
            text = image.getexif().get(IMAGE_DESCRIPTION)
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
