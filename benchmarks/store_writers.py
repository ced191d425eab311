"""Concurrent writers against one database: rating upserts and appended messages.

    python -m benchmarks.store_writers                      # SQLite in a temp dir
    python -m benchmarks.store_writers --url postgresql+psycopg://postgres@127.0.0.1:5432/test

Each of P processes does N rating upserts (cycling over a fixed set of replies, so most are
updates, and every tenth on a row shared by all processes) and N appended messages. Prints
upserts/s and appends/s per database; the concurrency test reuses `run_writers` and checks
that every row is there exactly once.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from dataclasses import dataclass

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


def prepare(url: str, processes: int) -> Setup:
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    store = Store.open(Settings(database_url=url))
    owner = store.get_or_create_user("owner")
    for p in range(processes):
        store.get_or_create_user(f"writer-{p}", "annotator")
    shared = store.get_or_create_user("shared-rater", "annotator")
    conv = store.create_conversation(owner.id)
    q = store.append_message(conv, "user", "question")
    replies = [store.append_message(conv, "assistant", f"reply {i}", q) for i in range(N_REPLIES)]
    store.close()
    return Setup(url, conv, replies, shared.id)


def _writer(setup: Setup, p: int, n: int, kind: str, barrier, out) -> None:
    store = Store.open(Settings(database_url=setup.url), migrate=False)
    rater = store.get_user(f"writer-{p}").id
    barrier.wait()
    start = time.perf_counter()
    for i in range(n):
        if kind == "ratings":
            reply = setup.replies[i % N_REPLIES]
            store.set_rating(reply, rater, "thumb", 1 if (i + p) % 2 else -1)
            if i % 10 == 0:
                shared_reply = setup.replies[(i // 10) % N_REPLIES]
                store.set_rating(
                    shared_reply, setup.shared_rater, "likert", 1 + (p + i) % 5, criterion="c"
                )
        else:
            store.append_message(setup.conversation_id, "user", f"p{p}-m{i}", setup.replies[0])
    out.put((p, time.perf_counter() - start))
    store.close()


def run_writers(setup: Setup, processes: int, n: int, kind: str) -> float:
    """Run `processes` writers doing `n` operations of `kind` each; returns the wall seconds."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(setup, p, n, kind, barrier, out))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", action="append", help="database URL (repeatable)")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("-n", type=int, default=500, help="operations of each kind per process")
    args = parser.parse_args()
    urls = args.url or [f"sqlite:///{tempfile.mkdtemp()}/bench.db"]
    print(f"{'database':<12} {'writers':>7} {'upserts/s':>10} {'appends/s':>10}")
    for url in urls:
        setup = prepare(url, args.processes)
        n_upserts = args.processes * (args.n + args.n // 10)
        t_rate = run_writers(setup, args.processes, args.n, "ratings")
        t_msg = run_writers(setup, args.processes, args.n, "messages")
        name = url.split(":", 1)[0].split("+")[0]
        print(
            f"{name:<12} {args.processes:>7} {n_upserts / t_rate:>10,.0f} "
            f"{args.processes * args.n / t_msg:>10,.0f}"
        )


if __name__ == "__main__":
    main()
