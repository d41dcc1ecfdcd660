"""The EXIF block of our WebP and JPEG images, laid out here rather than by Pillow's ``Image.Exif``.

Why our own 60 lines: Pillow types a value it has no table entry for by its Python type, so bytes
in UserComment (0x9286) become BYTE, and the standard, exiftool and A1111's reader (``piexif``,
whose ``UserComment.load`` wants UNDEFINED bytes) need UNDEFINED. Here every tag has the type the
Exif 2.32 standard gives it, and the block has what ``exiftool -validate`` requires of a JPEG:
XResolution, YResolution, ResolutionUnit and YCbCrPositioning in IFD0, and ExifVersion,
ComponentsConfiguration, FlashpixVersion, ColorSpace and the pixel dimensions in the Exif IFD.

Big-endian (``MM``), as Pillow and piexif write it: UserComment's UTF-16 is big-endian, as piexif
writes and reads it (``utf_16_be``), which is then also the block's own byte order, the one exiftool
assumes. No clock and no host: the same receipt and size give the same bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

EXIF_HEADER = b"Exif\x00\x00"  # JPEG's APP1 marker carries it; Pillow takes it off for WebP's EXIF chunk
TIFF_HEADER = b"MM\x00\x2a" + struct.pack(">L", 8)  # big-endian, IFD0 right after the header
# JPEG's APP1 segment: a 16-bit length that counts itself, so 65533 bytes from "Exif\0\0" on.
JPEG_EXIF_LIMIT = 65533
USER_COMMENT_UNICODE = b"UNICODE\x00"  # Exif's character code for UTF-16 (Table 9 of the standard)

IMAGE_DESCRIPTION = 0x010E
SOFTWARE = 0x0131
USER_COMMENT = 0x9286
_X_RESOLUTION, _Y_RESOLUTION, _RESOLUTION_UNIT, _YCBCR_POSITIONING = 0x011A, 0x011B, 0x0128, 0x0213
_EXIF_IFD_POINTER = 0x8769
_EXIF_VERSION, _COMPONENTS, _FLASHPIX_VERSION, _COLOR_SPACE = 0x9000, 0x9101, 0xA000, 0xA001
_PIXEL_X, _PIXEL_Y = 0xA002, 0xA003
_ASCII, _SHORT, _LONG, _RATIONAL, _UNDEFINED = 2, 3, 4, 5, 7


@dataclass(frozen=True)
class _Field:
    type: int
    count: int
    data: bytes


def _ascii(text: str) -> _Field:
    """ASCII, as the type says: the receipt's JSON is already (``\\u`` escapes); elsewhere, such as
    a model folder's name in Software, another character becomes ``?``."""
    data = text.encode("ascii", "replace") + b"\x00"
    return _Field(_ASCII, len(data), data)


def _short(value: int) -> _Field:
    return _Field(_SHORT, 1, struct.pack(">H", value))


def _long(value: int) -> _Field:
    return _Field(_LONG, 1, struct.pack(">L", value))


def _rational(numerator: int, denominator: int = 1) -> _Field:
    return _Field(_RATIONAL, 1, struct.pack(">LL", numerator, denominator))


def _undefined(data: bytes) -> _Field:
    return _Field(_UNDEFINED, len(data), data)


def _ifd(fields: dict[int, _Field], start: int) -> bytes:
    """One IFD placed ``start`` bytes after the TIFF header: its table (tags in ascending order, as
    TIFF requires), no next IFD, then the values longer than 4 bytes, each at an even offset."""
    table = struct.pack(">H", len(fields))
    values = b""
    values_at = start + len(table) + 12 * len(fields) + 4
    for tag in sorted(fields):
        field = fields[tag]
        if len(field.data) <= 4:
            inline = field.data.ljust(4, b"\x00")
        else:
            inline = struct.pack(">L", values_at + len(values))
            values += field.data + b"\x00" * (len(field.data) % 2)
        table += struct.pack(">HHL", tag, field.type, field.count) + inline
    return table + struct.pack(">L", 0) + values


def user_comment(text: str) -> bytes:
    """UserComment's value: the character code, then the text in UTF-16 big-endian."""
    return USER_COMMENT_UNICODE + text.encode("utf-16-be")


def exif_block(description: str, software: str, comment: str, size: tuple[int, int]) -> bytes:
    """The EXIF of an image ``size`` (width, height) pixels: ``description`` (ASCII) in IFD0's
    ImageDescription, ``comment`` (any text) in the Exif IFD's UserComment. 72 dpi is the value
    the standard gives when nothing is known; ColorSpace 1 is sRGB, what Pillow encodes."""
    exif_fields = {
        _EXIF_VERSION: _undefined(b"0232"),
        _COMPONENTS: _undefined(b"\x01\x02\x03\x00"),  # Y, Cb, Cr
        USER_COMMENT: _undefined(user_comment(comment)),
        _FLASHPIX_VERSION: _undefined(b"0100"),
        _COLOR_SPACE: _short(1),
        _PIXEL_X: _long(size[0]),
        _PIXEL_Y: _long(size[1]),
    }
    ifd0_fields = {
        IMAGE_DESCRIPTION: _ascii(description),
        _X_RESOLUTION: _rational(72),
        _Y_RESOLUTION: _rational(72),
        _RESOLUTION_UNIT: _short(2),  # inches
        SOFTWARE: _ascii(software),
        _YCBCR_POSITIONING: _short(1),  # centered
        _EXIF_IFD_POINTER: _long(0),
    }
    first = 8  # IFD0's offset, right after the TIFF header
    # The Exif IFD follows IFD0, whose length does not depend on the pointer's value.
    exif_at = first + len(_ifd(ifd0_fields, first))
    ifd0_fields[_EXIF_IFD_POINTER] = _long(exif_at)
    return EXIF_HEADER + TIFF_HEADER + _ifd(ifd0_fields, first) + _ifd(exif_fields, exif_at)
