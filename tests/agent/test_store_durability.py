"""kill -9 in the middle of rating: every write the store acknowledged is there afterwards.

Four processes rate as fast as they can and append each acknowledged write's number to a
file only after `set_rating` returned; they are killed with SIGKILL mid-run, the database is
opened again (SQLite recovers its WAL), and every acknowledged rating must be there with its
value. On PostgreSQL the server keeps running; the test also checks `synchronous_commit` is
on, which is what makes "acknowledged" mean "on disk" there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text

from agent.config import Settings
from agent.store.api import Store
from agent.store.models import Rating

PROCESSES = 4
MIN_ACKS = 40  # each process has acknowledged at least this many writes when it is killed

RATER = """
import json, os, sys
from agent.config import Settings
from agent.store.api import Store

args = json.loads(sys.argv[1])
store = Store.open(Settings(database_url=args["url"]), migrate=False)
fd = os.open(args["acks"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
replies = args["replies"]
for i in range(1_000_000):
    store.set_rating(
        replies[i % len(replies)], args["rater"], "likert", 1 + i % 5, criterion=f"k{i}"
    )
    os.write(fd, f"{i}\\n".encode())  # acknowledged: set_rating returned
"""


def _acks(path: Path) -> list[int]:
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    return [int(x) for x in lines[:-1]]  # the last piece may be a half-written line


@pytest.mark.slow
def test_acknowledged_ratings_survive_kill_9(store: Store, database_url: str, tmp_path) -> None:
    owner = store.get_or_create_user("owner")
    raters = [store.get_or_create_user(f"rater-{p}", "annotator").id for p in range(PROCESSES)]
    conv = store.create_conversation(owner.id)
    q = store.append_message(conv, "user", "question")
    replies = [store.append_message(conv, "assistant", f"reply {i}", q) for i in range(5)]
    if store.engine.dialect.name == "postgresql":
        with store.engine.connect() as conn:
            assert conn.execute(text("SHOW synchronous_commit")).scalar() == "on"
    store.close()

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    procs, ack_files = [], []
    for p, rater in enumerate(raters):
        acks = tmp_path / f"acks-{p}"
        args = {"url": database_url, "acks": str(acks), "replies": replies, "rater": rater}
        cmd = [sys.executable, "-c", RATER, json.dumps(args)]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE))
        ack_files.append(acks)
    deadline = time.monotonic() + 180
    try:
        while min(len(_acks(a)) for a in ack_files) < MIN_ACKS:
            for proc in procs:
                if proc.poll() is not None:
                    raise AssertionError(f"a rater died early: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError("the raters did not get going within 180 s")
            time.sleep(0.05)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
        for proc in procs:
            proc.wait()
    assert all(proc.returncode == -signal.SIGKILL for proc in procs)  # killed mid-run

    reopened = Store.open(Settings(database_url=database_url))
    try:
        with reopened.reading() as s:
            stored = {
                (r.rater_id, r.criterion): r.value
                for r in s.scalars(select(Rating).where(Rating.kind == "likert"))
            }
    finally:
        reopened.close()
    for rater, acks in zip(raters, ack_files, strict=True):
        acknowledged = _acks(acks)
        assert len(acknowledged) >= MIN_ACKS
        missing = [i for i in acknowledged if stored.get((rater, f"k{i}")) != 1 + i % 5]
        assert missing == [], f"rater {rater}: acknowledged but not stored: {missing[:10]}"
