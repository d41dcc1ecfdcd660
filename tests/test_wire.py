"""Unit tests of gpu_workers.wire: round trips, and strict rejection of everything else."""

from __future__ import annotations

import dataclasses
import inspect
import os
import pickle
import random
import typing

import msgpack
import pytest

from gpu_workers import messages, wire
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
from gpu_workers.wire import WIRE_VERSION, WireError, decode, encode

IMAGE_SIZE = 1_400_000

EXAMPLES = [
    WorkerConfig(worker_id=0, device="cuda:0", model="sdxl-lightning", model_cache="/var/cache/models", cpu_threads=4),
    ShardTask(
        request_id="req-7f3a",
        shard_id=2,
        first_index=4,
        prompts=("a red fox in snow", "a lighthouse at dusk, ünïcödé ✓"),
        seeds=(42, 2**63 - 1),
        negative_prompt=None,
        guidance_scale=0.0,
    ),
    ShardTask(
        request_id="req-8",
        shard_id=0,
        first_index=0,
        prompts=("x",),
        seeds=(-1,),
        negative_prompt="blurry",
        guidance_scale=7.5,
        steps=4,
        width=512,
        height=512,
    ),
    StopWorker(),
    WorkerReady(worker_id=1, pid=12345, device="cuda:1", model="sdxl-lightning", load_seconds=12.75),
    WorkerStartFailed(worker_id=1, pid=12346, device="cuda:1", error="CUDA out of memory; try fewer workers"),
    ShardStarted(worker_id=0, request_id="req-7f3a", shard_id=2),
    ShardDone(worker_id=0, request_id="req-7f3a", shard_id=2, images=(), warnings=(), seconds=0.5),
    ShardFailed(worker_id=0, request_id="req-7f3a", shard_id=2, error="prompt too long"),
]


def envelope(type_: object = "ShardStarted", fields: object = None, v: object = WIRE_VERSION) -> dict:
    if fields is None:
        fields = {"worker_id": 0, "request_id": "r", "shard_id": 1}
    return {"v": v, "type": type_, "fields": fields}


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def ready_with(**changes: object) -> bytes:
    fields = {"worker_id": 1, "pid": 2, "device": "cpu", "model": "tiny", "load_seconds": 1.5, "device_name": "cpu"}
    fields.update(changes)
    return pack(envelope("WorkerReady", fields))


def started_with(**changes: object) -> bytes:
    fields = {"worker_id": 0, "request_id": "r", "shard_id": 1}
    fields.update(changes)
    return pack(envelope(fields=fields))


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    data = encode(message)
    assert isinstance(data, bytes)
    decoded = decode(data)
    assert type(decoded) is type(message)
    assert decoded == message
    for field in dataclasses.fields(message):
        assert type(getattr(decoded, field.name)) is type(getattr(message, field.name))


def test_every_message_class_has_a_round_trip_example() -> None:
    assert {type(m) for m in EXAMPLES} == set(wire.MESSAGE_CLASSES)


def test_shard_done_with_large_images() -> None:
    images = (os.urandom(IMAGE_SIZE), os.urandom(IMAGE_SIZE))
    message = ShardDone(
        worker_id=3, request_id="req-big", shard_id=1, images=images, warnings=("NSFW filter off",), seconds=3.25
    )
    data = encode(message)
    assert len(data) - 2 * IMAGE_SIZE < 1024
    decoded = decode(data)
    assert decoded == message
    assert all(type(image) is bytes for image in decoded.images)
    assert decoded.images[0] == images[0] and decoded.images[1] == images[1]
    assert isinstance(decoded.images, tuple) and isinstance(decoded.warnings, tuple)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode(EXAMPLES[1])
    assert decode(bytearray(data)) == EXAMPLES[1]
    assert decode(memoryview(data)) == EXAMPLES[1]


def test_int_is_accepted_as_float() -> None:
    decoded = decode(ready_with(load_seconds=3))
    assert decoded.load_seconds == 3.0 and type(decoded.load_seconds) is float


def test_encoding_is_the_documented_envelope() -> None:
    raw = msgpack.unpackb(encode(EXAMPLES[6]), raw=False)
    fields = {"worker_id": 0, "request_id": "req-7f3a", "shard_id": 2}
    assert raw == {"v": WIRE_VERSION, "type": "ShardStarted", "fields": fields}


# --- registry -----------------------------------------------------------------------------------


