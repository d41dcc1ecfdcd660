"""Explicit, safe serialisation of every message in ``gpu_workers.messages``.

Between local processes the messages travel pickled, which is fine while both ends are the same
trusted program. Between boxes (e.g. through Redis Streams) they must not: unpickling runs code
chosen by whoever wrote the bytes, so a compromised worker box could take over the API process,
or the reverse. This module encodes messages as msgpack instead: plain data only, decoded
strictly against each message class's type hints, with one error class, ``WireError``, for
anything that is not exactly a message we know.

Envelope (a msgpack map)::

    {"v": WIRE_VERSION, "type": "<message class name>", "fields": {"<field>": <value>, ...}}

The type tag is looked up in ``REGISTRY``, an explicit table of allowed classes; nothing is ever
imported by name. Supported field types: ``str``, ``int``, ``float``, ``bool``, ``bytes``,
``None``, unions of those (``str | None``) and tuples of them (``tuple[str, ...]`` or fixed
``tuple[int, str]``). A new field or message class needs no change here beyond listing the class
in ``MESSAGE_CLASSES``; an unsupported field type fails at import time.

``bytes`` travel as msgpack ``bin`` (no base64): ``encode`` copies them once into a buffer sized
up front (plus msgpack's final copy into the returned ``bytes``), ``decode`` makes one ``bytes``
object per value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Union

import msgpack

from gpu_workers.messages import (
    ShardDone,
    ShardFailed,
    ShardStarted,
    ShardTask,
    StopWorker,
    WorkerConfig,
    WorkerReady,
    WorkerStartFailed,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MESSAGE_CLASSES",
    "REGISTRY",
    "WIRE_VERSION",
    "WireError",
    "decode",
    "encode",
]

WIRE_VERSION: Final = 1
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024

#: Every class that may cross the wire. Add new message classes here (a test checks that every
#: dataclass in ``gpu_workers.messages`` is listed).
MESSAGE_CLASSES: Final[tuple[type, ...]] = (
    WorkerConfig,
    ShardTask,
    StopWorker,
    WorkerReady,
    WorkerStartFailed,
    ShardStarted,
    ShardDone,
    ShardFailed,
)

_ENVELOPE_KEYS: Final = frozenset({"v", "type", "fields"})


class WireError(ValueError):
    """The bytes (or the message to encode) are not a valid message of this protocol."""


# A checker takes (value, where, decoding) and returns the value to keep, or raises WireError.
# ``decoding`` is True for data off the wire, where msgpack arrays (lists) become tuples; when
# encoding, a list where a tuple is declared is refused, since it would not round-trip equal.
_Checker = Callable[[Any, str, bool], Any]


def _type_name(value: object) -> str:
    return type(value).__name__


def _describe(hint: Any) -> str:
    """A type hint as a reader would write it: ``str | None``, ``tuple[int, ...]``, ``bytes``."""
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return " | ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is not None:
        return str(hint).replace("typing.", "")
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _scalar_checker(kind: type) -> _Checker:
    """Exact-type check; bool is never an int, and an int (not bool) is accepted as a float."""
    if kind is float:

        def check_float(value: Any, where: str, decoding: bool) -> Any:
            if isinstance(value, float):
                return value
            if isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            raise WireError(f"{where}: expected float, got {_type_name(value)}")

        return check_float
    if kind is int:

        def check_int(value: Any, where: str, decoding: bool) -> Any:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise WireError(f"{where}: expected int, got {_type_name(value)}")

        return check_int
    if kind is type(None):

        def check_none(value: Any, where: str, decoding: bool) -> Any:
            if value is None:
                return None
            raise WireError(f"{where}: expected None, got {_type_name(value)}")

        return check_none
    if kind in (str, bytes, bool):

        def check_exact(value: Any, where: str, decoding: bool) -> Any:
            if isinstance(value, kind):
                return value
            raise WireError(f"{where}: expected {kind.__name__}, got {_type_name(value)}")

        return check_exact
    raise TypeError(f"unsupported field type for the wire: {_describe(kind)}")


def _checker(hint: Any) -> _Checker:
    """Build the checker for one (resolved) type hint; TypeError if the wire cannot carry it."""
    origin = typing.get_origin(hint)
    if origin is None:
        return _scalar_checker(hint)
    args = typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        options = [_checker(arg) for arg in args]
        expected = _describe(hint)

        def check_union(value: Any, where: str, decoding: bool) -> Any:
            for option in options:
                try:
                    return option(value, where, decoding)
                except WireError:
                    continue
            raise WireError(f"{where}: expected {expected}, got {_type_name(value)}")

        return check_union
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _checker(args[0])

            def check_var_tuple(value: Any, where: str, decoding: bool) -> Any:
                _check_sequence(value, where, decoding)
                return tuple(item(v, f"{where}[{i}]", decoding) for i, v in enumerate(value))

            return check_var_tuple
        if args == ((),):  # tuple[()]: always empty
            args = ()
        items = [_checker(arg) for arg in args]

        def check_fixed_tuple(value: Any, where: str, decoding: bool) -> Any:
            _check_sequence(value, where, decoding)
            if len(value) != len(items):
                raise WireError(f"{where}: expected {len(items)} items, got {len(value)}")
            return tuple(
                check(v, f"{where}[{i}]", decoding) for i, (check, v) in enumerate(zip(items, value, strict=True))
            )

        return check_fixed_tuple
    raise TypeError(f"unsupported field type for the wire: {_describe(hint)}")


def _check_sequence(value: Any, where: str, decoding: bool) -> None:
    if isinstance(value, tuple) or (decoding and isinstance(value, list)):
        return
    raise WireError(f"{where}: expected tuple, got {_type_name(value)}")


@dataclasses.dataclass(frozen=True)
class _Schema:
    """How one message class crosses the wire: its class and a checker per field, in order."""

    cls: type
    fields: dict[str, _Checker]


def _schema(cls: type) -> _Schema:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    checkers: dict[str, _Checker] = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            raise TypeError(f"{cls.__name__}.{field.name}: init=False fields cannot be decoded")
        try:
            checkers[field.name] = _checker(hints[field.name])
        except TypeError as error:
            raise TypeError(f"{cls.__name__}.{field.name}: {error}") from None
    return _Schema(cls, checkers)


def _build_registry(classes: tuple[type, ...]) -> dict[str, _Schema]:
    registry: dict[str, _Schema] = {}
    for cls in classes:
        if cls.__name__ in registry:
            raise TypeError(f"two message classes are named {cls.__name__}")
        registry[cls.__name__] = _schema(cls)
    return registry


#: Type tag (class name) -> schema, for the classes in ``MESSAGE_CLASSES`` only.
REGISTRY: Final[Mapping[str, _Schema]] = types.MappingProxyType(_build_registry(MESSAGE_CLASSES))


def _bytes_in(values: Iterable[Any]) -> int:
    """Total length of the bytes values, looking into tuples (a size hint for the buffer)."""
    total = 0
    for value in values:
        if isinstance(value, bytes):
            total += len(value) + 5
        elif isinstance(value, tuple):
            total += _bytes_in(value)
    return total


def encode(message: object) -> bytes:
    """Serialise a registered message to msgpack bytes; WireError if its fields do not match
    their type hints (so a bad message fails at the sender, not at the receiver)."""
    name = type(message).__name__
    schema = REGISTRY.get(name)
    if schema is None or schema.cls is not type(message):
        raise WireError(f"cannot encode {type(message).__qualname__}: not a registered message class")
    fields = {field: check(getattr(message, field), f"{name}.{field}", False) for field, check in schema.fields.items()}
    # Sized up front for the bytes it carries, so msgpack's buffer never grows by copying: the
    # image bytes are copied once into the buffer and once into the returned bytes object.
    packer = msgpack.Packer(use_bin_type=True, buf_size=1024 + _bytes_in(fields.values()))
    try:
        return packer.pack({"v": WIRE_VERSION, "type": name, "fields": fields})
    except (ValueError, TypeError, OverflowError) as error:  # e.g. an int beyond 64 bits
        raise WireError(f"cannot encode {name}: {error}") from None


def _short(value: object) -> str:
    """``repr`` cut short, for error messages about untrusted values."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _listing(items: list[str]) -> str:
    """The first few items, comma-separated (an attacker may send thousands)."""
    shown = ", ".join(items[:10])
    return shown if len(items) <= 10 else f"{shown} and {len(items) - 10} more"


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} is not allowed")


