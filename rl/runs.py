"""Training-run bookkeeping shared by every job: the DB row, the run directory, metrics.

    with training_run(store, settings, "reward", config, resume=args.resume) as run:
        data = build_dataset(store, cutoff=run.data_cutoff)
        run.record_data(ids={"comparisons": [...]})
        ...
        run.log(step, {"loss/train": 0.3})          # TensorBoard + the row's metrics
        run.finish(output_version_id=vid, metrics={"eval/accuracy": 0.93})

A crash marks the row failed with the error, and the run directory keeps its checkpoints;
`resume=True` reopens the newest unfinished run of the same kind, with the same data cut-off,
so a resumed job trains on exactly the snapshot it started with; `run.snapshot(sources)` also
puts back the rating values and comparison choices of the first start (an edit made after
the cut-off changes nothing a resume trains on).

`rlchat worker` watches the runs a job opens with `watch_runs(hook)`: the hook sees each run
open and each `log`, and may raise `RunCancelled` to stop the job; the run is then marked
cancelled and, like a failed one, is resumed from its last checkpoint. Every `log` also
appends a line to <run dir>/metrics.jsonl, the history the dashboard draws its curves from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent.config import Settings
from agent.store.api import Store
from agent.store.models import utcnow

if TYPE_CHECKING:
    from rl.datasets import Snapshot

log = logging.getLogger(__name__)
T = TypeVar("T")

METRICS_FILE = "metrics.jsonl"
"""One JSON object per `Run.log` call: {"step": ..., "time": unix seconds, metric: value, ...}."""
UNFINISHED = ("running", "failed", "cancelled")
"""Statuses of a run that `resume` continues."""

RunHook = Callable[["Run", str], None]
"""Called with (run, event): "open" when a run starts or resumes, "log" after each log,
"finish" just before it is marked succeeded."""
_hook: ContextVar[RunHook | None] = ContextVar("rlchat_run_hook", default=None)
_resume_id: ContextVar[int | None] = ContextVar("rlchat_resume_run", default=None)


class RunCancelled(Exception):
    """Raised by a run hook to stop a job; the run is marked cancelled and stays resumable."""


@contextmanager
def watch_runs(hook: RunHook, resume_run_id: int | None = None) -> Iterator[None]:
    """Call `hook` on the runs opened inside this block (in this thread); a resumed run of the
    same kind as `resume_run_id` continues that run rather than the newest unfinished one."""
    tokens = (_hook.set(hook), _resume_id.set(resume_run_id))
    try:
        yield
    finally:
        _hook.reset(tokens[0])
        _resume_id.reset(tokens[1])


def run_child(
    store: Store,
    kind: str,
    began: int | None,
    remember: Callable[[int], None],
    job: Callable[[bool], T],
) -> T:
    """Run `job(resume)`, a job that opens a run of `kind`, from inside another job: resume
    run `began` (the one an earlier try of this job opened) when it is unfinished, never an
    older unfinished run of that kind, else start afresh; `remember(run_id)` is called as soon
    as the job opens a new run, so that the next try knows which run is its own. The hook of
    any `watch_runs` around it still sees every run."""
    outer = _hook.get()

    def hook(run: Run, event: str) -> None:
        if event == "open" and run.kind == kind and run.id != began:
            remember(run.id)
        if outer is not None:
            outer(run, event)

    resume = began is not None and store.get_run(began).status in UNFINISHED
    tokens = (_hook.set(hook), _resume_id.set(began if resume else None))
    try:
        return job(resume)
    finally:
        _hook.reset(tokens[0])
        _resume_id.reset(tokens[1])


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The metric history a run has logged so far (empty when it logged nothing)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            continue
    return rows


def config_dict(config: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (paths as strings)."""
    raw = (
        dataclasses.asdict(config)
        if dataclasses.is_dataclass(config) and not isinstance(config, type)
        else dict(config)
    )
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in raw.items()}


class Run:
    """One training run: its row in `training_runs` and its directory under <data_dir>/runs."""

    def __init__(
        self, store: Store, run_id: int, directory: Path, data_cutoff: datetime, kind: str = ""
    ) -> None:
        self.store = store
        self.id = run_id
        self.kind = kind
        self.step = 0
        """The step of the newest `log` call."""
        self.dir = directory
        self.data_cutoff = data_cutoff
        self.last_metrics: dict[str, float] = {}
        self._writer: Any = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def writer(self) -> Any:
        """A TensorBoard SummaryWriter on the run directory (created on first use)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
        return self._writer

    def snapshot(self, sources: list[str]) -> Snapshot:
        """The job's data: rows up to the run's cut-off, of `sources` (required to be chosen when
        real and simulated feedback are mixed), with the values of the run's first start."""
        from rl.datasets import check_sources, freeze_values, load_snapshot

        snap = load_snapshot(self.store, self.data_cutoff, sources=sources)
        check_sources(snap, sources)
        freeze_values(snap, self.dir / "snapshot_values.json")
        return snap

    def record_data(self, ids: dict[str, Any]) -> None:
        """Record which rows the job trains on (e.g. {"messages": [...], "comparisons": [...]})."""
        self.store.update_run(self.id, data_ids=ids)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write metrics to TensorBoard and keep the newest values on the run row."""
        clean = {
            k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))
        }
        for key, value in clean.items():
            self.writer.add_scalar(key, value, step)
        self.last_metrics.update(clean)
        self.step = step
        self.store.update_run(self.id, metrics={**clean, "step": step})
        with (self.dir / METRICS_FILE).open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        hook = _hook.get()
        if hook is not None:
            hook(self, "log")

    def finish(
        self, output_version_id: int | None = None, metrics: dict[str, Any] | None = None
    ) -> None:
        hook = _hook.get()
        if hook is not None:
            hook(self, "finish")
        self.store.update_run(
            self.id,
            status="succeeded",
            output_version_id=output_version_id,
            metrics=metrics or {},
        )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


@contextmanager
def training_run(
    store: Store, settings: Settings, kind: str, config: Any, *, resume: bool = False
) -> Iterator[Run]:
    """Open (or, with `resume`, reopen) a training run; a failure marks it failed and re-raises."""
    row = None
    if resume:
        unfinished = [r for r in store.list_runs(kind) if r.status in UNFINISHED]
        wanted = [r for r in unfinished if r.id == _resume_id.get()]
        candidates = wanted or unfinished
        row = candidates[-1] if candidates else None
        if row is None:
            log.warning("no unfinished %s run to resume; starting a new one", kind)
    if row is None:
        run_id = store.start_run(kind, config_dict(config), data_cutoff=utcnow())
        row = store.get_run(run_id)
    directory = settings.runs_dir / f"{kind}-{row.id}"
    directory.mkdir(parents=True, exist_ok=True)
    store.update_run(row.id, status="running", error=None, log_path=str(directory))
    if resume:
        log.info("resuming %s run %d from %s", kind, row.id, directory)
    run = Run(store, row.id, directory, row.data_cutoff or utcnow(), kind)
    try:
        hook = _hook.get()
        if hook is not None:
            hook(run, "open")
        yield run
    except RunCancelled as exc:
        store.update_run(run.id, status="cancelled", error=str(exc), finished_at=utcnow())
        raise
    except BaseException as exc:
        reason = (
            "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        )
        store.update_run(run.id, status="failed", error=reason)
        raise
    finally:
        run.close()
