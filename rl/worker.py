"""`rlchat worker`: run the jobs queued from the dashboard, one at a time, as the CLI runs them.

    rlchat worker            # poll the queue forever (on the machine with the GPU)
    rlchat worker --once     # run the next queued job, if any, and exit

A job's config is the YAML/--set config of the matching command, and it runs through the
same entry point: `train sft|reward|ppo` -> `rl.sft|rl.reward|rl.ppo.main`, `pipeline`
-> `rl.pipeline.run_pipeline`, `eval` -> `rl.evaluate.run_recorded`, `simulate` ->
`rl.simulate.simulate`. While it runs, a heartbeat thread renews the job's lease, writes its
progress and picks up a cancel; `rl.runs.watch_runs` lets the worker see every run the job
opens and each metric it logs. A cancel stops the job at its next checkpoint (SFT and reward:
the trainer's next save; PPO: the first log after its next checkpoint; any other run: its next
log, its end, or the next run it opens, so a pipeline cancelled during its eval stage never
reaches deploy), the run is marked cancelled, and Resume continues it from that
checkpoint. A worker that dies stops heartbeating: after `lease_s` its job is requeued and the
next worker resumes it the same way.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import yaml

from agent.config import Settings, build_dataclass
from agent.errors import ConfigError
from agent.store import jobs
from agent.store.api import Store
from agent.store.models import Job
from rl.runs import Run, RunCancelled, watch_runs

log = logging.getLogger(__name__)

TRAIN_MODULES = {"sft": "rl.sft", "reward": "rl.reward", "ppo": "rl.ppo"}
"""The `rlchat train KIND` modules: each has `Config` and `main(config, settings, resume)`."""
OTHER_CONFIGS = {"pipeline": "rl.pipeline", "eval": "rl.evaluate", "simulate": "rl.simulate"}
"""Modules whose `Config` the other job kinds take."""
CHECKPOINTING = ("sft", "reward", "ppo")
"""Run kinds that write checkpoints; a cancel waits for the next one."""
PIPELINE_STAGES = {"sft": 0, "reward": 1, "judge": 2, "ppo": 3, "eval": 4}
"""A pipeline's stage runs, in order, out of six stages (deploy is the sixth). The judge is a
reward run on the judge split."""


@dataclass
class WorkerConfig:
    """How `rlchat worker` polls and keeps its lease."""

    poll_s: float = 5.0
    """Seconds between looks at an empty queue."""
    heartbeat_s: float = 5.0
    """Seconds between heartbeats (and progress writes) of the running job."""
    lease_s: float = 60.0
    """A running job whose heartbeat is older than this is requeued (its worker died)."""
    max_attempts: int = 3
    """Claims of one job before a dead worker's job is marked failed instead of requeued."""
    name: str = ""
    """This worker's name in the jobs table (default: host:pid)."""

    def __post_init__(self) -> None:
        if self.poll_s <= 0 or self.heartbeat_s <= 0:
            raise ConfigError("poll_s and heartbeat_s: must be > 0 seconds")
        if self.lease_s < 3 * self.heartbeat_s:
            raise ConfigError(
                f"lease_s: {self.lease_s:g} s must be at least 3 heartbeats "
                f"({3 * self.heartbeat_s:g} s), or a slow heartbeat would requeue a live job"
            )
        if self.max_attempts < 1:
            raise ConfigError("max_attempts: must be >= 1")
        self.name = self.name or f"{socket.gethostname()}:{os.getpid()}"


# ---- job configs -------------------------------------------------------------------------


def config_class(kind: str) -> type:
    """The config dataclass of a job kind."""
    if kind in TRAIN_MODULES:
        return importlib.import_module(TRAIN_MODULES[kind]).Config
    if kind in OTHER_CONFIGS:
        return importlib.import_module(OTHER_CONFIGS[kind]).Config
    known = ", ".join([*TRAIN_MODULES, *OTHER_CONFIGS])
    raise ConfigError(f"kind: {kind!r} is not a job kind; choose one of {known}")


def parse_config(kind: str, yaml_text: str, overrides: list[str]) -> dict[str, Any]:
    """A job's config values from YAML text plus `key=value` lines, as the CLI reads them
    (`rlchat pipeline` takes `stage.key=value`)."""
    try:
        values = yaml.safe_load(yaml_text or "") or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError("config: the YAML must be a mapping of field: value")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: must look like key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        value = yaml.safe_load(raw)
        stage, _, field = key.partition(".")
        if kind == "pipeline" and field:
            values.setdefault(stage, {})[field] = value
        else:
            values[key] = value
    return values


def job_config(kind: str, values: dict[str, Any]) -> Any:
    """The typed config a job runs with; a bad value raises `ConfigError` naming the field."""
    return build_dataclass(config_class(kind), values)


