"""Dashboard → Jobs (admins): queue training jobs for `rlchat worker`, watch them, cancel, resume.

The web process never trains: a job is a row in the `jobs` table that `rlchat worker` (a
separate process, on the machine with the GPU) claims and runs as the CLI would. Its config
is checked here with the same dataclass the worker builds, so a typo fails now, naming the
field, not an hour later. Curves are drawn from the run's metrics.jsonl (`rl.runs`), which
the worker appends to on every log; a timer refreshes them while the Jobs tab is open.
"""

from __future__ import annotations

import dataclasses
import html
from datetime import UTC, datetime
from typing import Any

import gradio as gr
import pandas as pd
from sqlalchemy import select

from agent.errors import ValidationError
from agent.store import jobs
from agent.store.models import JOB_KINDS, Job, TrainingRun, utcnow
from feedback_ui.common import UIContext, user_errors
from rl import worker
from rl.runs import read_metrics

ROLE = "admin"
REFRESH_S = 2.0
"""Seconds between refreshes of the job list and curves while the Jobs tab is open."""
HEADLINE = (
    "reward/mean", "kl/mean", "policy/entropy", "value/explained_variance", "loss/policy",
    "train/loss", "eval/loss", "eval/accuracy",
)  # fmt: skip
"""Metrics drawn by default (the first MAX_CURVES the run logs)."""
MAX_CURVES = 4
"""Plots on screen, one metric each. (One plot coloured by metric would be neater, but a
Gradio LinePlot keeps the colour domain of its first data and drops metrics added later.)"""
SILENT_S = 30
"""A running job whose worker has been silent this long is flagged in the list."""


def _eta(job: Job, now: datetime) -> str:
    """Time left at the pace so far (running jobs with some progress only)."""
    if job.status != "running" or not job.started_at or job.progress <= 0:
        return ""
    elapsed = (now - _aware(job.started_at)).total_seconds()
    return _duration(elapsed * (1 - job.progress) / job.progress)


