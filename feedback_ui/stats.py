"""Read-only aggregate queries behind the dashboard and the annotators' progress line.

Each function is one short read through `Store.transaction()` and returns a pandas DataFrame
(or a dict) ready for a Gradio table or plot. Nothing here writes.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from typing import Any

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import aliased

from agent.store.api import Store
from agent.store.models import (
    Comparison,
    Conversation,
    Message,
    ModelVersion,
    Rating,
    TrainingRun,
    User,
    utcnow,
)
from feedback_ui import ratings
from feedback_ui.agreement import krippendorff_alpha


def counts_per_day(store: Store, days: int = 30) -> pd.DataFrame:
    """Rows created per day and table over the last `days` days: columns day, kind, count."""
    since = utcnow() - timedelta(days=days)
    rows: list[dict[str, Any]] = []
    tables = {
        "conversations": Conversation,
        "messages": Message,
        "ratings": Rating,
        "comparisons": Comparison,
    }
    with store.transaction() as s:
        for kind, model in tables.items():
            day = func.date(model.created_at)
            stmt = (
                select(day, func.count())
                .where(model.created_at >= since)
                .group_by(day)
                .order_by(day)
            )
            rows += [{"day": str(d), "kind": kind, "count": int(n)} for d, n in s.execute(stmt)]
    return pd.DataFrame(rows, columns=["day", "kind", "count"])


def totals(store: Store) -> dict[str, int]:
    """Row counts of the tables a person cares about."""
    counts = store.counts()
    keys = ("users", "conversations", "messages", "ratings", "comparisons", "model_versions")
    return {k: counts.get(k, 0) for k in keys}


def rating_distribution(store: Store) -> pd.DataFrame:
    """Ratings per model version, kind, criterion and value: columns version, rating, value, count."""
    version = func.coalesce(Message.model_version_id, 0)
    stmt = (
        select(version, Rating.kind, Rating.criterion, Rating.value, func.count())
        .join(Message, Message.id == Rating.message_id)
        .group_by(version, Rating.kind, Rating.criterion, Rating.value)
        .order_by(version, Rating.kind, Rating.criterion, Rating.value)
    )
    with store.transaction() as s:
        names = {mv.id: mv.name for mv in s.scalars(select(ModelVersion))}
        result = list(s.execute(stmt))
    rows = []
    for vid, kind, criterion, value, n in result:
        label = f"v{vid} {names.get(vid, '')}".strip() if vid else "unknown"
        rating = "thumb" if kind == "thumb" else f"{criterion}"
        shown = ("up" if value > 0 else "down") if kind == "thumb" else str(int(value))
        rows.append({"version": label, "rating": rating, "value": shown, "count": int(n)})
    return pd.DataFrame(rows, columns=["version", "rating", "value", "count"])


def agreement(store: Store) -> pd.DataFrame:
    """Krippendorff's alpha (ordinal) per Likert criterion over items rated by >= 2 annotators."""
    stmt = select(Rating.criterion, Rating.message_id, Rating.value).where(Rating.kind == "likert")
    by_criterion: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    with store.transaction() as s:
        for criterion, message_id, value in s.execute(stmt):
            by_criterion[criterion][message_id].append(value)
    rows = []
    for criterion, units in sorted(by_criterion.items()):
        overlapping = {m: v for m, v in units.items() if len(v) >= 2}
        alpha = krippendorff_alpha(overlapping, "ordinal")
        rows.append(
            {
                "criterion": criterion,
                "alpha": None if alpha is None else round(alpha, 3),
                "items": len(overlapping),
                "ratings": sum(len(v) for v in overlapping.values()),
            }
        )
    return pd.DataFrame(rows, columns=["criterion", "alpha", "items", "ratings"])


def throughput(store: Store) -> pd.DataFrame:
    """Per rater: items rated, comparisons made, both in the last 24 hours, last activity."""
    day_ago = utcnow() - timedelta(days=1)
    items = func.count(func.distinct(Rating.message_id))
    recent = func.count(func.distinct(Rating.message_id)).filter(Rating.created_at >= day_ago)
    rated = select(Rating.rater_id, items, recent, func.max(Rating.created_at)).group_by(
        Rating.rater_id
    )
    compared = select(
        Comparison.rater_id,
        func.count(),
        func.count().filter(Comparison.created_at >= day_ago),
    ).group_by(Comparison.rater_id)
    with store.transaction() as s:
        users = {u.id: u for u in s.scalars(select(User))}
        r_rows = {r[0]: r[1:] for r in s.execute(rated)}
        c_rows = {r[0]: r[1:] for r in s.execute(compared)}
    rows = []
    for uid in sorted(set(r_rows) | set(c_rows)):
        n_items, n_recent, last = r_rows.get(uid, (0, 0, None))
        n_cmp, n_cmp_recent = c_rows.get(uid, (0, 0))
        user = users.get(uid)
        rows.append(
            {
                "rater": user.name if user else str(uid),
                "role": user.role if user else "",
                "items rated": int(n_items),
                "comparisons": int(n_cmp),
                "last 24 h": int(n_recent) + int(n_cmp_recent),
                "last rating": str(last)[:19] if last else "",
            }
        )
    columns = ["rater", "role", "items rated", "comparisons", "last 24 h", "last rating"]
    return pd.DataFrame(rows, columns=columns)


def model_versions(store: Store) -> pd.DataFrame:
    """Every model version with its status and metrics, newest first."""
    rows = [
        {
            "id": mv.id,
            "kind": mv.kind,
            "name": mv.name,
            "status": mv.status,
            "parent": mv.parent_id or "",
            "metrics": _compact(mv.metrics),
            "created": str(mv.created_at)[:19],
        }
        for mv in reversed(store.list_model_versions())
    ]
    return pd.DataFrame(
        rows, columns=["id", "kind", "name", "status", "parent", "metrics", "created"]
    )


