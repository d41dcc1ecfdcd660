"""The job database on its own: what a restart reads back must be exactly what was recorded."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gpu_workers.sharding import split_into_shards
from contract.batch import BatchSpec
from service.jobs.job_db import CANCELLED, DONE, QUEUED, RUNNING, JobDatabase

SPEC = BatchSpec(
    prompts=("a lighthouse", "a storm"),
    num_images_per_prompt=3,
    seed=2**32 - 2,
    negative_prompt=None,
    guidance_scale=0.0,
    return_format="url",
    shard_size=4,
)


def test_spec_survives_the_database_and_cuts_the_same_shards(tmp_path: Path) -> None:
    db = JobDatabase(tmp_path / "jobs.sqlite3")
    db.create("job1", SPEC)
    db.close()
    reopened = JobDatabase(tmp_path / "jobs.sqlite3")
    record = reopened.get("job1")
    assert record is not None and record.spec == SPEC and record.state == QUEUED
    assert record.spec.seeds == (2**32 - 2, 2**32 - 1, 0, 1, 2, 3)
    assert split_into_shards("job1", record.spec) == split_into_shards("job1", SPEC)
    assert [s.size for s in split_into_shards("job1", record.spec)] == [4, 2]


def test_shards_are_recorded_once_and_the_state_moves_forward_only(tmp_path: Path) -> None:
    db = JobDatabase(tmp_path / "jobs.sqlite3")
    db.create("job1", SPEC)
    assert db.record_shard("job1", 0, ["a" * 32, "b" * 32, "c" * 32, "d" * 32], ["prompt 0 was truncated"]) == 4
    assert db.record_shard("job1", 0, ["a" * 32, "b" * 32, "c" * 32, "d" * 32], ["prompt 0 was truncated"]) == 4  # a duplicate
    record = db.get("job1")
    assert record.state == RUNNING and record.images_done == 4 and record.warnings == ("prompt 0 was truncated",)
    assert [job.job_id for job in db.unfinished()] == ["job1"]
    db.finish("job1", CANCELLED, "Cancelled.")
    db.finish("job1", DONE)  # the running shard ending after the cancel does not undo it
    record = db.get("job1")
    assert record.state == CANCELLED and record.detail == "Cancelled." and record.finished_at is not None
    assert db.unfinished() == []
    assert db.image_ids("job1") == {0: "a" * 32, 1: "b" * 32, 2: "c" * 32, 3: "d" * 32}


def test_expired_jobs_go_with_their_image_rows_and_wal_is_on(tmp_path: Path) -> None:
    db = JobDatabase(tmp_path / "jobs.sqlite3")
    db.create("old", SPEC)
    db.create("running", SPEC)
    db.record_shard("old", 0, ["e" * 32], [])
    db.finish("old", DONE)
    ended = db.get("old").finished_at
    assert db.remove_finished_before(ended - 1) == {}
    assert db.remove_finished_before(ended + 1) == {"old": ["e" * 32]}
    assert db.get("old") is None and db.get("running") is not None
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as raw:
        assert raw.execute("SELECT COUNT(*) FROM job_images").fetchone()[0] == 0
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_database_from_before_formats_opens_and_reads_the_same(tmp_path: Path) -> None:
    """A database written by the release before formats, receipts and idempotency keys: opening it
    adds the columns, its rows read as PNG jobs of the default size, its bare image ids stay valid."""
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, spec TEXT NOT NULL, images_total INTEGER NOT NULL,
            images_done INTEGER NOT NULL DEFAULT 0, detail TEXT, warnings TEXT NOT NULL DEFAULT '[]',
            created_at REAL NOT NULL, updated_at REAL NOT NULL, finished_at REAL);
        CREATE TABLE job_images (job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE, idx INTEGER NOT NULL,
            image_id TEXT NOT NULL, PRIMARY KEY (job_id, idx));
        """
    )
    old_spec = '{"prompts": ["a"], "num_images_per_prompt": 1, "seed": 1, "negative_prompt": null, "guidance_scale": 0.0, "return_format": "url", "shard_size": 4, "steps": 8}'
    old.execute("INSERT INTO jobs VALUES ('old', 'done', ?, 1, 1, NULL, '[]', 1.0, 2.0, 2.0)", (old_spec,))
    old.execute("INSERT INTO job_images VALUES ('old', 0, ?)", ("a" * 32,))
    old.commit()
    old.close()
    db = JobDatabase(path)
    record = db.get("old")
    assert record is not None and (record.spec.image_format, record.spec.size, record.spec.quality) == ("png", "1024x576", None)
    [image] = db.stored_images("old")
    assert (image.index, image.name, image.sha256, image.receipt) == (0, "a" * 32, None, None)
    assert [job.job_id for job in db.list_jobs("", 10)] == ["old"]
    db.close()
    JobDatabase(path).close()  # opening it again changes nothing
