"""``Accept: application/octet-stream`` on an image or an archive: the same bytes, under that type.

The OpenAPI document lists ``application/octet-stream`` beside ``image/*`` and ``application/zip``
(``schemas.common.binary_content``) because client generators such as openapi-python-client read
only that media type as bytes: for ``image/png`` or ``application/zip`` alone they generate a call
that returns None. The server keeps that promise here, for every client that asks for it, so the
document lists no media type the server never sends. Whoever asks for the file's own type, or for
anything (``*/*``, no Accept), gets it as before.
"""

from __future__ import annotations

from aiohttp import web

from contract.formats import CONTENT_TYPES
from schemas.common import OCTET_STREAM

BINARY_TYPES = frozenset({*CONTENT_TYPES.values(), "application/zip"})


async def octet_stream_if_asked(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the headers can still change here."""
    own = response.content_type
    if own in BINARY_TYPES and prefers_octet_stream(request.headers.get("Accept", ""), own):
        response.content_type = OCTET_STREAM


def prefers_octet_stream(accept: str, own: str) -> bool:
    """Whether ``accept`` names application/octet-stream above the file's own type (or its
    ``type/*``); a bare ``*/*`` asks for neither."""
    ranges = _accepted(accept)
    octet = ranges.get(OCTET_STREAM, 0.0)
    if octet <= 0:
        return False
    own_quality = ranges.get(own, ranges.get(own.split("/")[0] + "/*"))
    return own_quality is None or octet > own_quality


def _accepted(accept: str) -> dict[str, float]:
    """Media range -> quality (RFC 9110 section 12.5.1); a malformed q counts as 0."""
    ranges: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media:
            ranges[media.lower()] = quality
    return ranges
