"""`rlchat worker` on a tiny model: runs a queued PPO job as the CLI does, records progress,
cancels at a checkpoint, resumes, and picks up the job of a worker that was killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic import fill_prompts

from agent.config import Settings
from agent.errors import ConfigError
from agent.store import jobs
from agent.store.api import Store
from rl import worker
from rl.runs import Run, read_metrics
from rlchat.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
FAST = worker.WorkerConfig(poll_s=0.1, heartbeat_s=0.05, lease_s=0.3, name="test-worker")


def ppo_config(tiny_model_dir: Path, **extra: object) -> dict[str, object]:
    values: dict[str, object] = dict(
        policy=str(tiny_model_dir),
        reward="rl.oracles:follow_up",
        iterations=4,
        checkpoint_every=2,
        batch_size=4,
        mini_batch_size=2,
        max_new_tokens=6,
        eval_prompts=2,
        device="cpu",
    )
    return {**values, **extra}


def test_configs_are_checked_as_the_cli_checks_them() -> None:
    with pytest.raises(ConfigError, match=r"Config\.iterations: invalid literal"):
        worker.job_config("ppo", {"iterations": "many"})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) iteratons"):
        worker.job_config("ppo", {"iteratons": 3})
    with pytest.raises(ConfigError, match="kind: 'train' is not a job kind"):
        worker.job_config("train", {})
    values = worker.parse_config("pipeline", "deploy: false\nppo: {iterations: 2}", ["ppo.seed=3"])
    assert values == {"deploy": False, "ppo": {"iterations": 2, "seed": 3}}
    assert worker.parse_config("ppo", "", ["iterations=5"]) == {"iterations": 5}
    with pytest.raises(ConfigError, match="must look like key=value"):
        worker.parse_config("ppo", "", ["iterations"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        worker.parse_config("ppo", "- a\n- b", [])
    with pytest.raises(ConfigError, match="lease_s"):
        worker.WorkerConfig(heartbeat_s=5, lease_s=6)


def test_worker_runs_a_ppo_job_with_progress(
    tiny_model_dir: Path, sqlite_settings: Settings, sqlite_store: Store
) -> None:
    fill_prompts(sqlite_store)
    job = jobs.enqueue(sqlite_store, "ppo", ppo_config(tiny_model_dir, name="from-the-queue"))
    done = worker.run_next(sqlite_store, sqlite_settings, FAST)
    assert done is not None and done.id == job.id
    assert (done.status, done.progress, done.error, done.attempts) == ("succeeded", 1.0, None, 1)
    assert done.message.startswith("done: {'version_id':")
    run = sqlite_store.get_run(done.training_run_id)
    assert run.kind == "ppo" and run.status == "succeeded"
    version = sqlite_store.get_model_version(run.output_version_id)
    assert (version.kind, version.name) == ("ppo", "from-the-queue")
    history = read_metrics(run.log_path)
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    assert all("reward/mean" in row and "kl/mean" in row for row in history)
    assert worker.run_next(sqlite_store, sqlite_settings, FAST) is None  # the queue is empty


def test_cancel_stops_at_the_next_checkpoint_and_resume_finishes(
    tiny_model_dir: Path,
    sqlite_settings: Settings,
    sqlite_store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fill_prompts(sqlite_store)
    job = jobs.enqueue(sqlite_store, "ppo", ppo_config(tiny_model_dir, iterations=6))
    original = Run.log

    def log_and_cancel_at_step_1(self: Run, step: int, metrics: dict[str, float]) -> None:
        if step == 1 and not jobs.get_job(sqlite_store, job.id).cancel_requested:
            jobs.request_cancel(sqlite_store, job.id)  # as the dashboard's Cancel button does
            time.sleep(0.5)  # several heartbeats: the worker has seen it
        original(self, step, metrics)

    monkeypatch.setattr(Run, "log", log_and_cancel_at_step_1)
    cancelled = worker.run_next(sqlite_store, sqlite_settings, FAST)
    assert cancelled is not None and cancelled.status == "cancelled"
    run = sqlite_store.get_run(cancelled.training_run_id)
    assert run.status == "cancelled" and "resumable from" in (run.error or "")
    checkpoints = sorted(p.name for p in (Path(run.log_path) / "checkpoints").glob("iter-*"))
    assert checkpoints == ["iter-000002"]  # it ran on to its next checkpoint, then stopped
    assert "iter-000002" in cancelled.message
    assert sqlite_store.list_model_versions("ppo") == []

    jobs.resume(sqlite_store, job.id)
    resumed = worker.run_next(sqlite_store, sqlite_settings, FAST)
    assert resumed is not None and resumed.status == "succeeded" and resumed.attempts == 2
    assert resumed.training_run_id == run.id  # the same run, continued
    run = sqlite_store.get_run(run.id)
    assert run.status == "succeeded" and run.output_version_id is not None
    steps = [row["step"] for row in read_metrics(run.log_path)]
    assert steps[-4:] == [3, 4, 5, 6]  # continued from iteration 2, not from 0


def test_a_failing_job_is_marked_failed_with_its_error(
    tiny_model_dir: Path, sqlite_settings: Settings, sqlite_store: Store
) -> None:
    fill_prompts(sqlite_store)
    jobs.enqueue(sqlite_store, "ppo", ppo_config(tiny_model_dir, reward="no_such_module:f"))
    done = worker.run_next(sqlite_store, sqlite_settings, FAST)
    assert done is not None and done.status == "failed"
    assert "reward: cannot import 'no_such_module:f'" in (done.error or "")


@pytest.mark.slow
def test_a_killed_worker_leaves_its_job_resumable(
    tiny_model_dir: Path, sqlite_settings: Settings, sqlite_store: Store
) -> None:
    fill_prompts(sqlite_store)
    job = jobs.enqueue(sqlite_store, "ppo", ppo_config(tiny_model_dir, iterations=8))
    cmd = [sys.executable, "-m", "rlchat.cli", "--data-dir", str(sqlite_settings.data_dir)]
    proc = subprocess.Popen(
        [*cmd, "worker", "--once"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    try:
        deadline = time.monotonic() + 180
        while not list(sqlite_settings.runs_dir.glob("ppo-*/checkpoints/iter-000002")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stuck = jobs.get_job(sqlite_store, job.id)
    assert stuck.status == "running"  # nobody told the database: the lease has to expire
    time.sleep(FAST.lease_s + 0.1)
    done = worker.run_next(sqlite_store, sqlite_settings, FAST)
    assert done is not None and done.status == "succeeded" and done.attempts == 2
    run = sqlite_store.get_run(done.training_run_id)
    assert run.status == "succeeded"
    assert read_metrics(run.log_path)[-1]["step"] == 8


def test_worker_command_on_an_empty_queue(
    sqlite_settings: Settings, capsys: pytest.CaptureFixture
) -> None:
    assert cli(["--data-dir", str(sqlite_settings.data_dir), "worker", "--once"]) == 0
    assert "jobs run: 0" in capsys.readouterr().out


def test_an_sft_job_cancels_right_after_the_trainers_next_save(
    tiny_model_dir: Path,
    sqlite_settings: Settings,
    sqlite_store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from synthetic import fill_synthetic_feedback

    fill_synthetic_feedback(sqlite_store, 20, seed=0)
    config = dict(
        base_model=str(tiny_model_dir), max_steps=12, batch_size=4, eval_steps=4,
        save_steps=4, logging_steps=1, max_length=128, min_examples=1,
    )  # fmt: skip
    job = jobs.enqueue(sqlite_store, "sft", config)
    original = Run.log

    def log_and_cancel_at_step_1(self: Run, step: int, metrics: dict[str, float]) -> None:
        if step == 1 and not jobs.get_job(sqlite_store, job.id).cancel_requested:
            jobs.request_cancel(sqlite_store, job.id)
            time.sleep(0.5)
        original(self, step, metrics)

    monkeypatch.setattr(Run, "log", log_and_cancel_at_step_1)
    done = worker.run_next(sqlite_store, sqlite_settings, FAST)
    assert done is not None and done.status == "cancelled"
    assert 0 < done.progress < 1  # steps out of the trainer's max_steps
    run = sqlite_store.get_run(done.training_run_id)
    assert run.status == "cancelled"
    saved = sorted(p.name for p in (Path(run.log_path) / "checkpoints").glob("checkpoint-*"))
    assert saved == ["checkpoint-4"]  # stopped at the first save after the cancel
    assert max(row["step"] for row in read_metrics(run.log_path)) == 4
    assert sqlite_store.list_model_versions("sft") == []


def test_a_cancel_during_an_eval_stops_before_what_follows(
    sqlite_settings: Settings, sqlite_store: Store
) -> None:
    """A pipeline cancelled while its eval stage runs must not go on to deploy."""
    from rl.runs import RunCancelled, training_run, watch_runs

    job = jobs.enqueue(sqlite_store, "pipeline", {})
    watcher = worker.JobWatcher(jobs.claim(sqlite_store, "w"))
    deployed = []
    with pytest.raises(RunCancelled), watch_runs(watcher.on_run):
        with training_run(sqlite_store, sqlite_settings, "pipeline", {}) as outer:
            with training_run(sqlite_store, sqlite_settings, "eval", {}) as run:
                watcher.cancel.set()  # the heartbeat saw the dashboard's cancel
                run.finish(metrics={"gate": {"deploy": True}})
            deployed.append(True)  # the pipeline's deploy stage
    assert deployed == [] and watcher.run_id == outer.id
    assert sqlite_store.get_run(run.id).status == "cancelled"
    assert sqlite_store.get_run(outer.id).status == "cancelled"
    assert job.id == watcher.job_id