def training_runs(store: Store) -> pd.DataFrame:
    """Every training run with status and its newest metrics, newest first."""
    with store.transaction() as s:
        runs = list(s.scalars(select(TrainingRun).order_by(TrainingRun.id.desc())))
    rows = [
        {
            "id": r.id,
            "kind": r.kind,
            "status": r.status,
            "output version": r.output_version_id or "",
            "metrics": _compact(r.metrics),
            "started": str(r.started_at)[:19],
            "finished": str(r.finished_at)[:19] if r.finished_at else "",
            "error": (r.error or "")[:120],
        }
        for r in runs
    ]
    columns = ["id", "kind", "status", "output version", "metrics", "started", "finished", "error"]
    return pd.DataFrame(rows, columns=columns)


def arena_games(store: Store, both_bad: str = "tie") -> list[ratings.Game]:
    """Every comparison whose two replies come from different model versions, as a game.

    Arena votes, annotators' pairs and the chat's "better" clicks all count. "Both bad" counts
    as a tie (neither reply preferred) or, with ``both_bad="exclude"``, not at all.
    """
    a, b = aliased(Message), aliased(Message)
    stmt = (
        select(a.model_version_id, b.model_version_id, Comparison.choice)
        .join(a, a.id == Comparison.message_a_id)
        .join(b, b.id == Comparison.message_b_id)
        .where(
            a.model_version_id.is_not(None),
            b.model_version_id.is_not(None),
            a.model_version_id != b.model_version_id,
        )
        .order_by(Comparison.id)
    )
    with store.transaction() as s:
        rows = list(s.execute(stmt))
    games = [(va, vb, ratings.choice_score(choice, both_bad)) for va, vb, choice in rows]
    return [(va, vb, score) for va, vb, score in games if score is not None]


def arena(
    store: Store, *, n_boot: int = 1000, seed: int = 0, both_bad: str = "tie", prior: float = 1.0
) -> tuple[pd.DataFrame, pd.DataFrame, int | None]:
    """Win-rate per pair of versions and Bradley–Terry ratings, with 95% bootstrap intervals.

    Returns (pairs, ratings, anchor): the anchor, rated 1000, is the oldest base version that
    played (else the oldest version that played); None when there are no games.
    """
    games = arena_games(store, both_bad)
    versions = {mv.id: mv for mv in store.list_model_versions()}
    label = {v: f"v{v} {mv.kind} {mv.name}".strip() for v, mv in versions.items()}
    pair_rows = [
        {
            "version A": label[p.version_a],
            "version B": label[p.version_b],
            "games": p.n,
            "A wins": p.wins_a,
            "ties": p.ties,
            "B wins": p.wins_b,
            "A win-rate": round(p.win_rate_a, 3),
            "CI low": round(p.lower, 3),
            "CI high": round(p.upper, 3),
        }
        for p in ratings.pair_win_rates(games, n_boot=n_boot, seed=seed)
    ]
    played = sorted({v for va, vb, _ in games for v in (va, vb)})
    bases = [v for v in played if versions[v].kind == "base"]
    anchor = (bases or played or [None])[0]
    fitted = ratings.bradley_terry(games, anchor=anchor, prior=prior, n_boot=n_boot, seed=seed)
    rating_rows = [
        {
            "version": label[r.version],
            "status": versions[r.version].status,
            "rating": round(r.rating, 1),
            "CI low": round(r.lower, 1),
            "CI high": round(r.upper, 1),
            "games": r.games,
        }
        for r in fitted
    ]
    pair_columns = ["version A", "version B", "games", "A wins", "ties", "B wins", "A win-rate"]
    rating_columns = ["version", "status", "rating", "CI low", "CI high", "games"]
    return (
        pd.DataFrame(pair_rows, columns=[*pair_columns, "CI low", "CI high"]),
        pd.DataFrame(rating_rows, columns=rating_columns),
        anchor,
    )


def annotator_progress(store: Store, rater_id: int, overlap: int) -> dict[str, int]:
    """What one annotator has done (items, comparisons, today) and how many items still wait."""
    today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
    raters = (
        select(Rating.message_id, func.count(func.distinct(Rating.rater_id)).label("n"))
        .group_by(Rating.message_id)
        .subquery()
    )
    mine = select(Rating.message_id).where(Rating.rater_id == rater_id)
    waiting = (
        select(func.count(Message.id))
        .join(Conversation, Conversation.id == Message.conversation_id)
        .outerjoin(raters, raters.c.message_id == Message.id)
        .where(
            Message.role == "assistant",
            Message.error.is_(None),
            Conversation.user_id != rater_id,
            Message.id.not_in(mine),
            func.coalesce(raters.c.n, 0) < overlap,
        )
    )
    items = select(func.count(func.distinct(Rating.message_id))).where(Rating.rater_id == rater_id)
    with store.transaction() as s:
        return {
            "items": s.scalar(items) or 0,
            "today": s.scalar(items.where(Rating.created_at >= today)) or 0,
            "comparisons": s.scalar(
                select(func.count(Comparison.id)).where(Comparison.rater_id == rater_id)
            )
            or 0,
            "waiting": s.scalar(waiting) or 0,
        }


def _compact(metrics: dict[str, Any], limit: int = 6) -> str:
    """A short `key=value` summary of a metrics dict for a table cell."""
    parts = []
    for key, value in list(metrics.items())[:limit]:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={shown}")
    more = len(metrics) - limit
    return ", ".join(parts) + (f", … (+{more})" if more > 0 else "")
