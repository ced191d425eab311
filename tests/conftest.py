"""Shared fixtures: settings in a temp dir, a store on SQLite and PostgreSQL, a tiny model.

PostgreSQL tests run when RLCHAT_TEST_POSTGRES_URL is set (`.ci/run` sets it); each test gets
its own schema, so tests never see each other's rows and leave nothing behind.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from agent.config import Settings
from agent.store.api import Store

POSTGRES_URL = os.environ.get("RLCHAT_TEST_POSTGRES_URL", "")
SKIP_PG = "RLCHAT_TEST_POSTGRES_URL is not set (`.ci/run` sets it to the local PostgreSQL)"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Tests use tiny models: one thread each is fastest, and on shared or small machines a
    # second OpenMP thread mostly spin-waits (seen here: 10x slower under contention).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@contextmanager
def postgres_schema_url() -> Iterator[str]:
    """A URL on a new, empty PostgreSQL schema, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL: a SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip(SKIP_PG)
    with postgres_schema_url() as url:
        yield url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL schema (for tests about PostgreSQL only; mark them postgres)."""
    if not POSTGRES_URL:
        pytest.skip(SKIP_PG)
    with postgres_schema_url() as url:
        yield url


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url)


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    """A migrated store on each database (SQLite always; PostgreSQL when configured)."""
    from agent.store import db

    engine = db.make_engine(settings.database_url)
    db.upgrade(engine)
    engine.dispose()
    st = Store.open(settings)
    yield st
    st.close()


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    """Settings on SQLite only, for tests about models rather than databases."""
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def sqlite_store(sqlite_settings: Settings) -> Iterator[Store]:
    st = Store.open(sqlite_settings)
    yield st
    st.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with its own BPE tokenizer, in HF format, built once per session."""
    from agent.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


# ---- CI guard: with RLCHAT_REQUIRE=postgres,browser the run fails if those tests skipped ----

_OUTCOMES: dict[str, list[str]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.skipped:
        for marker in ("postgres", "browser"):
            if marker in report.keywords:
                _OUTCOMES.setdefault(marker, []).append(report.outcome)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    required = [m for m in os.environ.get("RLCHAT_REQUIRE", "").split(",") if m]
    missing = []
    for marker in required:
        outcomes = _OUTCOMES.get(marker, [])
        if not outcomes or "skipped" in outcomes:
            missing.append(
                f"{marker} ({outcomes.count('skipped')} skipped, {outcomes.count('passed')} passed)"
            )
    if missing:
        print(f"\nRLCHAT_REQUIRE: these tests must run, but did not all run: {', '.join(missing)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
