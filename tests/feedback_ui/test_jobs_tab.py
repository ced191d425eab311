"""Dashboard → Jobs and Dashboard → Model lineage handlers (admins only)."""

from __future__ import annotations

from datetime import timedelta

import gradio as gr
import pytest
from ui_helpers import request_as, seed_chat

from agent.store import jobs
from agent.store.models import Job, utcnow
from feedback_ui.jobs import JobsHandlers, jobs_html
from feedback_ui.lineage import LineageHandlers, lineage
from rl.runs import training_run

ROOT = request_as("root")


def test_queue_checks_the_config_and_names_the_field(store, people, ctx) -> None:
    h = JobsHandlers(ctx)
    with pytest.raises(gr.Error, match=r"unknown field\(s\) iteratons"):
        h.queue("ppo", "iteratons: 3", "", ROOT)
    with pytest.raises(gr.Error, match=r"Config\.batch_size"):
        h.queue("ppo", "", "batch_size=lots", ROOT)
    with pytest.raises(gr.Error, match="not valid YAML"):
        h.queue("ppo", "iterations: [", "", ROOT)
    with pytest.raises(gr.Error, match=r"pipeline ppo: .*unknown field\(s\) nope"):
        h.queue("pipeline", "", "ppo.nope=1", ROOT)
    with pytest.raises(gr.Error, match="needs the admin role"):
        h.queue("ppo", "iterations: 3", "", request_as("ann"))
    assert jobs.list_jobs(store) == []
    message, table, picker, *_ = h.queue("ppo", "iterations: 3", "seed=7\n\n", ROOT)
    [job] = jobs.list_jobs(store)
    assert message.startswith(f"Queued job #{job.id}")
    assert (job.kind, job.status, job.config, job.created_by) == (
        "ppo", "queued", {"iterations": 3, "seed": 7}, people.root,
    )  # fmt: skip
    assert f'data-job="{job.id}" data-status="queued"' in table and "<progress" in table
    assert picker["value"] == job.id


def test_cancel_and_resume(store, people, ctx) -> None:
    h = JobsHandlers(ctx)
    queued = jobs.enqueue(store, "sft", {})
    message, *_ = h.cancel(queued.id, ROOT)
    assert message == f"Job #{queued.id} cancelled." and jobs.get_job(store, queued.id).status == (
        "cancelled"
    )
    message, *_ = h.resume(queued.id, ROOT)
    assert "queued again" in message and jobs.get_job(store, queued.id).status == "queued"
    jobs.claim(store, "w")
    message, *_ = h.cancel(queued.id, ROOT)
    assert "stops at its next checkpoint" in message
    assert jobs.get_job(store, queued.id).cancel_requested
    with pytest.raises(gr.Error, match="pick a job"):
        h.cancel(None, ROOT)
    with pytest.raises(gr.Error, match="needs the admin role"):
        h.cancel(queued.id, request_as("alice"))


def test_progress_eta_and_escaping() -> None:
    now = utcnow()
    job = Job(
        id=3, kind="ppo", status="running", progress=0.5, cancel_requested=False,
        message="<script>x()</script>", created_by=None, created_at=now,
        started_at=now - timedelta(seconds=120),
    )  # fmt: skip
    table = jobs_html([job], {})
    assert 'value="0.500"' in table and "50%" in table
    assert "2 min 00 s" in table or "1 min 59 s" in table  # as long again as it took so far
    assert "<script>" not in table and "&lt;script&gt;" in table
    assert "no heartbeat" not in table
    job.heartbeat_at = now - timedelta(seconds=90)  # its worker was killed
    assert "no heartbeat for 1 min 30 s" in jobs_html([job], {})


def test_curves_come_from_the_runs_metrics(store, people, ctx, settings) -> None:
    h = JobsHandlers(ctx)
    job = jobs.enqueue(store, "ppo", {})
    jobs.claim(store, "w")
    with training_run(store, settings, "ppo", {"iterations": 3}) as run:
        for step in (1, 2):
            run.log(step, {"reward/mean": 0.1 * step, "kl/mean": 0.01, "loss/value": 2.0})
    jobs.heartbeat(store, job.id, "w", progress=2 / 3, training_run_id=run.id)
    table, picker, runs, metrics, *plots, tensorboard = h.refresh(None, None, None, ROOT)
    assert picker["value"] == job.id and runs["value"] == run.id
    assert metrics["choices"] == ["kl/mean", "loss/value", "reward/mean"]
    assert metrics["value"] == ["reward/mean", "kl/mean"]  # the headline ones by default
    assert [p["visible"] for p in plots] == [True, True, False, False]
    assert [p["label"] for p in plots[:2]] == ["reward/mean", "kl/mean"]
    assert list(plots[0]["value"]["value"]) == pytest.approx([0.1, 0.2])
    assert list(plots[0]["value"]["step"]) == [1, 2]
    assert f"{run.id}" in tensorboard and "tensorboard --logdir" in tensorboard
    *_, first, second, _, _, _ = h.refresh(job.id, run.id, ["loss/value"], ROOT)
    assert first["label"] == "loss/value" and len(first["value"]) == 2
    assert second["visible"] is False
    with pytest.raises(gr.Error, match="needs the admin role"):
        h.refresh(None, None, None, request_as("bob"))


