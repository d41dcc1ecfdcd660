"""Strict number fields: JSON says exactly what it means, or the request is refused.

marshmallow's ``Integer`` turns 2.5 into 2 and "3" into 3, and ``True`` passes as an integer even
with ``strict=True`` (bool is an ``Integral``); a client that sends any of these has a bug we
should tell them about rather than guess around.
"""

from __future__ import annotations

import math
from typing import Any

from marshmallow import fields


class StrictInteger(fields.Integer):
    default_error_messages = {"invalid": "Not a valid integer (send a whole JSON number, without quotes or decimals)."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        return value


class StrictFloat(fields.Float):
    default_error_messages = {"invalid": "Not a valid number (send a JSON number, without quotes)."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        result = float(value)
        if not math.isfinite(result):
            raise self.make_error("special")
        return result