def run_job(
    kind: str, config: Any, settings: Settings, resume: bool, callbacks: list[Any] | None = None
) -> dict[str, Any]:
    """Run one job through the entry point its CLI command uses; returns a short result.

    `callbacks` (transformers TrainerCallbacks) go to the SFT and reward trainers.
    """
    if kind in TRAIN_MODULES:
        module = importlib.import_module(TRAIN_MODULES[kind])
        extra = {"callbacks": callbacks} if callbacks and kind in ("sft", "reward") else {}
        return {"version_id": module.main(config, settings, resume=resume, **extra)}
    store = Store.open(settings)
    try:
        if kind == "pipeline":
            from rl import pipeline

            result = pipeline.run_pipeline(config, settings, store, resume=resume)
            return {"run_id": result["run_id"], "stages": list(result["stages"])}
        if kind == "eval":
            from rl import evaluate

            run_id, metrics = evaluate.run_recorded(config, store, settings)
            return {"run_id": run_id, "gate": metrics.get("gate")}
        from agent.chat import ChatAgent
        from rl import simulate

        return simulate.simulate(config, store, ChatAgent(store, settings), settings)
    finally:
        store.close()


# ---- watching a running job --------------------------------------------------------------


class JobWatcher:
    """Turns the runs a job opens and logs into progress, and a cancel into `RunCancelled`.

    The training thread calls `on_run` (through `rl.runs.watch_runs`) and, for SFT and reward
    jobs, the trainer callback from `trainer_callback`; the heartbeat thread reads `progress`,
    `message` and `run_id`, and sets `cancel` when the dashboard asks.
    """

    def __init__(self, job: Job) -> None:
        self.kind = job.kind
        self.job_id = job.id
        self.progress: float | None = None
        self.message = ""
        self.run_id: int | None = job.training_run_id
        self.cancel = threading.Event()
        self.current: Run | None = None
        self._totals: dict[int, int] = {}  # run id -> its number of steps, when known
        self._stages: dict[int, str] = {}  # run id -> its pipeline stage
        self._checkpoint_at_cancel: dict[int, str | None] = {}

    def on_run(self, run: Run, event: str) -> None:
        self.current = run
        if event == "open":
            self.run_id = self.run_id or run.id  # the job's own (outermost) run
            self.message = f"{run.kind} run {run.id} started"
            self._stop_if_cancelled(run)
            return
        if event == "finish":  # a run without checkpoints (eval) ends: stop before what follows
            if run.kind not in CHECKPOINTING:  # (a pipeline's deploy), not after hours of SFT
                self._stop_if_cancelled(run)
            return
        self._report(run)
        if run.kind not in CHECKPOINTING or self._checkpointed_since_cancel(run):
            self._stop_if_cancelled(run)

    def on_train_begin(self, max_steps: int) -> None:
        if self.current is not None and max_steps > 0:
            self._totals[self.current.id] = max_steps

    def on_checkpoint(self) -> None:
        """A trainer has just saved a checkpoint: the moment to honour a cancel."""
        if self.current is not None:
            self._stop_if_cancelled(self.current)

    def _total(self, run: Run) -> int:
        if run.id not in self._totals:
            config = run.store.get_run(run.id).config
            self._totals[run.id] = int(config.get("iterations") or config.get("max_steps") or 0)
        return max(self._totals[run.id], 0)

    def _stage(self, run: Run) -> str:
        """The pipeline stage of `run`: its kind, or "judge" for a reward run on the judge split."""
        if run.id not in self._stages:
            judge = run.kind == "reward" and (
                run.store.get_run(run.id).config.get("train_split") == "judge"
            )
            self._stages[run.id] = "judge" if judge else run.kind
        return self._stages[run.id]

    def _report(self, run: Run) -> None:
        total = self._total(run)
        fraction = min(run.step / total, 1.0) if total else None
        stage = self._stage(run)
        if self.kind == "pipeline" and stage in PIPELINE_STAGES:
            self.progress = (PIPELINE_STAGES[stage] + (fraction or 0.0)) / (
                len(PIPELINE_STAGES) + 1
            )
        elif fraction is not None:
            self.progress = fraction
        quoted = [(k, v) for k, v in run.last_metrics.items() if k.split("/")[0] in QUOTED]
        self.message = f"{run.kind} run {run.id}: step {run.step}" + (f"/{total}" if total else "")
        self.message += "".join(f" · {k} {v:.3g}" for k, v in quoted[:3])

    def _checkpointed_since_cancel(self, run: Run) -> bool:
        if not self.cancel.is_set():
            return False
        newest = newest_checkpoint(run)
        before = self._checkpoint_at_cancel.setdefault(run.id, newest)
        return newest is not None and newest != before

    def _stop_if_cancelled(self, run: Run) -> None:
        if self.cancel.is_set():
            where = newest_checkpoint(run)
            raise RunCancelled(
                f"cancelled (job {self.job_id}); "
                + (f"resumable from {where}" if where else "no checkpoint written yet")
            )