def _unpack(data: bytes | bytearray | memoryview, max_bytes: int) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"expected bytes to decode, got {_type_name(data)}")
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise WireError(f"message of {size} bytes is larger than the limit of {max_bytes} bytes")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            timestamp=0,
        )
    except WireError:
        raise
    except (ValueError, TypeError, OverflowError, BufferError, msgpack.UnpackException) as error:
        # ValueError covers truncated data, trailing bytes, bad UTF-8, too deep nesting, strict
        # map keys and bad timestamps; the others are there for safety.
        reason = str(error) or type(error).__name__
        raise WireError(f"not a valid msgpack message ({type(error).__name__}: {reason})") from None


def decode(data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Parse bytes made by ``encode`` back into the message; WireError for anything else."""
    envelope = _unpack(data, max_bytes)
    if not isinstance(envelope, dict):
        raise WireError(f"message must be a map, got {_type_name(envelope)}")
    keys = set(envelope)
    if keys != _ENVELOPE_KEYS:
        problems = []
        if missing := sorted(_ENVELOPE_KEYS - keys):
            problems.append(f"missing key(s) {', '.join(missing)}")
        if unexpected := sorted(_short(key) for key in keys - _ENVELOPE_KEYS):
            problems.append(f"unexpected key(s) {_listing(unexpected)}")
        raise WireError(f"bad envelope: {'; '.join(problems)}")
    version = envelope["v"]
    if type(version) is not int or version != WIRE_VERSION:
        raise WireError(f"unsupported protocol version {_short(version)} (this side speaks {WIRE_VERSION})")
    tag = envelope["type"]
    if not isinstance(tag, str):
        raise WireError(f"type tag must be a str, got {_type_name(tag)}")
    schema = REGISTRY.get(tag)
    if schema is None:
        raise WireError(f"unknown message type {_short(tag)}")
    fields = envelope["fields"]
    if not isinstance(fields, dict):
        raise WireError(f"{tag}: fields must be a map, got {_type_name(fields)}")
    missing = [name for name in schema.fields if name not in fields]
    if missing:
        raise WireError(f"{tag}: missing field(s) {', '.join(missing)}")
    unexpected = [_short(name) for name in fields if name not in schema.fields]
    if unexpected:
        raise WireError(f"{tag}: unexpected field(s) {_listing(unexpected)}")
    values = {name: check(fields[name], f"{tag}.{name}", True) for name, check in schema.fields.items()}
    try:
        return schema.cls(**values)
    except (TypeError, ValueError) as error:  # e.g. a __post_init__ check a message may add
        raise WireError(f"{tag}: {error}") from None
