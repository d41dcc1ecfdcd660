"""``Idempotency-Key``: a client that lost its connection before it heard the job id sends the same
request again with the same key and gets the same job, never a second run of it.

The key is kept with the job in the database (so it survives a restart) for as long as the job:
the retention time after it ended. It belongs to the submitter (``Submission.owner``): two
API keys can use the same idempotency key without meeting. The body is compared by a hash of what
it means (the validated fields with their defaults, in a canonical order), so whitespace or key
order of a resent body does not matter, and a different request under a reused key is a 422 rather
than a silent answer about some other batch.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from service.jobs.job_db import Idempotency, JobRecord
from service.jobs.refusal import Refusal

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
_KEY = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_KEY_CHARS)  # visible ASCII, as Stripe and the IETF draft use


def request_hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def idempotency_of(key: str | None, data: dict[str, Any]) -> Idempotency | None | Refusal:
    """The key (the header's value) and the body's hash; None without the header; a 400 for a
    malformed key."""
    if key is None:
        return None
    if not _KEY.fullmatch(key):
        return Refusal(
            400,
            f"{HEADER} must be 1 to {MAX_KEY_CHARS} visible ASCII characters (no spaces), such as a UUID; "
            f"got {len(key)} character(s).",
        )
    return Idempotency(key, request_hash(data))


def conflict(record: JobRecord, key: str) -> Refusal:
    return Refusal(
        422,
        f"{HEADER} {key!r} was used for another request (job {record.job_id}); a retry must send the same body. "
        "Use a new key for a new request.",
        fields={"job_id": record.job_id},
    )
