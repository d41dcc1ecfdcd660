"""Unit tests of the pieces that need no worker: settings, sharding, the shard queue, errors, the store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from marshmallow import ValidationError

from gpu_workers.shard_queue import ShardQueue
from contract.batch import BatchSpec
from gpu_workers.sharding import split_into_shards
from schemas.generate import GenerateRequestSchema
from service.edge.errors import describe_validation_error
from service.jobs.image_store import ImageStore, content_type
from service.settings import load_settings


def shards_of(request_id: str = "r", prompts: int = 3, per_prompt: int = 2, seed: int = 10, max_batch: int = 4) -> list:
    spec = BatchSpec(tuple(f"p{i}" for i in range(prompts)), per_prompt, seed, None, 0.0, "base64", shard_size=max_batch)
    return split_into_shards(request_id, spec)


def test_flag_beats_environment_beats_default() -> None:
    assert load_settings([], {}).port == 8000
    assert load_settings([], {"SDXL_PORT": "9000"}).port == 9000
    assert load_settings(["--port", "9100"], {"SDXL_PORT": "9000"}).port == 9100
    assert load_settings(["--heartbeat-interval", "2.5"], {}).heartbeat_interval == 2.5


def test_bad_settings_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_settings(["--max-batch", "0"], {})
    assert "--max-batch must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_settings([], {"SDXL_WORKERS": "two"})
    assert "SDXL_WORKERS" in capsys.readouterr().err


def test_shards_are_contiguous_prompt_major_slices() -> None:
    shards = shards_of(prompts=3, per_prompt=2, seed=2**32 - 2, max_batch=4)
    assert [s.size for s in shards] == [4, 2]
    assert shards[0].prompts == ("p0", "p0", "p1", "p1")
    assert shards[1].prompts == ("p2", "p2")
    assert shards[0].seeds == (2**32 - 2, 2**32 - 1, 0, 1)  # seed + i wraps in the 32-bit space
    assert [s.first_index for s in shards] == [0, 4]


def test_shard_queue_takes_turns_between_requests() -> None:
    queue = ShardQueue()
    queue.add(shards_of("big", prompts=6, per_prompt=1, max_batch=1))
    queue.add(shards_of("small", prompts=1, per_prompt=1, max_batch=1))
    assert queue.images == 7
    order = [queue.pop().request_id for _ in range(3)]
    assert order == ["big", "small", "big"]
    assert queue.images == 4


def test_shard_queue_takes_turns_between_owners_then_their_requests() -> None:
    """Alice's two batches do not get two turns for Bob's one: owners first, then requests."""
    queue = ShardQueue()
    queue.add(shards_of("alice-1", prompts=4, per_prompt=1, max_batch=1), owner="alice")
    queue.add(shards_of("alice-2", prompts=4, per_prompt=1, max_batch=1), owner="alice")
    queue.add(shards_of("bob-1", prompts=2, per_prompt=1, max_batch=1), owner="bob")
    assert (queue.images_of("alice"), queue.images_of("bob"), queue.images) == (8, 2, 10)
    order = [queue.pop().request_id for _ in range(6)]
    assert order == ["alice-1", "bob-1", "alice-2", "bob-1", "alice-1", "alice-2"]
    assert (queue.images_of("alice"), queue.images_of("bob")) == (4, 0)
    lost = shards_of("bob-1", prompts=1, per_prompt=1, max_batch=1)[0]
    queue.put_front(lost)  # handed back: first, and still Bob's
    assert queue.images_of("bob") == 1 and queue.pop() is lost
    queue.forget("alice-1")
    assert queue.images_of("alice") == 2 and queue.owner_of("alice-1") == ""


def test_handed_back_shard_goes_first_and_drop_forgets_a_request() -> None:
    queue = ShardQueue()
    first, second = shards_of("a", prompts=2, per_prompt=1, max_batch=1)
    queue.add([second])
    queue.add(shards_of("b", prompts=1, per_prompt=1, max_batch=1))
    queue.put_front(first)
    assert queue.pop() is first
    assert queue.drop("b") == 1
    assert queue.pop() is second
    assert queue.pop() is None and queue.images == 0


def test_validation_errors_become_one_sentence_and_flat_fields() -> None:
    with pytest.raises(ValidationError) as caught:
        GenerateRequestSchema().load({"prompts": ["ok", " "], "num_images_per_prompt": 2.5})
    detail, fields = describe_validation_error(caught.value)
    assert set(fields) == {"prompts[1]", "num_images_per_prompt"}
    assert detail.startswith("Invalid request: ")
    assert "prompts[1]: Prompts must not be blank." in detail


def test_image_store_round_trip_and_path_safety(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", retention_seconds=60)
    image_id = store.save(b"\x89PNG fake", "png")
    assert len(image_id) == 36 and image_id.endswith(".png")
    assert store.path_for(image_id).read_bytes() == b"\x89PNG fake"
    assert store.path_for(image_id[:32]) == store.path_for(image_id), "a bare id (rows from before formats) is a PNG"
    webp = store.save(b"RIFF fake", "webp")
    assert store.path_for(webp).name == webp and content_type(webp) == "image/webp"
    assert store.path_for(webp[:32] + ".png") is None, "the extension is part of the name"
    with pytest.raises(ValueError):
        store.save(b"x", "exe")
    for hostile in ("../" + image_id, "/etc/passwd", image_id.upper(), image_id + "/..", "%2e%2e", image_id[:32] + ".gif", image_id + ".png"):
        assert store.path_for(hostile) is None
    store.remove_all([webp])
    old = time.time() - 120
    os.utime(store.path_for(image_id), (old, old))  # a file's age does not matter: its job's does
    assert store.sweep({image_id}) == 0 and store.path_for(image_id) is not None
    assert store.sweep(set()) == 1, "an image no job names goes"
    assert store.path_for(image_id) is None


@pytest.mark.parametrize("transport", ["local", "redis"])
def test_the_scheduler_fits_the_seam_the_service_uses_over_either_transport(transport: str) -> None:
    import inspect

    from gpu_workers.backend import ShardBackend
    from gpu_workers.pool import local_workers
    from gpu_workers.redis_broker import redis_workers
    from gpu_workers.scheduler import EngineConfig, Scheduler

    config = EngineConfig(devices=("cpu",), model="tiny", model_cache="/nonexistent")
    engine = local_workers(config) if transport == "local" else redis_workers(config, "redis://127.0.0.1:1/0", "sdxl")
    assert isinstance(engine, ShardBackend) and isinstance(engine, Scheduler)
    for name, member in vars(ShardBackend).items():
        if inspect.isfunction(member) and not name.startswith("_"):
            expected = list(inspect.signature(member).parameters)
            assert list(inspect.signature(getattr(Scheduler, name)).parameters) == expected, name