def test_every_dataclass_in_messages_is_registered() -> None:
    defined = {
        obj
        for _, obj in inspect.getmembers(messages, inspect.isclass)
        if dataclasses.is_dataclass(obj) and obj.__module__ == messages.__name__
    }
    assert defined, "messages.py defines no dataclasses?"
    assert defined == set(wire.MESSAGE_CLASSES)
    assert {schema.cls for schema in wire.REGISTRY.values()} == defined
    assert set(typing.get_args(messages.WorkerMessage)) <= defined


def test_encode_refuses_unregistered_class() -> None:
    @dataclasses.dataclass(frozen=True)
    class ShardStarted:  # same name as a real message, but not the registered class
        worker_id: int
        request_id: str
        shard_id: int

    with pytest.raises(WireError, match="not a registered message class"):
        encode(ShardStarted(0, "r", 1))
    with pytest.raises(WireError, match="not a registered message class"):
        encode({"worker_id": 0})


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (ShardStarted(worker_id=True, request_id="r", shard_id=1), r"ShardStarted\.worker_id: expected int, got bool"),
        (ShardStarted(worker_id=0, request_id=b"r", shard_id=1), r"ShardStarted\.request_id: expected str, got bytes"),
        (
            ShardDone(worker_id=0, request_id="r", shard_id=1, images=[b"x"], warnings=(), seconds=1.0),
            r"ShardDone\.images: expected tuple, got list",
        ),
        (
            ShardDone(worker_id=0, request_id="r", shard_id=1, images=("png",), warnings=(), seconds=1.0),
            r"ShardDone\.images\[0\]: expected bytes, got str",
        ),
        (ShardStarted(worker_id=2**64, request_id="r", shard_id=1), "cannot encode ShardStarted"),
        (ShardStarted(worker_id=0, request_id="\ud800", shard_id=1), "cannot encode ShardStarted"),
    ],
)
def test_encode_refuses_bad_field_values(message: object, match: str) -> None:
    with pytest.raises(WireError, match=match):
        encode(message)


