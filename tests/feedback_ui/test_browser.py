"""End to end in a real browser: `rlchat serve --auth` on a tiny model, driven by Chromium.

The tiny model is deployed as the base, with a LoRA on it as the arena's SFT candidate.

Each test logs in as one role, acts like a person (waiting on visible text, not sleeping) and
checks the rows in the database. A failing test leaves a screenshot in test-artifacts/; the
passing ones save the chat and annotate tabs to $RLCHAT_UI_SHOTS (default test-artifacts/).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from ui_helpers import PASSWORD, add_people, free_port, make_adapter, seed_chat

from agent.config import Settings
from agent.registry import ModelRegistry
from agent.store import jobs
from agent.store.api import Store

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("RLCHAT_UI_SHOTS", REPO / "test-artifacts"))
TIMEOUT_MS = 30_000
CANDIDATE = "arena-cand-7q"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"{CHROMIUM} is missing: install Debian's chromium (`.ci/run` does) to run these",
    ),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """`rlchat serve --auth` on a free port, a temporary database and the tiny model."""
    data = tmp_path_factory.mktemp("serve") / "data"
    settings = Settings(data_dir=data)
    store = Store.open(settings)
    registry = ModelRegistry(store, settings)
    base = registry.add("base", tiny_model_dir, name="served base")
    registry.deploy(base)
    adapter = make_adapter(tiny_model_dir, data.parent / "sft")
    registry.add("sft", adapter, parent_id=base, name=CANDIDATE)
    people = add_people(store)
    seeded_reply = seed_chat(store, people.carol, text="what is your favourite colour?")[0]
    port = free_port()
    log = open(data / "serve.log", "w")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "rlchat.cli", "--data-dir", str(data), "serve"]
    cmd += ["--port", str(port), "--auth", "--model", str(tiny_model_dir), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, proc, data / "serve.log")
        yield url, store, people, seeded_reply
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        store.close()


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rlchat serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"rlchat serve did not answer within {timeout_s} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def login(browser, server, request):
    """`login(name)` -> a logged-in page; screenshots it when the test fails."""
    url = server[0]
    pages = []

    def open_as(name: str):
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.goto(url)
        page.get_by_test_id("textbox").fill(name)
        page.get_by_test_id("password").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        page.get_by_text(f"Signed in as {name}").wait_for()
        pages.append(page)
        return page

    yield open_as
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for i, page in enumerate(pages):
        if failed:
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / f"FAILED-{request.node.name}-{i}.png"), full_page=True)
        page.context.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_chat_streams_a_reply_and_takes_a_thumbs_down(server, login) -> None:
    """The selector shows the new conversation as the current one; the reply is rated by its
    👎 icon, which opens the reasons/comment panel for that reply."""
    from playwright.sync_api import expect

    _, store, people, _ = server
    page = login("alice")
    assert not page.get_by_role("tab", name="Dashboard").is_visible()
    expect(page.locator("#fb-save")).to_be_hidden()  # the feedback panel opens from an icon
    text = "Hi! <script>window.__xss = 1</script><img src=x onerror='window.__xss = 2'> **bold**"
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-send").click()
    page.locator("#chat-bot .message").nth(1).wait_for()  # the reply is streaming in
    page.wait_for_function("() => document.querySelector('#chat-history input').value !== ''")
    assert page.evaluate("window.__xss") is None  # the markup was rendered inert
    [conv] = [c for c in store.list_conversations(user_id=people.alice)]
    user_msg, reply = store.messages(conv.id)
    assert user_msg.content == text and reply.role == "assistant"
    selector = page.locator("#chat-history input")
    assert selector.input_value().startswith(f"#{conv.id} ")  # the current conversation
    shot(page, "chat-selector")

    page.locator("#chat-bot").get_by_label("Dislike").last.click()
    expect(page.locator("#fb-save")).to_be_visible()
    expect(page.locator("#fb-heading")).to_contain_text("👎 saved")
    thumbs = lambda: [(r.kind, r.value) for r in store.ratings(message_id=reply.id)]  # noqa: E731
    _wait_for(lambda: thumbs() == [("thumb", -1.0)])  # the thumb alone is stored already
    page.locator("#fb-reasons").get_by_text("too long").click()
    page.locator("#fb-comment textarea").fill("rambles <b>a lot</b>")
    shot(page, "chat-feedback-panel")
    page.locator("#fb-save").click()
    page.get_by_text("Thanks! Your feedback on this reply is saved.").wait_for()
    [rating] = store.ratings(message_id=reply.id)
    assert (rating.kind, rating.value, rating.rater_id) == ("thumb", -1.0, people.alice)
    assert rating.reasons == ["too long"] and rating.comment == "rambles <b>a lot</b>"
    shot(page, "chat")


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_annotator_rates_with_the_keyboard(server, login) -> None:
    _, store, people, seeded_reply = server
    page = login("ann")
    assert not page.get_by_role("tab", name="Dashboard").is_visible()
    page.get_by_role("tab", name="Annotate").click()
    page.locator("#ann-info").get_by_text(re.compile(r"Reply #\d+")).wait_for()
    page.get_by_text("what is your favourite colour?").first.wait_for()
    page.locator("body").click(position={"x": 5, "y": 5})  # focus outside any text box
    page.keyboard.press("4")  # helpfulness
    page.keyboard.press("2")  # harmlessness
    page.locator("#ann-score-1 input:checked").wait_for(state="attached")
    shot(page, "annotate")
    page.keyboard.press("Control+Enter")
    page.locator("#ann-progress").get_by_text("1 replies rated").wait_for()
    rows = {r.criterion: r.value for r in store.ratings(rater_id=people.ann)}
    assert rows == {"helpfulness": 4.0, "harmlessness": 2.0}
    assert {r.message_id for r in store.ratings(rater_id=people.ann)} == {seeded_reply}


def test_admin_sees_the_counts(server, login) -> None:
    from playwright.sync_api import expect

    _, store, people, _ = server
    page = login("root")
    page.get_by_role("tab", name="Dashboard").click()
    summary = page.locator("#dash-summary")
    summary.get_by_text("Serving:").wait_for()
    counts = store.counts()
    for table in ("users", "conversations", "messages", "ratings"):
        summary.get_by_text(re.compile(rf"{table}\s*:\s*{counts[table]:,}\b")).first.wait_for()
    expect(page.locator("#dash-versions")).to_contain_text("deployed")
    expect(page.locator("#dash-deploy")).to_be_visible()
    shot(page, "dashboard")
    page.get_by_role("tab", name="Model lineage").click()
    tree = page.locator("#lineage-tree")
    expect(tree).to_contain_text("served base")
    expect(tree.locator("li").nth(1)).to_contain_text(CANDIDATE)  # the SFT under its base
    shot(page, "lineage")


def test_arena_vote_reveals_the_two_models(server, login) -> None:
    from playwright.sync_api import expect

    _, store, people, _ = server
    page = login("carol")
    page.get_by_role("tab", name="Arena").click()
    info = page.locator("#arena-info")
    info.get_by_text("Two anonymous models").wait_for()
    page.locator("#arena-input textarea").fill("which one of you is better?")
    page.locator("#arena-send").click()
    page.locator("#arena-vote-b").wait_for()  # shown once both replies are stored
    for side in ("#arena-a", "#arena-b"):
        expect(page.locator(side)).to_contain_text("which one of you is better?")
    assert CANDIDATE not in page.content() and "served base" not in page.content()
    shot(page, "arena")
    page.locator("#arena-vote-b").click()
    expect(info).to_contain_text("Saved: B is better")
    expect(info).to_contain_text(CANDIDATE)
    expect(info).to_contain_text("served base")
    [cmp] = store.comparisons(rater_id=people.carol)
    a, b = store.get_message(cmp.message_a_id), store.get_message(cmp.message_b_id)
    assert cmp.choice == "b" and a.parent_id == b.parent_id
    assert a.model_version_id != b.model_version_id
    assert store.get_conversation(a.conversation_id).source == "arena"


def _prompts(store: Store, n: int = 6) -> None:
    """User turns for PPO to practise on."""
    user = store.get_or_create_user("sim-user-ppo").id
    for i in range(n):
        conv = store.create_conversation(user, system_prompt="Be brief.")
        u1 = store.append_message(conv, "user", f"Hello number {i}")
        a1 = store.append_message(conv, "assistant", "Hi!", u1)
        store.append_message(conv, "user", f"Tell me about topic {i}", a1)


def _step(page) -> int:
    """The step the running job reports in the job list (0 before the first)."""
    found = re.search(r"step (\d+)/", page.locator("#jobs-table").inner_text())
    return int(found.group(1)) if found else 0


def test_admin_queues_a_ppo_job_watches_its_curve_and_cancels_it(
    server, login, tiny_model_dir
) -> None:
    from playwright.sync_api import expect

    _, store, people, _ = server
    _prompts(store)
    data_dir = Path(store.engine.url.database).parent
    log = open(data_dir / "worker.log", "w")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "rlchat.cli", "--data-dir", str(data_dir), "worker"]
    worker = subprocess.Popen(
        [*cmd, "--poll", "0.5"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        page = login("root")
        page.get_by_role("tab", name="Dashboard").click()
        page.get_by_role("tab", name="Jobs").click()
        config = (
            f"policy: {tiny_model_dir}\nreward: rl.oracles:follow_up\niterations: 500\n"
            "checkpoint_every: 3\nbatch_size: 4\nmini_batch_size: 2\nmax_new_tokens: 6\n"
            "eval_prompts: 2\ndevice: cpu\n"
        )
        page.locator("#jobs-yaml textarea").fill(config.replace("iterations: 500", "iteratons: 5"))
        page.locator("#jobs-queue").click()
        expect(page.locator("body")).to_contain_text("unknown field(s) iteratons")
        assert jobs.list_jobs(store) == []  # refused before queueing
        page.locator("#jobs-yaml textarea").fill(config)
        page.locator("#jobs-queue").click()
        expect(page.locator("#jobs-status")).to_contain_text("Queued job #")
        [job] = jobs.list_jobs(store)
        row = page.locator(f'#jobs-table tr[data-job="{job.id}"]')
        expect(row).to_have_attribute("data-status", "running", timeout=120_000)
        page.wait_for_function(STEP_AT_LEAST, arg=2, timeout=120_000)
        first = _step(page)
        line = page.locator("#jobs-curve-0 .mark-line path").first
        expect(line).to_be_attached()
        expect(page.locator("#jobs-curve-0")).to_contain_text("reward/mean")
        drawn = line.get_attribute("d")
        shot(page, "jobs-running")
        page.wait_for_function(STEP_AT_LEAST, arg=first + 3, timeout=120_000)
        assert _step(page) > first
        _wait_for(lambda: line.get_attribute("d") != drawn)  # the curve grew
        shot(page, "jobs-curve-grown")
        page.locator("#jobs-cancel").click()
        expect(page.locator("#jobs-status")).to_contain_text("stops at its next checkpoint")
        expect(row).to_have_attribute("data-status", "cancelled", timeout=120_000)
        shot(page, "jobs-cancelled")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
    job = jobs.get_job(store, job.id)
    run = store.get_run(job.training_run_id)
    assert job.status == "cancelled" and run.status == "cancelled"
    assert list((Path(run.log_path) / "checkpoints").glob("iter-*"))  # resumable
    assert "resumable from" in (run.error or "")


STEP_AT_LEAST = """(n) => {
  const m = /step (\\d+)\\//.exec(document.querySelector('#jobs-table').innerText);
  return m !== null && Number(m[1]) >= n;
}"""
