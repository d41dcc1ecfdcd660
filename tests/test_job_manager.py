"""The job manager against a scripted backend: what it stores and tells, whatever the timing."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gpu_workers.ledger import RequestLedger
from gpu_workers.messages import ShardDone
from service.jobs.image_store import ImageStore
from contract.batch import BatchSpec
from service.jobs.job_db import DONE, JobDatabase
from service.jobs.manager import JobEnded, JobManager, ShardStored


class ScriptedBackend:
    """Takes requests into a real ledger; the test delivers results by hand."""

    def __init__(self) -> None:
        self.ledger = RequestLedger()

    @property
    def pending_images(self) -> int:
        return sum(len(handle.shards) for handle in self.ledger.requests.values())

    def submit(self, request_id, shards, owner=""):
        return self.ledger.add(request_id, shards, owner)

    def abandon(self, request_id: str) -> None:
        self.ledger.abandon(request_id)


async def test_results_that_arrive_together_are_all_stored_before_the_job_ends(tmp_path: Path) -> None:
    backend = ScriptedBackend()
    jobs = JobManager(JobDatabase(tmp_path / "jobs.sqlite3"), ImageStore(tmp_path / "images", 3600), backend)
    spec = BatchSpec(("a", "b", "c"), 1, 7, None, 0.0, "base64", shard_size=1)
    job, listener = await jobs.create("job1", spec)
    handle = backend.ledger.requests["job1"]
    # All three results arrive at once (a result stream read 16 at a time): the ledger marks every
    # shard finished before the job manager has stored the first one.
    for shard in list(handle.shards):
        backend.ledger.queue.pop()
        backend.ledger.dispatched(shard)
        backend.ledger.shard_done(ShardDone(0, "job1", shard.shard_id, (f"png {shard.shard_id}".encode(),), (), 0.1))
    assert handle.complete
    events = [await asyncio.wait_for(listener.get(), 10) for _ in range(4)]
    assert [type(e) for e in events] == [ShardStored, ShardStored, ShardStored, JobEnded]
    assert sorted(e.first_index for e in events[:3]) == [0, 1, 2]
    assert events[3].state == DONE
    record = await jobs.record("job1")
    assert record.state == DONE and record.images_done == 3


async def test_a_job_written_as_the_stop_begins_is_told_it_is_interrupted_and_resumes(tmp_path: Path) -> None:
    """A request admitted just before a stop writes its row while ``stop`` tells the running jobs:
    its handler must hear that it is interrupted (503, the job resumes), not wait until the
    shutdown cuts it off without an answer; and the job must not reach the engine that stops."""
    backend = ScriptedBackend()
    db = JobDatabase(tmp_path / "jobs.sqlite3")
    jobs = JobManager(db, ImageStore(tmp_path / "images", 3600), backend)
    spec = BatchSpec(("a", "b"), 1, 7, None, 0.0, "base64", shard_size=1)
    jobs.reserve(spec.total_images)
    written = asyncio.Event()
    create_row = db.create

    def slow_create(*args):  # the row is written while the stop runs
        record = create_row(*args)
        asyncio.run_coroutine_threadsafe(_set(written), loop).result()
        return record

    async def _set(event: asyncio.Event) -> None:
        event.set()
        await stopped.wait()

    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    db.create = slow_create
    creating = asyncio.create_task(jobs.create("late", spec))
    await written.wait()
    await jobs.stop()
    stopped.set()
    job, listener = await asyncio.wait_for(creating, 10)
    ended = await asyncio.wait_for(listener.get(), 10)
    assert isinstance(ended, JobEnded) and ended.interrupted and ended.status == 503
    assert "late" not in backend.ledger.requests and jobs.pending_images == 0
    assert [record.job_id for record in await db.run(db.unfinished)] == ["late"]