def _source(store, conversation_id: int, source: str) -> None:
    from agent.store.models import Conversation

    with store.transaction() as s:
        s.get(Conversation, conversation_id).source = source


def test_lineage_tree_verdicts_and_feedback_sources(store, people, ctx, settings) -> None:
    real = seed_chat(store, people.alice, replies=2)
    sim = seed_chat(store, people.carol, replies=2)
    _source(store, store.get_message(sim[0]).conversation_id, "simulated")
    ratings = [
        store.set_rating(real[0], people.ann, "likert", 4, criterion="helpfulness"),
        store.set_rating(sim[0], people.ann, "likert", 2, criterion="helpfulness"),
        store.set_rating(sim[1], people.bob, "likert", 5, criterion="helpfulness"),
    ]
    comparisons = [store.add_comparison(people.ann, real[0], real[1], "a")]
    base = store.register_model_version("base", "/m/base", name="base")
    sft = store.register_model_version("sft", "/m/sft", name="sft-1", parent_id=base)
    rm = store.register_model_version("reward", "/m/rm", name="rm-1", parent_id=sft)
    ppo = store.register_model_version("ppo", "/m/ppo", name="ppo-1", parent_id=sft)
    rating_ids = [r if isinstance(r, int) else r.id for r in ratings]
    comparison_ids = [c if isinstance(c, int) else c.id for c in comparisons]
    for kind, version, data in (
        ("sft", sft, {"messages": [real[0], sim[1]]}),
        ("reward", rm, {"ratings": rating_ids, "comparisons": comparison_ids}),
    ):
        run_id = store.start_run(kind, {}, data_cutoff=utcnow(), data_ids=data)
        store.update_run(run_id, status="succeeded", output_version_id=version)
    eval_run = store.start_run("eval", {"candidate": ppo})
    gate = {"deploy": False, "reasons": ["win-rate 0.41 < 0.5"]}
    store.update_run(eval_run, status="succeeded", metrics={"gate": gate})

    rows = {r["version"]: r for r in lineage(store)}
    assert [r["version"] for r in lineage(store)] == [base, sft, rm, ppo]  # parents first
    assert (rows[sft]["depth"], rows[ppo]["depth"]) == (1, 2)
    assert rows[rm]["ratings real/sim"] == "1 / 2" and rows[rm]["comparisons real/sim"] == "1 / 0"
    # SFT: the two replies it imitated, and the feedback on them before its cut-off
    assert rows[sft]["examples real/sim"] == "1 / 1"
    assert rows[sft]["ratings real/sim"] == "1 / 1" and rows[sft]["comparisons real/sim"] == "1 / 0"
    assert rows[ppo]["verdict"] == f"gate refused (eval run {eval_run}): win-rate 0.41 < 0.5"
    tree, table, picker = LineageHandlers(ctx).refresh(ROOT)
    assert f'data-version="{ppo}"' in tree and "gate refused" in tree
    assert [v for _, v in picker["choices"]] == [base, sft, ppo]  # policies only
    with pytest.raises(gr.Error, match="needs the admin role"):
        LineageHandlers(ctx).refresh(request_as("ann"))


def test_lineage_deploy_and_rollback(store, people, ctx, tmp_path) -> None:
    h = LineageHandlers(ctx)
    ids = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        ids.append(h.registry.add("base", tmp_path / name, name=name))
    with pytest.raises(gr.Error, match="needs the admin role"):
        h.deploy(ids[0], request_as("alice"))
    for version in ids:
        message, tree, *_ = h.deploy(version, ROOT)
        assert f"deployed version {version}" in message
    assert "[deployed]" in tree and store.deployed_version().id == ids[1]
    message, *_ = h.rollback(ROOT)
    assert f"rolled back to version {ids[0]}" in message
    assert store.deployed_version().id == ids[0]