QUOTED = ("reward", "kl", "loss", "train", "eval")
"""Metric namespaces quoted in a job's progress message."""


def newest_checkpoint(run: Run) -> str | None:
    """The newest entry of the run's checkpoint directory, if any."""
    if not run.checkpoint_dir.is_dir():
        return None
    found = [p for p in run.checkpoint_dir.iterdir() if not p.name.startswith(".")]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def trainer_callback(watcher: JobWatcher) -> Any:
    """A transformers TrainerCallback that tells `watcher` the step count and each save."""
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            watcher.on_train_begin(int(state.max_steps))

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            watcher.on_checkpoint()

    return Watch()


class Heartbeat(threading.Thread):
    """Renews the lease every `interval` s, writes the watcher's progress, picks up a cancel."""

    def __init__(
        self, store: Store, job_id: int, worker: str, watcher: JobWatcher, interval: float
    ):
        super().__init__(name=f"heartbeat-job-{job_id}", daemon=True)
        self.store, self.job_id, self.worker = store, job_id, worker
        self.watcher, self.interval = watcher, interval
        self.lost = False
        self._done = threading.Event()

    def beat(self) -> None:
        w = self.watcher
        try:
            cancel = jobs.heartbeat(
                self.store, self.job_id, self.worker,
                progress=w.progress, message=w.message or None, training_run_id=w.run_id,
            )  # fmt: skip
        except jobs.LeaseLost:
            log.error(
                "job %d was taken from this worker (missed heartbeats); stopping it", w.job_id
            )
            self.lost, cancel = True, True
        except Exception:  # a database hiccup must not kill the job; the next beat retries
            log.exception("heartbeat of job %d failed", self.job_id)
            return
        if cancel and not w.cancel.is_set():
            log.info("job %d: cancel requested; stopping at the next checkpoint", self.job_id)
            w.cancel.set()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._done.set()
        self.join()
        if not self.lost:
            self.beat()  # the last progress and message


# ---- the worker --------------------------------------------------------------------------


def run_claimed(store: Store, settings: Settings, job: Job, config: WorkerConfig) -> str:
    """Run a job this worker has claimed to its end; returns the status it finished with."""
    resume = job.attempts > 1 and job.training_run_id is not None
    watcher = JobWatcher(job)
    beat = Heartbeat(store, job.id, config.name, watcher, config.heartbeat_s)
    beat.beat()  # a cancel asked before the claim is honoured at once
    beat.start()
    log.info(
        "job %d: %s%s, config %s", job.id, job.kind, " (resuming)" if resume else "", job.config
    )
    status, error = "succeeded", None
    try:
        typed = job_config(job.kind, job.config)
        with watch_runs(watcher.on_run, resume_run_id=job.training_run_id if resume else None):
            result = run_job(job.kind, typed, settings, resume, [trainer_callback(watcher)])
        watcher.message = f"done: {result}"[: jobs.MESSAGE_CHARS]
    except RunCancelled as exc:
        status, watcher.message = "cancelled", str(exc)
    except KeyboardInterrupt:
        beat.stop()
        jobs.release(store, job.id, config.name, "worker stopped (Ctrl-C); queued to resume")
        raise
    except Exception as exc:
        log.exception("job %d failed", job.id)
        status, error = "failed", f"{type(exc).__name__}: {exc}"
    beat.stop()
    if beat.lost:
        return "lost"
    jobs.finish(store, job.id, config.name, status, error=error)
    log.info("job %d %s: %s", job.id, status, error or watcher.message)
    return status


def run_next(store: Store, settings: Settings, config: WorkerConfig) -> Job | None:
    """Requeue dead workers' jobs, then claim and run the next queued job; None if none."""
    for job_id in jobs.requeue_stale(store, config.lease_s, config.max_attempts):
        log.warning("job %d: its worker stopped heartbeating; requeued (or given up)", job_id)
    job = jobs.claim(store, config.name)
    if job is None:
        return None
    run_claimed(store, settings, job, config)
    return jobs.get_job(store, job.id)


def serve(settings: Settings, config: WorkerConfig, once: bool = False) -> int:
    """Run queued jobs one at a time until interrupted (`once`: at most one); returns how many."""
    store = Store.open(settings)
    done = 0
    log.info("worker %s watching the job queue of %s", config.name, settings.database_url)
    try:
        while True:
            job = run_next(store, settings, config)
            done += job is not None
            if once:
                return done
            if job is None:
                time.sleep(config.poll_s)
    finally:
        store.close()
