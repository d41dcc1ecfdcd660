"""``POST /generate``: the request our users' clients send and the response they read.

The request fields and their meaning follow the reference API (``reference/original-api-description.md``)
so existing clients work unchanged; ``seed``, ``guidance_scale``, ``seeds`` and ``warnings`` are
additions that old clients simply do not send or read. Limits that are settings (images per request,
prompt length) are checked by the route against the running server's settings; the numbers here are
the defaults, for the documentation.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, pre_load, validate, validates_schema
from yarl import URL

from contract.formats import DEFAULT_ALLOWED_SIZES, DEFAULT_SIZE, IMAGE_FORMATS, MAX_QUALITY, MIN_QUALITY, PNG, parse_size
from contract.webhooks import DEFAULT_WEBHOOK_EVENTS, MAX_WEBHOOK_URL_CHARS, WEBHOOK_EVENTS
from schemas.fields import StrictFloat, StrictInteger

DEFAULT_MAX_IMAGES = 150
DEFAULT_MAX_PROMPT_CHARS = 2000
MAX_IMAGES_PER_PROMPT = 50
MAX_SEED = 2**32 - 1
RETURN_FORMATS = ("base64", "url")

EXAMPLE_REQUEST = {
    "prompts": ["baroque oil painting, dramatic chiaroscuro lighting, a massive disembodied eye made of fire"],
    "num_images_per_prompt": 1,
    "negative_prompt": "modern, photograph, low quality",
    "return_format": "base64",
    "seed": 1234,
}


def _encodable(text: str) -> None:
    """JSON may spell a lone UTF-16 surrogate (``"\\ud800"``): it is no character, and no text
    encoder can read it, so it is refused here rather than failing the batch later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("Text must be valid Unicode (it holds a lone surrogate such as \\ud800).") from None


def _size_shape(text: str) -> None:
    try:
        parse_size(text)
    except ValueError as exc:
        raise ValidationError(f"{exc}; send one of {', '.join(DEFAULT_ALLOWED_SIZES)} (or what GET / lists).") from None


def _not_blank(text: str) -> None:
    _encodable(text)
    if not text.strip():
        raise ValidationError("Prompts must not be blank.")


def _webhook_url(text: str) -> None:
    """The shape of a webhook URL; where it may point is the server's check (``service.integrations.webhooks``)."""
    _encodable(text)
    if len(text) > MAX_WEBHOOK_URL_CHARS:
        raise ValidationError(f"{len(text)} characters long; the limit is {MAX_WEBHOOK_URL_CHARS}.")
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise ValidationError("Must not hold spaces or control characters.")
    try:
        url = URL(text)
        host, _ = url.host, url.port
    except (ValueError, TypeError):
        raise ValidationError("Not a valid URL.") from None
    if url.scheme not in ("http", "https") or not host:
        raise ValidationError("Must be an absolute http:// or https:// URL, such as https://example.com/hooks/sdxl.")
    if url.user is not None or url.password is not None:
        raise ValidationError("Must not hold a user name or password; a receiver checks the signature instead.")
    if host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValidationError(f"The host {host} is no IPv4 address as written: use four decimal numbers, a.b.c.d.") from None


def _distinct(events: list[str]) -> None:
    if len(set(events)) != len(events):
        raise ValidationError("Name each event once.")


SIZE_HINT = (
    f'send "size": "WIDTHxHEIGHT" instead: {DEFAULT_SIZE} (16:9, the default), 576x1024 (9:16) or 1024x1024; '
    "GET / lists the sizes this server allows."
)


