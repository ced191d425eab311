"""Errors a user can cause on the command line print one line (cause and fix), no traceback."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from agent.config import Settings
from agent.registry import ModelRegistry
from agent.store import db
from agent.store.api import Store


def rlchat(
    *args: str | bytes, url: str | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess:
    cmd: list[str | bytes] = [sys.executable, "-m", "rlchat.cli"]
    if url:
        cmd += ["--database-url", url]
    result = subprocess.run([*cmd, *args], input=stdin, capture_output=True, timeout=300)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, no traceback, and the last stderr line is rlchat's error naming every needle."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, result.stderr


def migrated(url: str) -> Store:
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    return Store(db.make_engine(url))


@pytest.mark.postgres
def test_writing_to_a_read_only_database(postgres_url: str) -> None:
    migrated(postgres_url).close()
    read_only = f"{postgres_url}%20-cdefault_transaction_read_only%3Don"
    result = rlchat("users", "add", "dora", "--password-stdin", url=read_only, stdin=b"a-long-pw\n")
    one_line_error(result, "read-only", "writable database")


def test_writing_to_a_read_only_sqlite_file(tmp_path: Path) -> None:
    Store.open(Settings(data_dir=tmp_path)).close()
    database = tmp_path / "rlchat.db"
    for extra in ("-wal", "-shm"):
        Path(f"{database}{extra}").unlink(missing_ok=True)
    if subprocess.run(["chattr", "+i", str(database)], capture_output=True).returncode:
        pytest.skip("cannot make a file read-only for this user (chattr +i refused)")
    try:
        result = rlchat("--data-dir", str(tmp_path), "users", "add", "dora", "--password-stdin",
                        stdin=b"a-long-pw\n")  # fmt: skip
    finally:
        subprocess.run(["chattr", "-i", str(database)], check=True)
    one_line_error(result, "read-only")


@pytest.mark.postgres
def test_two_deploys_at_once(postgres_url: str, tmp_path: Path) -> None:
    """A deploy that commits while another waits on its lock: the loser gets a clear error."""
    store = migrated(postgres_url)
    ids = [store.register_model_version("base", f"org/model-{i}") for i in range(3)]
    store.deploy(ids[0])
    store.close()
    engine = create_engine(postgres_url)
    with engine.connect() as other:  # a first deploy of ids[1], not yet committed
        other.execute(text("UPDATE model_versions SET status='retired' WHERE status='deployed'"))
        other.execute(text(f"UPDATE model_versions SET status='deployed' WHERE id={ids[1]}"))
        results: list[subprocess.CompletedProcess] = []
        second = threading.Thread(
            target=lambda: results.append(rlchat("models", "deploy", str(ids[2]), url=postgres_url))
        )
        second.start()
        _wait_for_a_lock_wait(engine)
        other.commit()
        second.join()
    engine.dispose()
    one_line_error(results[0], "conflicting change", "run the command again")


def _wait_for_a_lock_wait(engine, timeout_s: float = 120) -> None:
    query = text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
    deadline = time.monotonic() + timeout_s
    with engine.connect() as conn:
        while conn.execute(query).scalar() == 0:
            if time.monotonic() > deadline:
                raise AssertionError("the second deploy never waited for the first")
            time.sleep(0.1)
            conn.rollback()


def test_version_id_beyond_the_database_integer(database_url: str) -> None:
    migrated(database_url).close()
    result = rlchat("models", "deploy", "2147483648", url=database_url)
    one_line_error(result, "2147483648 is not a version id")


def test_chat_user_name_too_long_or_not_unicode(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    one_line_error(rlchat(*data, "chat", "--user", "x" * 100), "over the limit of 80")
    one_line_error(rlchat(*data, "chat", "--user", b"caf\xe9"), "lone surrogate")
    one_line_error(
        rlchat(*data, "users", "add", b"\xff", "--password-stdin", stdin=b"a-long-pw\n"),
        "lone surrogate",
    )


def test_database_path_under_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = rlchat("--data-dir", str(blocker / "data"), "db", "stats")
    one_line_error(result, str(blocker), "check the paths")


def test_chat_skips_a_line_of_invalid_utf8(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    store = Store.open(settings)
    registry = ModelRegistry(store, settings)
    registry.deploy(registry.add("base", tiny_model_dir, name="tiny"))
    stdin = b"caf\xe9 au lait\nhello there\n/quit\n"
    result = rlchat(
        "--data-dir", str(tmp_path), "chat", "--user", "dora", "--max-new-tokens", "4",
        "--device", "cpu", stdin=stdin,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "not valid UTF-8" in result.stderr
    [conversation] = store.list_conversations()
    assert [m.content for m in store.messages(conversation.id) if m.role == "user"] == [
        "hello there"
    ]
    store.close()
