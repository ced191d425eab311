"""The `rlchat db` and `rlchat export` commands, run as a user would, on both databases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import Settings
from agent.store import db
from agent.store.api import Store


def rlchat(
    *args: str, env_url: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlchat.cli", *args]
    if env_url:
        cmd[3:3] = ["--database-url", env_url]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)


def test_db_upgrade_then_stats(database_url: str) -> None:
    up = rlchat("db", "upgrade", env_url=database_url)
    assert up.returncode == 0, up.stderr
    assert "schema revision: 0002" in up.stdout
    stats = rlchat("db", "stats", env_url=database_url)
    assert stats.returncode == 0, stats.stderr
    assert "messages" in stats.stdout and "ratings" in stats.stdout
    down = rlchat("db", "downgrade", "base", env_url=database_url)
    assert down.returncode == 0, down.stderr
    assert "base (empty)" in down.stdout


def test_downgrade_needs_a_revision_and_yes_when_data_would_go(database_url: str) -> None:
    engine = db.make_engine(database_url)
    db.upgrade(engine)
    engine.dispose()
    no_revision = rlchat("db", "downgrade", env_url=database_url)
    assert no_revision.returncode == 2 and "revision" in no_revision.stderr
    store = Store(db.make_engine(database_url))
    user = store.get_or_create_user("u")
    conv = store.create_conversation(user.id)
    store.append_message(conv, "user", "hi")
    store.close()
    refused = rlchat("db", "downgrade", "base", env_url=database_url)
    assert refused.returncode == 2, refused.stdout
    assert "3 rows" in refused.stderr and "--yes" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert rlchat("db", "current", env_url=database_url).stdout.strip().endswith("0002")
    done = rlchat("db", "downgrade", "base", "--yes", env_url=database_url)
    assert done.returncode == 0, done.stderr
    assert "base (empty)" in done.stdout


def test_new_sqlite_file_is_migrated_at_start(tmp_path: Path) -> None:
    result = rlchat("--data-dir", str(tmp_path / "fresh"), "db", "stats")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "fresh" / "rlchat.db").exists()


@pytest.mark.postgres
def test_unmigrated_postgres_is_a_clear_error(postgres_url: str) -> None:
    result = rlchat("db", "stats", env_url=postgres_url)
    assert result.returncode == 2
    assert "run `rlchat db upgrade`" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("postgresql+psycopg://postgres@127.0.0.1:1/none", "cannot connect to database"),
        ("mysql://x@y/z", "unsupported database 'mysql'"),
        ("not a url", "not a URL"),
        ("postgresql+psycopg2://postgres@127.0.0.1/test", "psycopg 3 driver"),
    ],
)
def test_wrong_database_url_fails_at_start(url: str, match: str) -> None:
    result = rlchat("db", "stats", env_url=url)
    assert result.returncode == 2
    assert match in result.stderr and "Traceback" not in result.stderr


def test_export_cli(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    store = Store.open(settings)
    u = store.get_or_create_user("u")
    conv = store.create_conversation(u.id)
    q = store.append_message(conv, "user", "hi")
    a = store.append_message(conv, "assistant", "hello", q)
    b = store.append_message(conv, "assistant", "go away", q)
    store.add_comparison(u.id, a, b, "a")
    store.close()
    out = tmp_path / "prefs.jsonl"
    result = rlchat("--data-dir", str(tmp_path), "export", "preferences", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["chosen"][0]["content"] == "hello"
    result = rlchat(
        "--data-dir", str(tmp_path), "export", "conversations", "--out", str(tmp_path / "c.jsonl")
    )
    assert "wrote 2 conversations" in result.stdout


def test_migrations_ship_with_the_package() -> None:
    assert (db.MIGRATIONS_DIR / "versions" / "0001_initial_schema.py").is_file()