# --- rejections ---------------------------------------------------------------------------------


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(WireError, ValueError)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not a valid msgpack message"),
        (b"\xc1", "not a valid msgpack message"),  # 0xc1 is never used in msgpack
        (encode(EXAMPLES[1])[:-3], "not a valid msgpack message"),  # truncated
        (encode(EXAMPLES[1]) + b"\x00", "not a valid msgpack message"),  # trailing bytes
        (b"\xdf\xff\xff\xff\xff", "not a valid msgpack message"),  # claims 4 billion entries
        (pack({1: 2}), "not a valid msgpack message"),  # int map key (strict_map_key)
        (pack(msgpack.ExtType(5, b"boom")), "extension type 5 is not allowed"),
        (b"\xa2\xff\xfe", "not a valid msgpack message"),  # str that is not UTF-8
    ],
)
def test_rejects_malformed_bytes(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode(data)


def test_rejects_non_bytes_input() -> None:
    with pytest.raises(WireError, match="expected bytes to decode, got str"):
        decode("not bytes")  # type: ignore[arg-type]


def test_rejects_pickle_payload() -> None:
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(WireError):
            decode(pickle.dumps(EXAMPLES[6], protocol=protocol))


def test_rejects_top_level_not_a_map() -> None:
    for value in ([1, 2], "ShardStarted", 7, None, b"\x00"):
        with pytest.raises(WireError, match="message must be a map"):
            decode(pack(value))


@pytest.mark.parametrize("version", [0, 2, -1, "1", 1.0, True, None])
def test_rejects_wrong_protocol_version(version: object) -> None:
    with pytest.raises(WireError, match="unsupported protocol version"):
        decode(pack(envelope(v=version)))


def test_rejects_bad_envelope_keys() -> None:
    with pytest.raises(WireError, match=r"bad envelope: missing key\(s\) fields$"):
        decode(pack({"v": WIRE_VERSION, "type": "StopWorker"}))
    extra = dict(envelope(), extra=1)
    with pytest.raises(WireError, match=r"bad envelope: unexpected key\(s\) 'extra'$"):
        decode(pack(extra))


@pytest.mark.parametrize("tag", ["os.system", "subprocess.Popen", "WorkerMessage", "shardstarted", "_Schema", ""])
def test_rejects_unknown_type_tag(tag: str) -> None:
    with pytest.raises(WireError, match="unknown message type"):
        decode(pack(envelope(type_=tag)))


def test_rejects_non_str_type_tag() -> None:
    with pytest.raises(WireError, match="type tag must be a str, got bytes"):
        decode(pack(envelope(type_=b"ShardStarted")))


def test_rejects_fields_not_a_map() -> None:
    with pytest.raises(WireError, match="fields must be a map, got list"):
        decode(pack(envelope(fields=[0, "r", 1])))


def test_rejects_missing_field() -> None:
    with pytest.raises(WireError, match=r"ShardStarted: missing field\(s\) shard_id"):
        decode(pack(envelope(fields={"worker_id": 0, "request_id": "r"})))


def test_rejects_missing_field_even_with_a_default() -> None:
    fields = {"request_id": "r", "shard_id": 0, "first_index": 0, "prompts": ["p"], "seeds": [1]}
    fields |= {"negative_prompt": None, "guidance_scale": 0.0, "width": 8, "height": 8}
    with pytest.raises(WireError, match=r"ShardTask: missing field\(s\) steps"):
        decode(pack(envelope("ShardTask", fields)))


def test_rejects_unexpected_field() -> None:
    with pytest.raises(WireError, match=r"ShardStarted: unexpected field\(s\) 'priority'"):
        decode(started_with(priority=1))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (started_with(worker_id=True), r"ShardStarted\.worker_id: expected int, got bool"),
        (started_with(worker_id=1.0), r"ShardStarted\.worker_id: expected int, got float"),
        (started_with(worker_id="0"), r"ShardStarted\.worker_id: expected int, got str"),
        (started_with(worker_id=None), r"ShardStarted\.worker_id: expected int, got NoneType"),
        (started_with(request_id=b"r"), r"ShardStarted\.request_id: expected str, got bytes"),
        (started_with(request_id=["r"]), r"ShardStarted\.request_id: expected str, got list"),
        (started_with(request_id={"a": 1}), r"ShardStarted\.request_id: expected str, got dict"),
        (ready_with(load_seconds=True), r"WorkerReady\.load_seconds: expected float, got bool"),
        (ready_with(load_seconds="1"), r"WorkerReady\.load_seconds: expected float, got str"),
        (ready_with(load_seconds=None), r"WorkerReady\.load_seconds: expected float, got NoneType"),
    ],
)
def test_rejects_wrong_scalar_type(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode(data)


def _task_fields(**changes: object) -> dict:
    fields = {
        "request_id": "r",
        "shard_id": 0,
        "first_index": 0,
        "prompts": ["a", "b"],
        "seeds": [1, 2],
        "negative_prompt": None,
        "guidance_scale": 1,
        "steps": 8,
        "width": 64,
        "height": 64,
        "image_format": "png",
        "quality": None,
    }
    fields.update(changes)
    return fields


def test_list_becomes_tuple_and_optional_accepts_both() -> None:
    task = decode(pack(envelope("ShardTask", _task_fields())))
    assert task.prompts == ("a", "b") and isinstance(task.prompts, tuple)
    assert task.seeds == (1, 2) and isinstance(task.seeds, tuple)
    assert task.guidance_scale == 1.0 and type(task.guidance_scale) is float
    assert decode(pack(envelope("ShardTask", _task_fields(negative_prompt="ugly")))).negative_prompt == "ugly"


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"prompts": "ab"}, r"ShardTask\.prompts: expected tuple, got str"),
        ({"prompts": {"a": "b"}}, r"ShardTask\.prompts: expected tuple, got dict"),
        ({"prompts": ["a", 2]}, r"ShardTask\.prompts\[1\]: expected str, got int"),
        ({"seeds": [1, True]}, r"ShardTask\.seeds\[1\]: expected int, got bool"),
        ({"seeds": [1, [2]]}, r"ShardTask\.seeds\[1\]: expected int, got list"),
        ({"negative_prompt": 5}, r"ShardTask\.negative_prompt: expected str \| None, got int"),
        ({"negative_prompt": b"x"}, r"ShardTask\.negative_prompt: expected str \| None, got bytes"),
    ],
)
def test_rejects_wrong_container_or_item_type(changes: dict, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode(pack(envelope("ShardTask", _task_fields(**changes))))


def test_rejects_non_bytes_image() -> None:
    fields = {"worker_id": 0, "request_id": "r", "shard_id": 1, "seconds": 1.0}
    fields |= {"images": [b"ok", "png"], "warnings": [], "receipts": [], "peak_memory_bytes": 0}
    with pytest.raises(WireError, match=r"ShardDone\.images\[1\]: expected bytes, got str"):
        decode(pack(envelope("ShardDone", fields)))


def test_rejects_timestamp_extension() -> None:
    data = msgpack.packb(envelope(fields={"worker_id": msgpack.Timestamp(1), "request_id": "r", "shard_id": 1}))
    with pytest.raises(WireError, match=r"ShardStarted\.worker_id: expected int, got Timestamp"):
        decode(data)


def test_rejects_data_over_size_limit() -> None:
    data = encode(EXAMPLES[1])
    assert decode(data, max_bytes=len(data)) == EXAMPLES[1]
    with pytest.raises(WireError, match="larger than the limit"):
        decode(data, max_bytes=len(data) - 1)


def test_default_size_limit_is_64_mib() -> None:
    assert wire.DEFAULT_MAX_BYTES == 64 * 1024 * 1024
    with pytest.raises(WireError, match=f"larger than the limit of {64 * 1024 * 1024} bytes"):
        decode(bytes(64 * 1024 * 1024 + 1))


def test_decode_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle must never be used by the wire")

    for name in ("loads", "load", "Unpickler", "_loads", "_load"):
        if hasattr(pickle, name):
            monkeypatch.setattr(pickle, name, forbidden)
    for message in EXAMPLES:
        assert decode(encode(message)) == message
    with pytest.raises(WireError):
        decode(b"\x80\x04\x95")  # start of a pickle stream


def test_mutated_bytes_give_a_message_or_wire_error() -> None:
    """Small deterministic fuzz: corrupted bytes never raise anything but WireError."""
    rng = random.Random(1234)
    originals = [encode(message) for message in EXAMPLES]
    for _ in range(3000):
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cut = rng.randint(0, len(data) + 1)
        try:
            decoded = decode(bytes(data[:cut]))
        except WireError:
            continue
        assert type(decoded) in wire.MESSAGE_CLASSES


# --- field types messages.py does not use yet (so a new field needs no change in wire.py) -------


@dataclasses.dataclass(frozen=True)
class FutureMessage:
    flag: bool
    pair: tuple[int, str]
    maybe: int | None
    optional_text: typing.Optional[str]  # noqa: UP045 (the old spelling must work too)
    blobs: tuple[bytes, ...]
    nothing: None
    empty: tuple[()]


FUTURE = FutureMessage(
    flag=True, pair=(3, "x"), maybe=None, optional_text="t", blobs=(b"\x00", b""), nothing=None, empty=()
)


@pytest.fixture
def future_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "REGISTRY", {**wire.REGISTRY, **wire._build_registry((FutureMessage,))})


