"""The Dashboard tab (admins): an overview (activity, ratings per model, agreement, annotators,
arena, models, runs), Jobs (`feedback_ui.jobs`) and the model lineage (`feedback_ui.lineage`).

Deploy and rollback go through `agent.registry.ModelRegistry`; a running `ChatAgent` serves the
new version from its next turn. Both handlers check the admin role on the server, so calling
them through the API as anyone else is refused.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from agent.errors import ValidationError
from agent.registry import ModelRegistry
from feedback_ui import stats
from feedback_ui.common import UIContext, id_input, number_component, user_errors
from feedback_ui.jobs import build_jobs_tab
from feedback_ui.lineage import build_lineage_tab

ROLE = "admin"
ARENA_BOOTSTRAP = 1000
"""Bootstrap resamples behind the arena's intervals."""
ARENA_SEED = 0
"""Seed of those resamples: a refresh shows the same intervals for the same data."""


class DashboardHandlers:
    """Event handlers of the Dashboard tab; each one checks for an admin caller first."""

    def __init__(self, ctx: UIContext) -> None:
        self.ctx = ctx
        self.registry = ModelRegistry(ctx.store, ctx.settings)

    @user_errors
    def refresh(self, request: gr.Request) -> tuple[Any, ...]:
        """Every figure and table of the dashboard, read fresh from the database."""
        self.ctx.caller(request, ROLE, "the dashboard")
        store = self.ctx.store
        totals = stats.totals(store)
        deployed = store.deployed_version()
        summary = " · ".join(f"**{k.replace('_', ' ')}**: {v:,}" for k, v in totals.items())
        serving = f"v{deployed.id} ({deployed.kind}) {deployed.name}" if deployed else "nothing"
        summary += f"\n\nServing: **{serving}**"
        per_day = stats.counts_per_day(store)
        dist = stats.rating_distribution(store)
        thumbs = dist[dist["rating"] == "thumb"]
        likert = dist[dist["rating"] != "thumb"]
        pairs, ratings, anchor = stats.arena(store, n_boot=ARENA_BOOTSTRAP, seed=ARENA_SEED)
        return (
            summary,
            per_day,
            per_day.pivot_table(index="day", columns="kind", values="count", fill_value=0)
            .reset_index()
            .rename_axis(None, axis=1),
            thumbs,
            _likert_means(likert),
            stats.agreement(store),
            stats.throughput(store),
            _arena_note(anchor),
            pairs,
            ratings,
            stats.model_versions(store),
            stats.training_runs(store),
        )

    @user_errors
    def deploy(self, version_id: float | None, request: gr.Request) -> tuple[Any, ...]:
        """Serve `version_id` from the next chat turn on (admins only)."""
        caller = self.ctx.caller(request, ROLE, "deploying a model")
        if version_id is None:
            raise ValidationError("version id: give the id of a model version from the table")
        mv = self.registry.deploy(id_input("version id", version_id))
        gr.Info(f"Deployed model version {mv.id}; chats use it from their next turn.")
        message = f"{caller.name} deployed version {mv.id} ({mv.kind} {mv.name})."
        return (message, *self.refresh(request))

    @user_errors
    def rollback(self, request: gr.Request) -> tuple[Any, ...]:
        """Return to the previously deployed version (admins only)."""
        caller = self.ctx.caller(request, ROLE, "rolling back a model")
        mv = self.registry.rollback()
        gr.Info(f"Rolled back to model version {mv.id}.")
        message = f"{caller.name} rolled back to version {mv.id} ({mv.kind} {mv.name})."
        return (message, *self.refresh(request))


def _arena_note(anchor: int | None) -> str:
    """How the arena tables are computed (and a hint when they are empty)."""
    if anchor is None:
        return (
            "No comparisons between replies of two different versions yet: they come from the "
            "Arena tab, from annotators' pairs and from the chat's *better* button."
        )
    return (
        "Comparisons between replies of two different versions (arena votes, annotators' "
        "pairs, the chat's *better* button). Ties and *both bad* count half a win to each side. "
        "Ratings: Bradley–Terry on the Elo scale (400 points = 10:1 odds), one virtual tie "
        f"between every two versions, **v{anchor} = 1000**. Intervals: 95% percentile "
        f"bootstrap over {ARENA_BOOTSTRAP:,} resamples of the comparisons."
    )


