"""The job queue: validation, race-safe claims, heartbeats, cancel, resume, dead workers."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from agent.errors import NotFoundError, ValidationError
from agent.store import jobs
from agent.store.api import Store
from agent.store.models import Job, utcnow


def test_enqueue_validates_before_writing(store: Store) -> None:
    with pytest.raises(ValidationError, match="kind: 'train' is not one of"):
        jobs.enqueue(store, "train", {})
    with pytest.raises(ValidationError, match="config: expected a mapping"):
        jobs.enqueue(store, "ppo", ["iterations", 3])  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="config: not storable as JSON"):
        jobs.enqueue(store, "ppo", {"x": object()})
    with pytest.raises(ValidationError, match="over the limit"):
        jobs.enqueue(store, "ppo", {"x": "y" * (jobs.MAX_CONFIG_CHARS + 1)})
    assert jobs.list_jobs(store) == []
    job = jobs.enqueue(store, "ppo", {"iterations": 3})
    assert (job.status, job.progress, job.attempts, job.config) == (
        "queued",
        0.0,
        0,
        {"iterations": 3},
    )


def test_claim_takes_the_oldest_once(store: Store) -> None:
    first = jobs.enqueue(store, "sft", {})
    second = jobs.enqueue(store, "ppo", {})
    got = jobs.claim(store, "w1")
    assert got is not None and got.id == first.id
    assert (got.status, got.worker, got.attempts) == ("running", "w1", 1)
    assert got.heartbeat_at is not None and got.started_at is not None
    again = jobs.claim(store, "w2")
    assert again is not None and again.id == second.id
    assert jobs.claim(store, "w3") is None


def test_concurrent_claims_never_share_a_job(store: Store) -> None:
    ids = [jobs.enqueue(store, "eval", {"i": i}).id for i in range(6)]
    claimed: list[int] = []
    lock = threading.Lock()

    def grab(name: str) -> None:
        while (job := jobs.claim(store, name)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=grab, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == ids  # each job exactly once


def test_heartbeat_progress_and_cancel(store: Store) -> None:
    job = jobs.enqueue(store, "ppo", {})
    jobs.claim(store, "w1")
    assert jobs.heartbeat(store, job.id, "w1", progress=0.25, message="step 1/4") is False
    row = jobs.get_job(store, job.id)
    assert (row.progress, row.message) == (0.25, "step 1/4")
    assert jobs.request_cancel(store, job.id).cancel_requested
    assert jobs.get_job(store, job.id).status == "running"  # it stops at its next checkpoint
    assert jobs.heartbeat(store, job.id, "w1", progress=7) is True
    assert jobs.get_job(store, job.id).progress == 1.0  # clamped
    with pytest.raises(jobs.LeaseLost):
        jobs.heartbeat(store, job.id, "someone-else")
    jobs.finish(store, job.id, "w1", "cancelled")
    row = jobs.get_job(store, job.id)
    assert row.status == "cancelled" and row.finished_at is not None
    with pytest.raises(ValidationError, match="already cancelled; nothing to cancel"):
        jobs.request_cancel(store, job.id)


def test_cancel_a_queued_job_at_once_and_resume_it(store: Store) -> None:
    job = jobs.enqueue(store, "sft", {})
    assert jobs.request_cancel(store, job.id).status == "cancelled"
    assert jobs.claim(store, "w1") is None
    assert jobs.resume(store, job.id).status == "queued"
    with pytest.raises(ValidationError, match="only a cancelled or failed job can be resumed"):
        jobs.resume(store, job.id)
    with pytest.raises(NotFoundError, match="no job with id 999"):
        jobs.resume(store, 999)


def _age_heartbeat(store: Store, job_id: int, seconds: float) -> None:
    with store.transaction() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


def test_a_dead_workers_job_is_requeued_then_given_up(store: Store) -> None:
    job = jobs.enqueue(store, "ppo", {})
    jobs.claim(store, "dead")
    assert jobs.requeue_stale(store, lease_s=60) == []  # its heartbeat is fresh
    _age_heartbeat(store, job.id, 120)
    assert jobs.requeue_stale(store, lease_s=60, max_attempts=2) == [job.id]
    row = jobs.get_job(store, job.id)
    assert row.status == "queued" and "stopped sending heartbeats" in row.message
    with pytest.raises(jobs.LeaseLost):  # the dead worker, waking up, cannot write any more
        jobs.heartbeat(store, job.id, "dead")
    again = jobs.claim(store, "alive")
    assert again is not None and again.attempts == 2
    _age_heartbeat(store, job.id, 120)
    jobs.requeue_stale(store, lease_s=60, max_attempts=2)
    row = jobs.get_job(store, job.id)
    assert row.status == "failed" and "gave up after 2 attempts" in (row.error or "")


def test_release_puts_a_running_job_back(store: Store) -> None:
    job = jobs.enqueue(store, "reward", {})
    jobs.claim(store, "w1")
    jobs.release(store, job.id, "w1", "worker stopped")
    row = jobs.get_job(store, job.id)
    assert (row.status, row.worker, row.message) == ("queued", None, "worker stopped")