class GenerateRequestSchema(Schema):
    class Meta:
        unknown = RAISE

    @pre_load
    def _no_width_or_height(self, data: Any, **kwargs: Any) -> Any:
        """Clients of other servers send width and height by habit: name the field that does it."""
        if isinstance(data, dict):
            sent = [name for name in ("width", "height") if name in data]
            if sent:
                raise ValidationError(f"{' and '.join(sent)} {'is not a field' if len(sent) == 1 else 'are not fields'}; {SIZE_HINT}", sent[0])
        return data

    @validates_schema
    def _events_need_a_url(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "webhook_events" in data and data.get("webhook_url") is None:
            raise ValidationError("Needs a webhook_url to send them to.", "webhook_events")

    @post_load
    def _webhook_defaults(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Absent or null: no webhook fields at all, so the hash of a body without them (its
        Idempotency-Key's) stays what it was before webhooks. With a URL, the events in one order."""
        if data.get("webhook_url") is None:
            data.pop("webhook_url", None)
            return data
        chosen = data.get("webhook_events", DEFAULT_WEBHOOK_EVENTS)
        data["webhook_events"] = [event for event in WEBHOOK_EVENTS if event in chosen]
        return data

    @validates_schema
    def _quality_needs_lossy_format(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("quality") is not None and data.get("image_format") == PNG.name:
            raise ValidationError("quality applies to webp and jpeg; png is lossless and takes none.", "quality")

    prompts = fields.List(
        fields.Str(validate=_not_blank),
        required=True,
        validate=validate.Length(min=1, max=DEFAULT_MAX_IMAGES, error="Send between {min} and {max} prompts."),
        metadata={
            "description": (
                f"Text descriptions, 1 to {DEFAULT_MAX_IMAGES}, none blank, each at most {DEFAULT_MAX_PROMPT_CHARS} "
                "characters (setting max_prompt_chars). The text encoders read 77 tokens; a longer prompt is "
                "truncated and the response says so in `warnings`."
            ),
            "example": EXAMPLE_REQUEST["prompts"],
        },
    )
    negative_prompt = fields.Str(
        allow_none=True,
        load_default=None,
        validate=_encodable,
        metadata={
            "description": (
                "What to avoid. SDXL-Lightning runs at guidance_scale 0, where the negative prompt has no "
                "effect; it is used only when guidance_scale > 1 is asked for."
            ),
            "example": EXAMPLE_REQUEST["negative_prompt"],
        },
    )
    num_images_per_prompt = StrictInteger(
        load_default=1,
        validate=validate.Range(min=1, max=MAX_IMAGES_PER_PROMPT),
        metadata={
            "description": (
                f"Variations per prompt, 1 to {MAX_IMAGES_PER_PROMPT}. prompts x num_images_per_prompt "
                f"must be at most {DEFAULT_MAX_IMAGES} (setting max_images)."
            ),
            "example": 2,
        },
    )
    return_format = fields.Str(
        load_default="base64",
        validate=validate.OneOf(RETURN_FORMATS, error="return_format must be one of: {choices}."),
        metadata={
            "description": "base64: the images inline as base64 strings. url: links to /images/{id}.{png,webp,jpg}, kept for the retention time (the 128-bit id is the capability: no API key needed to open one).",
            "example": "base64",
        },
    )
    image_format = fields.Str(
        data_key="format",
        load_default=PNG.name,
        validate=validate.OneOf(tuple(IMAGE_FORMATS), error="format must be one of: {choices}."),
        metadata={
            "description": (
                "png (default, lossless, about 1 MB at 1024x576), webp or jpeg (a tenth of that or less: see "
                "BENCHMARKS.md). Every image carries its receipt (prompt, seed, steps, model, versions) in its "
                "own metadata: PNG text chunk sdxl-receipt, EXIF ImageDescription for WebP and JPEG."
            ),
            "example": "webp",
        },
    )
    quality = StrictInteger(
        allow_none=True,
        load_default=None,
        validate=validate.Range(min=MIN_QUALITY, max=MAX_QUALITY),
        metadata={
            "description": (
                f"{MIN_QUALITY} to {MAX_QUALITY}, for webp and jpeg only; absent: "
                + ", ".join(f"{f.name} {f.default_quality}" for f in IMAGE_FORMATS.values() if f.default_quality)
                + ". Same seed, format and quality: the same bytes."
            ),
            "example": 85,
        },
    )
    size = fields.Str(
        load_default=DEFAULT_SIZE,
        validate=_size_shape,
        metadata={
            "description": (
                f"WIDTHxHEIGHT of every image of the request: {DEFAULT_SIZE} (16:9, default), 576x1024 (9:16, Shorts "
                "and Reels) or 1024x1024; the list is the server's setting `sizes` (GET / shows it). One request, one size."
            ),
            "example": DEFAULT_SIZE,
        },
    )
    seed = StrictInteger(
        allow_none=True,
        load_default=None,
        validate=validate.Range(min=-1, max=MAX_SEED),
        metadata={
            "description": (
                f"0 to {MAX_SEED}: image i of the request (prompt-major order) uses seed + i (mod 2^32), so the "
                "same request and seed give the same images. -1, null or absent: a random seed; the seeds used "
                "are returned in `seeds` either way."
            ),
            "example": 1234,
        },
    )
    webhook_url = fields.Str(
        allow_none=True,
        validate=_webhook_url,
        metadata={
            "description": (
                f"http(s) URL, at most {MAX_WEBHOOK_URL_CHARS} characters, that gets a signed POST (Standard Webhooks: "
                "webhook-id, webhook-timestamp, webhook-signature headers) when the job ends: job.completed or job.failed "
                "(also for a cancelled job; data.state says which). Retried with backoff, also across restarts, with the "
                "same webhook-id. The server must have a webhook secret (a 400 says so otherwise) and calls no loopback, "
                "private or link-local address unless its operator allows them (a 400 at submit)."
            ),
            "example": "https://example.com/hooks/sdxl",
            "maxLength": MAX_WEBHOOK_URL_CHARS,
        },
    )
    webhook_events = fields.List(
        fields.Str(validate=validate.OneOf(WEBHOOK_EVENTS, error="events are: {choices}.")),
        validate=[validate.Length(min=1, error="Name at least one event."), _distinct],
        metadata={
            "description": (
                f"Which events to send (with webhook_url only); default {list(DEFAULT_WEBHOOK_EVENTS)}. "
                "Add image.completed for one message per stored image (index, seed, url)."
            ),
            "example": list(WEBHOOK_EVENTS),
            "uniqueItems": True,
        },
    )
    guidance_scale = StrictFloat(
        load_default=0.0,
        validate=validate.Range(min=0.0, max=20.0),
        metadata={"description": "Classifier-free guidance, 0 to 20. The 8-step checkpoint is trained for 0.", "example": 0.0},
    )


class GenerateResponseSchema(Schema):
    success = fields.Bool(
        required=True,
        metadata={"description": "false only when a failure happened after heartbeats had started (status 200 already sent)."},
    )
    images = fields.List(
        fields.Str(),
        required=True,
        metadata={
            "description": "base64 strings of the images (in the request's format), or absolute URLs for return_format url; in request order (all images of prompt 0, then prompt 1, ...).",
            "example": ["iVBORw0KGgoAAAANSUhEUgAA..."],
        },
    )
    count = fields.Int(required=True, metadata={"example": 2})
    message = fields.Str(metadata={"example": "Successfully generated 2 image(s)"})
    seeds = fields.List(fields.Int(), metadata={"description": "The seed of each image, in the same order.", "example": [1234, 1235]})
    warnings = fields.List(fields.Str(), metadata={"description": "Things the client should know, e.g. truncated prompts.", "example": []})
    job_id = fields.Str(
        metadata={"description": "The job of this request (also the X-Job-Id header): GET /jobs/{job_id} gives the result again.", "example": "3f2b9c4e5d6a47f8a9b0c1d2e3f4a5b6"}
    )
    detail = fields.Str(metadata={"description": "Only when success is false: the failure, e.g. 'Image generation failed: CUDA out of memory'."})
