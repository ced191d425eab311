"""Dashboard → Model lineage (admins): every model version as a tree (base → sft → ppo …), with
its eval verdict, headline metrics and how much real and simulated feedback it trained on, and
deploy / roll back from there.

What a version trained on comes from the run that produced it: training runs record the row
ids they used in `data_ids` (reward models: ratings and comparisons; SFT: the replies it
imitated, whose ratings and comparisons up to the run's data cut-off are counted; PPO: the user
prompts it practised on), and each row's conversation says where it came from (`source`:
simulated, or chat / arena / import, counted as real).
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import gradio as gr
import pandas as pd
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from agent.errors import ValidationError
from agent.registry import ModelRegistry
from agent.store.api import POLICY_KINDS, Store
from agent.store.models import Comparison, Conversation, Message, ModelVersion, Rating, TrainingRun
from feedback_ui.common import UIContext, user_errors

ROLE = "admin"
HEADLINE = (
    "eval/accuracy", "eval/loss", "eval/reward_mean", "reward/mean", "kl/mean",
    "win_rate/reward", "win_rate/oracle",
)  # fmt: skip
"""Metrics quoted next to a version, when it has them."""
COLUMNS = [
    "version", "kind", "name", "status", "parent", "verdict",
    "ratings real/sim", "comparisons real/sim", "examples real/sim", "metrics",
]  # fmt: skip
CHUNK = 500
"""Ids per IN (...) query."""


def _by_source(s: Session, column: Any, ids: Iterable[int], *joins: Any) -> Counter[str]:
    """How many of the rows `ids` (of `column`'s table) come from real vs simulated chats."""
    counts: Counter[str] = Counter()
    ids = sorted(set(ids))
    for i in range(0, len(ids), CHUNK):
        stmt = select(Conversation.source).select_from(column.table)
        for target, on in joins:
            stmt = stmt.join(target, on)
        for (source,) in s.execute(stmt.where(column.in_(ids[i : i + CHUNK]))):
            counts["sim" if source == "simulated" else "real"] += 1
    return counts


def _via_message(message_column: Any) -> tuple[Any, ...]:
    return (
        (Message, Message.id == message_column),
        (Conversation, Conversation.id == Message.conversation_id),
    )


def feedback_counts(s: Session, run: TrainingRun | None) -> dict[str, Counter[str]]:
    """Real / simulated ratings, comparisons and examples behind a training run."""
    out: dict[str, Counter[str]] = {"ratings": Counter(), "comparisons": Counter()}
    if run is None:
        return {**out, "examples": Counter()}
    ids = run.data_ids or {}
    ratings, comparisons = set(ids.get("ratings", [])), set(ids.get("comparisons", []))
    messages = sorted(set(ids.get("messages", [])))
    if run.kind == "sft":  # the feedback that made those replies examples, up to the cut-off
        more_ratings, more_comparisons = _feedback_on(s, messages, run)
        ratings |= more_ratings
        comparisons |= more_comparisons
    return {
        "ratings": _by_source(s, Rating.id, ratings, *_via_message(Rating.message_id)),
        "comparisons": _by_source(
            s, Comparison.id, comparisons, *_via_message(Comparison.message_a_id)
        ),
        "examples": _by_source(
            s, Message.id, messages, (Conversation, Conversation.id == Message.conversation_id)
        ),
    }


def _feedback_on(s: Session, messages: list[int], run: TrainingRun) -> tuple[set[int], set[int]]:
    """Ids of the ratings and comparisons on `messages` made by the run's data cut-off."""
    ratings: set[int] = set()
    comparisons: set[int] = set()
    for i in range(0, len(messages), CHUNK):
        chunk = messages[i : i + CHUNK]
        r = select(Rating.id).where(Rating.message_id.in_(chunk))
        c = select(Comparison.id).where(
            or_(Comparison.message_a_id.in_(chunk), Comparison.message_b_id.in_(chunk))
        )
        if run.data_cutoff is not None:
            r = r.where(Rating.created_at <= run.data_cutoff)
            c = c.where(Comparison.created_at <= run.data_cutoff)
        ratings.update(s.scalars(r))
        comparisons.update(s.scalars(c))
    return ratings, comparisons


def verdict(evals: list[TrainingRun]) -> str:
    """The newest gate decision on a version, in words."""
    if not evals:
        return ""
    run = evals[-1]
    gate = run.metrics.get("gate") if run.status == "succeeded" else None
    if not isinstance(gate, dict):
        return f"eval run {run.id} {run.status}"
    if gate.get("deploy"):
        return f"gate passed (eval run {run.id})"
    return f"gate refused (eval run {run.id}): " + "; ".join(map(str, gate.get("reasons", [])))


def _split(counter: Counter[str]) -> str:
    return f"{counter['real']} / {counter['sim']}" if counter else ""


def lineage(store: Store) -> list[dict[str, Any]]:
    """One row per model version in tree order (parents before children), with its depth."""
    with store.reading() as s:
        versions = list(s.scalars(select(ModelVersion).order_by(ModelVersion.id)))
        runs = list(s.scalars(select(TrainingRun).order_by(TrainingRun.id)))
        producer = {r.output_version_id: r for r in runs if r.kind in ("sft", "reward", "ppo")}
        evals: dict[Any, list[TrainingRun]] = defaultdict(list)
        for r in runs:
            if r.kind == "eval":
                evals[r.config.get("candidate")].append(r)
        counts = {v.id: feedback_counts(s, producer.get(v.id)) for v in versions}
    known = {v.id for v in versions}
    children: dict[int | None, list[ModelVersion]] = defaultdict(list)
    for v in versions:
        children[v.parent_id if v.parent_id in known else None].append(v)
    rows: list[dict[str, Any]] = []

    def walk(parent: int | None, depth: int) -> None:
        for v in children[parent]:
            c = counts[v.id]
            metrics = {
                k: v.metrics[k] for k in HEADLINE if isinstance(v.metrics.get(k), int | float)
            }
            rows.append({
                "depth": depth, "version": v.id, "kind": v.kind, "name": v.name,
                "status": v.status, "parent": v.parent_id or "", "verdict": verdict(evals[v.id]),
                "ratings real/sim": _split(c["ratings"]),
                "comparisons real/sim": _split(c["comparisons"]),
                "examples real/sim": _split(c["examples"]),
                "metrics": ", ".join(f"{k} {x:.3g}" for k, x in metrics.items()),
            })  # fmt: skip
            walk(v.id, depth + 1)

    walk(None, 0)
    return rows


def tree_html(rows: list[dict[str, Any]]) -> str:
    """The lineage as an indented list (all text escaped)."""
    if not rows:
        return (
            "<p>No model versions yet: <code>rlchat starter ensure</code> registers the base.</p>"
        )
    items = []
    for r in rows:
        feedback = [
            f"{what} {r[f'{what} real/sim']}"
            for what in ("ratings", "comparisons", "examples")
            if r[f"{what} real/sim"]
        ]
        details = " · ".join(
            html.escape(x) for x in (r["verdict"], r["metrics"], ", ".join(feedback)) if x
        )
        items.append(
            f'<li style="margin-left:{1.5 * r["depth"]}em" data-version="{r["version"]}">'
            f"{'└ ' if r['depth'] else ''}<b>v{r['version']} {html.escape(r['kind'])}</b> "
            f"{html.escape(r['name'])} <i>[{html.escape(r['status'])}]</i>"
            + (f"<br><small>{details}</small>" if details else "")
            + "</li>"
        )
    note = "<p><small>feedback counts are real / simulated rows the version trained on</small></p>"
    return f'<ul class="lineage" style="list-style:none">{"".join(items)}</ul>{note}'


class LineageHandlers:
    """Event handlers of Dashboard → Model lineage; each checks for an admin caller first."""

    def __init__(self, ctx: UIContext) -> None:
        self.ctx = ctx
        self.registry = ModelRegistry(ctx.store, ctx.settings)

    @user_errors
    def refresh(self, request: gr.Request) -> tuple[Any, ...]:
        """(tree, table, version picker)."""
        self.ctx.caller(request, ROLE, "the model lineage")
        rows = lineage(self.ctx.store)
        table = pd.DataFrame(rows, columns=COLUMNS)
        policies = [
            (f"v{r['version']} {r['kind']} {r['name']} ({r['status']})", r["version"])
            for r in rows
            if r["kind"] in POLICY_KINDS
        ]
        return tree_html(rows), table, gr.update(choices=policies)

    @user_errors
    def deploy(self, version_id: int | None, request: gr.Request) -> tuple[Any, ...]:
        caller = self.ctx.caller(request, ROLE, "deploying a model")
        if version_id is None:
            raise ValidationError("version: pick a policy version in the list first")
        mv = self.registry.deploy(int(version_id))
        message = f"{caller.name} deployed version {mv.id} ({mv.kind} {mv.name}); chats use it from their next turn."
        return (message, *self.refresh(request))

    @user_errors
    def rollback(self, request: gr.Request) -> tuple[Any, ...]:
        caller = self.ctx.caller(request, ROLE, "rolling back a model")
        mv = self.registry.rollback()
        message = f"{caller.name} rolled back to version {mv.id} ({mv.kind} {mv.name})."
        return (message, *self.refresh(request))


def build_lineage_tab(ctx: UIContext) -> dict[str, Any]:
    """Lay out Dashboard → Model lineage inside the current Blocks and wire its events."""
    h = LineageHandlers(ctx)
    tree = gr.HTML(elem_id="lineage-tree")
    with gr.Row():
        version = gr.Dropdown(
            label="Policy version", choices=[], scale=2, elem_id="lineage-version"
        )
        deploy = gr.Button("Deploy", variant="primary", scale=0, elem_id="lineage-deploy")
        rollback = gr.Button("Roll back", variant="stop", scale=0, elem_id="lineage-rollback")
    action = gr.Markdown(elem_id="lineage-action")
    with gr.Accordion("As a table", open=False):
        table = gr.Dataframe(interactive=False, elem_id="lineage-table")
    views = [tree, table, version]
    deploy.click(h.deploy, [version], [action, *views], api_name="lineage_deploy")
    rollback.click(h.rollback, None, [action, *views], api_name="lineage_rollback")
    return {"load": (h.refresh, views)}
