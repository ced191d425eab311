"""Concurrent writers against one database: rating upserts and appended messages.

    python -m benchmarks.store_writers                      # SQLite (NORMAL and FULL) in a temp dir
    python -m benchmarks.store_writers --url postgresql+psycopg://postgres@127.0.0.1:5432/test

Each of P processes does N rating upserts (cycling over a fixed set of replies, so most are
updates, and every tenth on a row shared by all processes) and N appended messages, first
through `Store` and then through the raw driver (psycopg or sqlite3: one plain statement per
write in autocommit, no validation, same pragmas) on a fresh database, and prints both and
their ratio. A PostgreSQL URL gets a new schema for each run, dropped afterwards. The
concurrency test reuses `prepare` and `run_writers` and checks every row is there once.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, make_url, text

from agent.config import Settings
from agent.store import db
from agent.store.api import Store

N_REPLIES = 50


@dataclass
class Setup:
    url: str
    conversation_id: int
    replies: list[int]
    shared_rater: int
    sqlite_synchronous: str = "NORMAL"


def open_store(url: str, sqlite_synchronous: str = "NORMAL") -> Store:
    settings = Settings(database_url=url)
    engine = db.make_engine(url, settings.sqlite_busy_timeout_ms, sqlite_synchronous)
    return Store(engine, settings.max_text_chars)


def prepare(url: str, processes: int, sqlite_synchronous: str = "NORMAL") -> Setup:
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    store = open_store(url, sqlite_synchronous)
    owner = store.get_or_create_user("owner")
    for p in range(processes):
        store.get_or_create_user(f"writer-{p}", "annotator")
    shared = store.get_or_create_user("shared-rater", "annotator")
    conv = store.create_conversation(owner.id)
    q = store.append_message(conv, "user", "question")
    replies = [store.append_message(conv, "assistant", f"reply {i}", q) for i in range(N_REPLIES)]
    store.close()
    return Setup(url, conv, replies, shared.id, sqlite_synchronous)


def _ours(setup: Setup, p: int, n: int, kind: str, barrier: Any) -> float:
    store = open_store(setup.url, setup.sqlite_synchronous)
    user = store.get_user(f"writer-{p}")
    assert user is not None
    barrier.wait()
    start = time.perf_counter()
    for i in range(n):
        if kind == "ratings":
            reply = setup.replies[i % N_REPLIES]
            store.set_rating(reply, user.id, "thumb", 1 if (i + p) % 2 else -1)
            if i % 10 == 0:
                shared_reply = setup.replies[(i // 10) % N_REPLIES]
                store.set_rating(
                    shared_reply, setup.shared_rater, "likert", 1 + (p + i) % 5, criterion="c"
                )
        else:
            store.append_message(setup.conversation_id, "user", f"p{p}-m{i}", setup.replies[0])
    elapsed = time.perf_counter() - start
    store.close()
    return elapsed


RAW_RATING = (
    "INSERT INTO ratings (message_id, rater_id, kind, criterion, value, reasons, comment, "
    "created_at, updated_at) VALUES ({0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}) "
    "ON CONFLICT (message_id, rater_id, kind, criterion) DO UPDATE SET value = excluded.value, "
    "reasons = excluded.reasons, comment = excluded.comment, updated_at = excluded.updated_at "
    "RETURNING id"
)
RAW_MESSAGE = (
    "INSERT INTO messages (conversation_id, parent_id, role, content, created_at) "
    "VALUES ({0}, {0}, {0}, {0}, {0}) RETURNING id"
)


@contextmanager
def _raw_connection(setup: Setup) -> Iterator[tuple[Any, str]]:
    """A raw driver connection in autocommit, and its parameter placeholder."""
    url = make_url(setup.url)
    if url.get_backend_name() == "sqlite":
        conn = sqlite3.connect(url.database, timeout=30, isolation_level=None)
        for pragma in ("journal_mode=WAL", f"synchronous={setup.sqlite_synchronous}"):
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("PRAGMA foreign_keys=ON")
        yield conn, "?"
        conn.close()
        return
    import psycopg

    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        yield conn, "%s"


def _raw(setup: Setup, p: int, n: int, kind: str, barrier: Any) -> float:
    with _raw_connection(setup) as (conn, mark):
        rating, message = RAW_RATING.format(mark), RAW_MESSAGE.format(mark)
        (rater,) = conn.execute(
            f"SELECT id FROM users WHERE name = {mark}", (f"writer-{p}",)
        ).fetchone()
        barrier.wait()
        start = time.perf_counter()
        for i in range(n):
            now = datetime.now(UTC).isoformat()
            if kind == "ratings":
                reply = setup.replies[i % N_REPLIES]
                value = 1.0 if (i + p) % 2 else -1.0
                conn.execute(rating, (reply, rater, "thumb", "", value, "[]", "", now, now))
                if i % 10 == 0:
                    shared = setup.replies[(i // 10) % N_REPLIES]
                    score = float(1 + (p + i) % 5)
                    row = (shared, setup.shared_rater, "likert", "c", score, "[]", "", now, now)
                    conn.execute(rating, row)
            else:
                row2 = (setup.conversation_id, setup.replies[0], "user", f"p{p}-m{i}", now)
                conn.execute(message, row2).fetchone()
        return time.perf_counter() - start


def _worker(path: str, setup: Setup, p: int, n: int, kind: str, barrier: Any, out: Any) -> None:
    work = _raw if path == "raw" else _ours
    out.put((p, work(setup, p, n, kind, barrier)))


def run_writers(setup: Setup, processes: int, n: int, kind: str, path: str = "store") -> float:
    """Run `processes` writers doing `n` operations of `kind` each; returns the wall seconds.

    `path` "store" writes through `Store`, "raw" through the bare driver.
    """
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(path, setup, p, n, kind, barrier, out))
        for p in range(processes)
    ]
    for proc in procs:
        proc.start()
    times = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        if proc.exitcode != 0:
            raise RuntimeError(f"writer process exited with {proc.exitcode}")
    return max(t for _, t in times)


@contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """A URL on an empty database: a new SQLite file (in a new folder beside the one given,
    or in the temp dir for `sqlite://`), or a new PostgreSQL schema."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        folder = Path(parsed.database).parent if parsed.database else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{tempfile.mkdtemp(prefix='rlchat-bench-', dir=folder)}/bench.db"
        return
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        sep = "&" if "?" in url else "?"
        yield f"{url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def measure(url: str, processes: int, n: int, path: str, synchronous: str) -> dict[str, float]:
    """Upserts/s and appends/s of one write path on a fresh database."""
    with fresh_database(url) as fresh:
        setup = prepare(fresh, processes, synchronous)
        n_upserts = processes * (n + (n + 9) // 10)
        t_rate = run_writers(setup, processes, n, "ratings", path)
        t_msg = run_writers(setup, processes, n, "messages", path)
    return {"upserts/s": n_upserts / t_rate, "appends/s": processes * n / t_msg}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", action="append", help="database URL (repeatable)")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("-n", type=int, default=500, help="operations of each kind per process")
    parser.add_argument(
        "--sqlite-synchronous",
        action="append",
        choices=db.SQLITE_SYNCHRONOUS,
        help="SQLite synchronous pragma to measure (repeatable; default NORMAL and FULL)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    urls = args.url or ["sqlite://"]
    loadavg = os.getloadavg()
    print(f"load average before: {loadavg[0]:.2f} {loadavg[1]:.2f} {loadavg[2]:.2f}")
    header = f"{'database':<18} {'writers':>7} {'path':>6} {'upserts/s':>10} {'appends/s':>10}"
    print(header + f" {'ratio upserts':>14} {'ratio appends':>14}")
    results = []
    for url in urls:
        backend = make_url(url).get_backend_name()
        modes = (
            (args.sqlite_synchronous or list(db.SQLITE_SYNCHRONOUS))
            if backend == "sqlite"
            else [""]
        )
        for mode in modes:
            name = f"{backend} {mode}".strip()
            ours = measure(url, args.processes, args.n, "store", mode or "NORMAL")
            raw = measure(url, args.processes, args.n, "raw", mode or "NORMAL")
            for path, r in (("store", ours), ("raw", raw)):
                print(
                    f"{name:<18} {args.processes:>7} {path:>6} {r['upserts/s']:>10,.0f} "
                    f"{r['appends/s']:>10,.0f}",
                    end="",
                )
                if path == "store":
                    print(
                        f" {ours['upserts/s'] / raw['upserts/s']:>13.2f}x "
                        f"{ours['appends/s'] / raw['appends/s']:>13.2f}x"
                    )
                else:
                    print()
            results.append({"database": name, "store": ours, "raw": raw})
    loadavg = os.getloadavg()
    print(f"load average after: {loadavg[0]:.2f} {loadavg[1]:.2f} {loadavg[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"processes": args.processes, "n": args.n, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
