"""The job queue behind `rlchat worker` and the dashboard's Jobs tab, in the `jobs` table.

    job = enqueue(store, "ppo", {"iterations": 20}, created_by=admin_id)   # the web app
    job = claim(store, worker="gpu-box:4242")                               # a worker
    cancel = heartbeat(store, job.id, "gpu-box:4242", progress=0.4)          # heartbeat + progress
    finish(store, job.id, "gpu-box:4242", "succeeded")

A claimed job is leased: its worker stamps `heartbeat_at` every few seconds. A job whose
heartbeat is older than the lease (its worker was killed) goes back to the queue with
`requeue_stale`, and the next claim resumes it from its training run's last checkpoint.
Claims are race-safe: on PostgreSQL the candidate row is locked with FOR UPDATE SKIP LOCKED;
on SQLite every write transaction is BEGIN IMMEDIATE, so two claims serialise. Either way the
UPDATE re-checks `status = 'queued'`, so a job is never handed to two workers.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from agent.errors import NotFoundError, ValidationError
from agent.store.api import Store
from agent.store.models import JOB_KINDS, Job, utcnow

FINISHED = ("succeeded", "failed", "cancelled")
MAX_CONFIG_CHARS = 100_000
"""Largest job config accepted, as JSON."""
MESSAGE_CHARS = 2_000
"""Progress messages are cut to this length."""


class LeaseLost(Exception):
    """The job is no longer running under this worker (requeued after a missed heartbeat)."""


def enqueue(store: Store, kind: str, config: dict[str, Any], created_by: int | None = None) -> Job:
    """Queue a job; `config` is the job's config as a mapping (validated by the caller's class)."""
    if kind not in JOB_KINDS:
        raise ValidationError(f"kind: {kind!r} is not one of {', '.join(JOB_KINDS)}")
    if not isinstance(config, dict):
        raise ValidationError(f"config: expected a mapping of field: value, got {config!r}")
    try:
        size = len(json.dumps(config))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"config: not storable as JSON ({exc})") from exc
    if size > MAX_CONFIG_CHARS:
        raise ValidationError(
            f"config: {size:,} characters as JSON is over the limit of {MAX_CONFIG_CHARS:,}"
        )
    with store.transaction() as s:
        job = Job(kind=kind, config=config, created_by=created_by, status="queued")
        s.add(job)
        s.flush()
        return job


def claim(store: Store, worker: str) -> Job | None:
    """Take the oldest queued job for `worker` (status running, lease started), or None."""
    now = utcnow()
    with store.transaction() as s:
        candidate = s.scalar(
            select(Job.id)
            .where(Job.status == "queued")
            .order_by(Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if candidate is None:
            return None
        taken = s.execute(
            update(Job)
            .where(Job.id == candidate, Job.status == "queued")
            .values(
                status="running",
                worker=worker,
                heartbeat_at=now,
                started_at=now,
                finished_at=None,
                attempts=Job.attempts + 1,
                error=None,
            )
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            return None
        return s.get(Job, candidate, populate_existing=True)


def heartbeat(
    store: Store,
    job_id: int,
    worker: str,
    *,
    progress: float | None = None,
    message: str | None = None,
    training_run_id: int | None = None,
) -> bool:
    """Heartbeat (and optionally progress) of a running job; returns whether a cancel is asked.

    Raises `LeaseLost` when the job is no longer running under `worker`.
    """
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = min(max(float(progress), 0.0), 1.0)
    if message is not None:
        values["message"] = message[:MESSAGE_CHARS]
    if training_run_id is not None:
        values["training_run_id"] = training_run_id
    with store.transaction() as s:
        done = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.worker == worker)
            .values(**values)
            .returning(Job.cancel_requested)
        ).first()
    if done is None:
        raise LeaseLost(f"job {job_id} is no longer running under worker {worker}")
    return bool(done[0])


def finish(
    store: Store, job_id: int, worker: str, status: str, *, error: str | None = None
) -> None:
    """Record the end of a job this worker ran (succeeded / failed / cancelled)."""
    if status not in FINISHED:
        raise ValidationError(f"status: {status!r} is not one of {', '.join(FINISHED)}")
    values: dict[str, Any] = {"status": status, "error": error, "finished_at": utcnow()}
    if status == "succeeded":
        values["progress"] = 1.0
    with store.transaction() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.worker == worker)
            .values(**values)
        )


def release(store: Store, job_id: int, worker: str, message: str) -> None:
    """Give a running job back to the queue (its worker is stopping); it resumes next claim."""
    with store.transaction() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.worker == worker)
            .values(status="queued", worker=None, message=message[:MESSAGE_CHARS])
        )


def request_cancel(store: Store, job_id: int) -> Job:
    """Cancel a queued job at once; ask a running one to stop at its next checkpoint."""
    with store.transaction() as s:
        job = _get(s, job_id)
        if job.status == "queued":
            job.status, job.finished_at = "cancelled", utcnow()
        elif job.status == "running":
            job.cancel_requested = True
        else:
            raise ValidationError(f"job {job_id}: it has already {job.status}; nothing to cancel")
        return job


def resume(store: Store, job_id: int) -> Job:
    """Queue a cancelled or failed job again; the worker continues its run from a checkpoint."""
    with store.transaction() as s:
        job = _get(s, job_id)
        if job.status not in ("cancelled", "failed"):
            raise ValidationError(
                f"job {job_id}: only a cancelled or failed job can be resumed; it is {job.status}"
            )
        job.status, job.cancel_requested, job.error = "queued", False, None
        job.worker, job.finished_at = None, None
        return job


def requeue_stale(store: Store, lease_s: float, max_attempts: int = 3) -> list[int]:
    """Running jobs whose heartbeat is older than `lease_s`: back to the queue (or failed after
    `max_attempts` claims, or cancelled when a cancel was asked). Returns their ids."""
    cutoff = utcnow() - timedelta(seconds=lease_s)
    with store.transaction() as s:
        stale = list(
            s.scalars(
                select(Job)
                .where(Job.status == "running", Job.heartbeat_at < cutoff)
                .with_for_update(skip_locked=True)
            )
        )
        for job in stale:
            lost = f"worker {job.worker} stopped sending heartbeats (lease of {lease_s:g} s)"
            if job.cancel_requested:
                job.status, job.finished_at, job.error = "cancelled", utcnow(), lost
            elif job.attempts >= max_attempts:
                job.status, job.finished_at = "failed", utcnow()
                job.error = f"{lost}; gave up after {job.attempts} attempts"
            else:
                job.status, job.message = "queued", f"requeued: {lost}"
            job.worker = None
        return [job.id for job in stale]


def get_job(store: Store, job_id: int) -> Job:
    with store.reading() as s:
        return _get(s, job_id)


def list_jobs(store: Store, limit: int = 100) -> list[Job]:
    """The newest jobs first."""
    with store.reading() as s:
        return list(s.scalars(select(Job).order_by(Job.id.desc()).limit(limit)))


def _get(s: Any, job_id: int) -> Job:
    job = s.get(Job, job_id)
    if job is None:
        raise NotFoundError(f"no job with id {job_id}; the Jobs table lists them")
    return job
