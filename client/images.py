"""What the client needs to know about an image's bytes: which format they are, and whether the
server's receipt is already inside them.

Our server writes a receipt (prompt, seed, steps, model, versions, ...) into every image: a PNG text
chunk ``sdxl-receipt``, or for WebP and JPEG the EXIF ImageDescription (0x010E) holding the JSON.
The client then saves the bytes exactly as they came (their sha256 is the manifest's). Only an
image without one (the reference server's) gets the client's own PNG text chunks.
"""

from __future__ import annotations

import io
import json

from client.png_text import PNG_SIGNATURE

RECEIPT_KEY = "sdxl-receipt"
EXIF_IMAGE_DESCRIPTION = 0x010E
# The file name extension of each format (the server's ``/images/<id>.<ext>`` uses the same).
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}


def image_format(data: bytes) -> str | None:
    """``png``, ``webp`` or ``jpeg`` from the first bytes; None for anything else."""
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return None


def has_receipt(data: bytes) -> bool:
    """Whether the image carries the server's receipt (Pillow reads only the header and metadata
    here, never the pixels)."""
    from PIL import Image  # Pillow costs ~50 ms to import: only when an image is there to look at

    try:
        with Image.open(io.BytesIO(data)) as image:
            text = image.info.get(RECEIPT_KEY)
            if text is None:
                text = image.getexif().get(EXIF_IMAGE_DESCRIPTION)
    except Exception:  # noqa: BLE001 - Pillow raises many kinds for bytes it cannot parse
        return False
    if not isinstance(text, (str, bytes)) or not text:
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