def future_with(**changes: object) -> bytes:
    fields = {"flag": False, "pair": [1, "a"], "maybe": 7, "optional_text": None, "blobs": [], "nothing": None}
    fields |= {"empty": []}
    fields.update(changes)
    return pack(envelope("FutureMessage", fields))


def test_future_field_types_round_trip(future_registry: None) -> None:
    assert decode(encode(FUTURE)) == FUTURE
    decoded = decode(future_with())
    assert decoded == FutureMessage(False, (1, "a"), 7, None, (), None, ())


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"flag": 1}, r"FutureMessage\.flag: expected bool, got int"),
        ({"maybe": True}, r"FutureMessage\.maybe: expected int \| None, got bool"),
        ({"optional_text": 1}, r"FutureMessage\.optional_text: expected str \| None, got int"),
        ({"pair": [1]}, r"FutureMessage\.pair: expected 2 items, got 1"),
        ({"pair": [1, "a", 2]}, r"FutureMessage\.pair: expected 2 items, got 3"),
        ({"pair": ["a", 1]}, r"FutureMessage\.pair\[0\]: expected int, got str"),
        ({"empty": [1]}, r"FutureMessage\.empty: expected 0 items, got 1"),
        ({"nothing": 0}, r"FutureMessage\.nothing: expected None, got int"),
    ],
)
def test_future_field_types_are_checked(future_registry: None, changes: dict, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode(future_with(**changes))


@pytest.mark.parametrize("hint", [list[int], dict[str, int], set[str], typing.Any, object, complex, bytearray])
def test_unsupported_field_types_fail_when_registering(hint: object) -> None:
    cls = dataclasses.make_dataclass("Unsupported", [("value", hint)], frozen=True)
    with pytest.raises(TypeError, match=r"Unsupported\.value: unsupported field type"):
        wire._build_registry((cls,))


def test_error_messages_stay_short_for_hostile_input() -> None:
    with pytest.raises(WireError, match=r"unknown message type 'xxx.*\.\.\.$"):
        decode(pack(envelope(type_="x" * 100_000)))
    with pytest.raises(WireError, match=r"unsupported protocol version 'vvv.*\.\.\. \(this side"):
        decode(pack(envelope(v="v" * 100_000)))
    many = {f"f{i}": i for i in range(1000)}
    with pytest.raises(WireError, match=r"unexpected field\(s\) .* and 990 more$") as caught:
        decode(started_with(**many))
    assert len(str(caught.value)) < 300