def _likert_means(likert: pd.DataFrame) -> pd.DataFrame:
    """Mean Likert score and count per model version and criterion."""
    columns = ["version", "criterion", "mean", "ratings"]
    if likert.empty:
        return pd.DataFrame(columns=columns)
    values = likert.assign(score=likert["value"].astype(float))
    values = values.assign(weighted=values["score"] * values["count"])
    grouped = values.groupby(["version", "rating"], as_index=False)[["weighted", "count"]].sum()
    grouped["mean"] = (grouped["weighted"] / grouped["count"]).round(2)
    grouped = grouped.rename(columns={"rating": "criterion", "count": "ratings"})
    return grouped[columns]


def build_dashboard_tab(ctx: UIContext) -> dict[str, Any]:
    """Lay out the Dashboard tab (Overview, Jobs, Model lineage) and wire its events; its
    `load` refreshes all three."""
    with gr.Tabs():
        with gr.Tab("Overview", id="dash-overview") as overview_tab:
            overview = build_overview(ctx)
        with gr.Tab("Jobs", id="dash-jobs") as jobs_tab:
            jobs = build_jobs_tab(ctx)
        with gr.Tab("Model lineage", id="dash-lineage") as lineage_tab:
            lineage = build_lineage_tab(ctx)
    parts = [overview["load"], jobs["load"], lineage["load"]]
    # The job list and curves refresh on a timer, only while the Jobs tab is on screen.
    jobs_tab.select(lambda: gr.Timer(active=True), None, jobs["timer"], api_name=False).then(
        jobs["load"][0], None, jobs["load"][1], api_name=False
    )
    for other in (overview_tab, lineage_tab):
        other.select(lambda: gr.Timer(active=False), None, jobs["timer"], api_name=False)
    lineage_tab.select(lineage["load"][0], None, lineage["load"][1], api_name=False)

    def load(request: gr.Request) -> tuple[Any, ...]:
        return tuple(value for fn, _ in parts for value in fn(request))

    return {"load": (load, [o for _, outputs in parts for o in outputs])}


def build_overview(ctx: UIContext) -> dict[str, Any]:
    """Lay out Dashboard → Overview inside the current Blocks and wire its events."""
    h = DashboardHandlers(ctx)
    with gr.Row():
        summary = gr.Markdown(elem_id="dash-summary")
        refresh = gr.Button("Refresh", scale=0, elem_id="dash-refresh")
    per_day_plot = gr.BarPlot(
        x="day", y="count", color="kind", title="Activity per day", height=280
    )
    with gr.Accordion("Activity per day (table)", open=False):
        per_day_table = gr.Dataframe(interactive=False, elem_id="dash-per-day")
    with gr.Row():
        thumbs_plot = gr.BarPlot(
            x="version", y="count", color="value", title="Thumbs per model version", height=260
        )
        likert_table = gr.Dataframe(label="Mean Likert score per version", interactive=False)
    with gr.Row():
        agreement = gr.Dataframe(
            label="Agreement on overlapping items (Krippendorff's alpha, ordinal)",
            interactive=False,
        )
        throughput = gr.Dataframe(label="Annotators", interactive=False)
    gr.Markdown("### Arena")
    arena_note = gr.Markdown(elem_id="dash-arena-note")
    arena_pairs = gr.Dataframe(
        label="Win-rate of A against B per pair of versions",
        interactive=False,
        elem_id="dash-arena-pairs",
    )
    arena_ratings = gr.Dataframe(
        label="Bradley–Terry ratings (Elo scale)", interactive=False, elem_id="dash-arena-ratings"
    )
    gr.Markdown("### Model versions")
    versions = gr.Dataframe(interactive=False, elem_id="dash-versions")
    with gr.Row():
        version_id = number_component(gr.Number(label="Version id", scale=1), "version id")
        deploy = gr.Button("Deploy", variant="primary", scale=0, elem_id="dash-deploy")
        rollback = gr.Button("Roll back", variant="stop", scale=0, elem_id="dash-rollback")
    action = gr.Markdown(elem_id="dash-action")
    gr.Markdown("### Training runs")
    runs = gr.Dataframe(interactive=False, elem_id="dash-runs")

    outputs = [
        summary, per_day_plot, per_day_table, thumbs_plot, likert_table,
        agreement, throughput, arena_note, arena_pairs, arena_ratings, versions, runs,
    ]  # fmt: skip
    refresh.click(h.refresh, None, outputs, api_name="dashboard_refresh")
    deploy.click(h.deploy, [version_id], [action, *outputs], api_name="deploy")
    rollback.click(h.rollback, None, [action, *outputs], api_name="rollback")
    return {"load": (h.refresh, outputs)}