def _aware(t: datetime) -> datetime:
    """SQLite hands timestamps back without their (UTC) zone."""
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def jobs_html(rows: list[Job], names: dict[int, str]) -> str:
    """The job list as an HTML table with a progress bar and ETA per job (all text escaped)."""
    if not rows:
        return "<p>No jobs yet. Queue one above, and run <code>rlchat worker</code>.</p>"
    now = utcnow()
    head = "".join(
        f"<th>{h}</th>"
        for h in ("job", "kind", "status", "progress", "ETA", "message", "by", "queued")
    )
    body = []
    for job in rows:
        status = job.status + (
            " (cancel asked)" if job.cancel_requested and job.status == "running" else ""
        )
        silent = (now - _aware(job.heartbeat_at)).total_seconds() if job.heartbeat_at else 0
        if job.status == "running" and silent > SILENT_S:
            status += f" (no heartbeat for {_duration(silent)}: worker gone? a worker resumes it after the lease)"
        cells = [
            f"#{job.id}",
            html.escape(job.kind),
            html.escape(status),
            f'<progress value="{job.progress:.3f}" max="1"></progress> {job.progress:.0%}',
            _eta(job, now),
            html.escape(job.error or job.message or ""),
            html.escape(names.get(job.created_by or 0, "")),
            str(job.created_at)[:19],
        ]
        body.append(
            f'<tr data-job="{job.id}" data-status="{job.status}">'
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    return f'<table class="jobs-list"><tr>{head}</tr>{"".join(body)}</table>'


def config_help(kind: str) -> str:
    """The fields of a job kind's config with their defaults (markdown)."""
    cls = worker.config_class(kind)
    lines = [f"**{cls.__module__}.{cls.__name__}** fields (default):"]
    for f in dataclasses.fields(cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else f.default_factory()  # type: ignore[misc]
            if f.default_factory is not dataclasses.MISSING
            else "required"
        )
        lines.append(f"`{f.name}` = `{default!r}`")
    return " · ".join(lines)


class JobsHandlers:
    """Event handlers of Dashboard → Jobs; each checks for an admin caller first."""

    def __init__(self, ctx: UIContext) -> None:
        self.ctx = ctx

    @user_errors
    def queue(
        self, kind: str, yaml_text: str, set_text: str, request: gr.Request
    ) -> tuple[Any, ...]:
        """Check the config as the worker will build it, then queue the job."""
        caller = self.ctx.caller(request, ROLE, "queueing a job")
        if kind not in JOB_KINDS:
            raise ValidationError(f"kind: choose one of {', '.join(JOB_KINDS)}")
        overrides = [line.strip() for line in (set_text or "").splitlines() if line.strip()]
        values = worker.parse_config(kind, yaml_text or "", overrides)
        worker.job_config(kind, values)  # raises ConfigError naming the field
        job = jobs.enqueue(self.ctx.store, kind, values, created_by=caller.id)
        message = f"Queued job #{job.id} ({kind}). `rlchat worker` runs it; watch it below."
        return (message, *self.refresh(job.id, None, None, request))

    @user_errors
    def cancel(self, job_id: int | None, request: gr.Request) -> tuple[Any, ...]:
        self.ctx.caller(request, ROLE, "cancelling a job")
        job = jobs.request_cancel(self.ctx.store, _job_id(job_id))
        message = (
            f"Job #{job.id} cancelled."
            if job.status == "cancelled"
            else f"Job #{job.id} stops at its next checkpoint; Resume continues it from there."
        )
        return (message, *self.refresh(job.id, None, None, request))

    @user_errors
    def resume(self, job_id: int | None, request: gr.Request) -> tuple[Any, ...]:
        self.ctx.caller(request, ROLE, "resuming a job")
        job = jobs.resume(self.ctx.store, _job_id(job_id))
        message = f"Job #{job.id} queued again; the worker resumes it from its last checkpoint."
        return (message, *self.refresh(job.id, None, None, request))

    @user_errors
    def refresh(
        self, job_id: int | None, run_id: int | None, metrics: list[str] | None, request: gr.Request
    ) -> tuple[Any, ...]:
        """(job table, job picker, run picker, metric picker, MAX_CURVES plots, TensorBoard
        note)."""
        self.ctx.caller(request, ROLE, "the Jobs tab")
        store = self.ctx.store
        rows = jobs.list_jobs(store)
        names = {u.id: u.name for u in store.list_users()}
        choices = [(f"#{j.id} {j.kind} ({j.status})", j.id) for j in rows]
        job = next((j for j in rows if j.id == job_id), rows[0] if rows else None)
        runs = self._runs(job) if job else []
        run = next((r for r in runs if r.id == run_id), runs[0] if runs else None)
        history = read_metrics(run.log_path) if run and run.log_path else []
        keys = sorted({k for row in history for k in row if k not in ("step", "time")})
        chosen = [m for m in (metrics or []) if m in keys][:MAX_CURVES]
        chosen = chosen or [m for m in HEADLINE if m in keys][:MAX_CURVES]
        return (
            jobs_html(rows, names),
            gr.update(choices=choices, value=job.id if job else None),
            gr.update(
                choices=[(f"run {r.id} {r.kind} ({r.status})", r.id) for r in runs],
                value=run.id if run else None,
            ),
            gr.update(choices=keys, value=chosen),
            *plots(history, chosen),
            _tensorboard_note(run),
        )

    def _runs(self, job: Job) -> list[TrainingRun]:
        """The job's runs, newest first: its own, and those started while it ran (a
        pipeline's stage runs)."""
        if job.started_at is None:
            return []
        stmt = select(TrainingRun).where(TrainingRun.started_at >= job.started_at)
        if job.finished_at is not None:
            stmt = stmt.where(TrainingRun.started_at <= job.finished_at)
        with self.ctx.store.reading() as s:
            runs = {r.id: r for r in s.scalars(stmt)}
            if job.training_run_id is not None and job.training_run_id not in runs:
                own = s.get(TrainingRun, job.training_run_id)
                if own is not None:
                    runs[own.id] = own
        return sorted(runs.values(), key=lambda r: r.id, reverse=True)


def _job_id(value: Any) -> int:
    if value is None or value == "":
        raise ValidationError("job: pick a job in the list first")
    return int(value)


def plots(history: list[dict[str, float]], metrics: list[str]) -> list[Any]:
    """One LinePlot update per plot slot: a metric's curve, or hidden when unused."""
    updates = [gr.update(value=curves(history, [m]), label=m, visible=True) for m in metrics]
    return updates + [gr.update(visible=False)] * (MAX_CURVES - len(updates))


def curves(history: list[dict[str, float]], metrics: list[str]) -> pd.DataFrame:
    """Long-format (step, value, metric) rows of the chosen metrics, for a LinePlot.

    Typed even when empty: the plot takes its axis types (quantitative, not categories) from
    the first frame it is given.
    """
    rows = [(int(row["step"]), float(row[m]), m) for row in history for m in metrics if m in row]
    return pd.DataFrame(
        {
            "step": pd.Series([r[0] for r in rows], dtype="int64"),
            "value": pd.Series([r[1] for r in rows], dtype="float64"),
            "metric": pd.Series([r[2] for r in rows], dtype="object"),
        }
    )


def _tensorboard_note(run: TrainingRun | None) -> str:
    if run is None or not run.log_path:
        return "No run yet: curves appear once the worker starts the job."
    tb = f"{run.log_path}/tensorboard"
    return f"Run {run.id} logs to `{run.log_path}` · TensorBoard: `tensorboard --logdir {tb}`"


def build_jobs_tab(ctx: UIContext) -> dict[str, Any]:
    """Lay out Dashboard → Jobs inside the current Blocks and wire its events."""
    h = JobsHandlers(ctx)
    with gr.Row():
        kind = gr.Dropdown(list(JOB_KINDS), value="ppo", label="Kind", scale=1, elem_id="jobs-kind")
        yaml_text = gr.Textbox(
            label="Config (YAML, as --job-config)", lines=5, scale=3, elem_id="jobs-yaml"
        )
        set_text = gr.Textbox(
            label="--set overrides (one key=value per line)", lines=5, scale=2, elem_id="jobs-set"
        )
    fields = gr.Markdown(config_help("ppo"), elem_id="jobs-fields")
    with gr.Row():
        queue = gr.Button("Queue job", variant="primary", scale=0, elem_id="jobs-queue")
        status = gr.Markdown(elem_id="jobs-status")
    table = gr.HTML(elem_id="jobs-table")
    with gr.Row():
        job = gr.Dropdown(label="Job", choices=[], scale=2, elem_id="jobs-selected")
        cancel = gr.Button("Cancel", variant="stop", scale=0, elem_id="jobs-cancel")
        resume = gr.Button("Resume", scale=0, elem_id="jobs-resume")
    with gr.Row():
        run = gr.Dropdown(label="Run", choices=[], scale=1, elem_id="jobs-run")
        metrics = gr.Dropdown(
            label=f"Metrics (up to {MAX_CURVES})",
            choices=[],
            multiselect=True,
            max_choices=MAX_CURVES,
            scale=3,
            elem_id="jobs-metrics",
        )
    slots = []
    for row in range(MAX_CURVES // 2):
        with gr.Row():
            for col in range(2):
                slots.append(
                    gr.LinePlot(
                        None,
                        x="step",
                        y="value",
                        height=260,
                        visible=False,
                        label="metric",
                        show_label=True,
                        elem_id=f"jobs-curve-{2 * row + col}",
                    )
                )
    tensorboard = gr.Markdown(elem_id="jobs-tensorboard")
    timer = gr.Timer(REFRESH_S, active=False)

    views = [table, job, run, metrics, *slots, tensorboard]
    picked = [job, run, metrics]
    kind.change(config_help, [kind], [fields], api_name=False)
    queue.click(h.queue, [kind, yaml_text, set_text], [status, *views], api_name="jobs_queue")
    cancel.click(h.cancel, [job], [status, *views], api_name="jobs_cancel")
    resume.click(h.resume, [job], [status, *views], api_name="jobs_resume")
    for picker in picked:
        picker.input(h.refresh, picked, views, api_name=False)
    timer.tick(h.refresh, picked, views, api_name=False, show_progress="hidden")

    def load(request: gr.Request) -> tuple[Any, ...]:
        return h.refresh(None, None, None, request)

    return {"load": (load, views), "timer": timer}
