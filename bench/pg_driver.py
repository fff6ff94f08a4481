"""How the indexer should talk to PostgreSQL: psycopg's sync API in Twisted's thread pool,
or its async API on Twisted's asyncio reactor. Measured, not guessed.

Each way runs the same transactions against a throwaway server
(tests/postgres.py), 8 requests at a time, in a process of its own (the asyncio
reactor must be installed before anything imports the reactor): a REGISTER-like
transaction (the user's row ``FOR UPDATE``, then ``INSERT ... ON CONFLICT DO
NOTHING``) and a LIST_USERS-like one (the user's row, then the connected
users). Prints the process's CPU per request (all its threads) and the
wall-clock time per request.

- ``threads``: one transaction per request, ``deferToThreadPool`` on 8 threads,
  a connection each;
- ``batched``: :class:`p2p.indexer.pgstore.PgStore` as the indexer runs it (the
  requests waiting while its threads are busy go in one transaction together);
- ``asyncio``: ``psycopg.AsyncConnection`` x 8 on ``asyncioreactor``, a Deferred
  from each coroutine.

``--statement-cost``: instead, the server's own CPU per request of the batch
statement the indexer sends (``p2p_batch``, :mod:`p2p.indexer.pgrules`), for
batches of 1, 4 and 8 requests of user life cycles (bench/indexer_load.py's),
beside a bare ``SELECT 1``: what a statement costs the server whatever it holds,
and what each request adds (read from the backend's /proc, one connection).

    python bench/pg_driver.py --requests 8000 --rounds 3
    python bench/pg_driver.py --statement-cost
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MODES = ("threads", "batched", "asyncio")
LOCK = "SELECT ip, port, identity, connected FROM users WHERE name = %s FOR UPDATE"
READ = "SELECT ip, port, identity, connected FROM users WHERE name = %s"
INSERT = "INSERT INTO users (name) VALUES (%s) ON CONFLICT DO NOTHING"
LIST = "SELECT name, ip, port FROM users WHERE ip IS NOT NULL ORDER BY connected"


def register(cursor, user: str) -> None:
    cursor.execute(LOCK, (user,)).fetchone()
    cursor.execute(INSERT, (user,))


def list_users(cursor, user: str) -> list:
    cursor.execute(READ, (user,)).fetchone()
    return cursor.execute(LIST).fetchall()


def run(mode: str, uri: str, requests: int, streams: int) -> None:
    """One mode in this process; prints ``mode cpu_us wall_us``."""
    if mode == "asyncio":
        from twisted.internet import asyncioreactor

        asyncioreactor.install()
    import psycopg
    from twisted.internet import defer, reactor

    per_stream = requests // (2 * streams)
    if mode == "asyncio":
        import asyncio

        conns: list = []

        def call(work, user: str, k: int) -> defer.Deferred:
            conn = conns[k]

            async def transaction():
                async with conn.transaction():
                    cursor = conn.cursor()
                    if work is register:
                        await (await cursor.execute(LOCK, (user,))).fetchone()
                        await cursor.execute(INSERT, (user,))
                    else:
                        await (await cursor.execute(READ, (user,))).fetchone()
                        await (await cursor.execute(LIST)).fetchall()

            return defer.Deferred.fromFuture(asyncio.ensure_future(transaction()))

        @defer.inlineCallbacks
        def prepare():
            for _ in range(streams):
                conn = yield defer.Deferred.fromFuture(
                    asyncio.ensure_future(psycopg.AsyncConnection.connect(uri, autocommit=True))
                )
                conns.append(conn)

    elif mode == "threads":
        import threading

        from twisted.internet.threads import deferToThreadPool
        from twisted.python.threadpool import ThreadPool

        pool = ThreadPool(streams, streams)
        local = threading.local()

        def in_thread(work, user: str):
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = psycopg.connect(uri, autocommit=True)
            with conn.transaction(), conn.cursor() as cursor:
                return work(cursor, user)

        def call(work, user: str, k: int) -> defer.Deferred:
            return deferToThreadPool(reactor, pool, in_thread, work, user)

        def prepare():
            pool.start()
            reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

    else:
        from p2p.indexer.pgstore import PgStore

        store = PgStore(uri, reactor=reactor)

        def call(work, user: str, k: int) -> defer.Deferred:
            return store.transact(work, user, key=user)

        def prepare():
            store.open()
            reactor.addSystemEventTrigger("during", "shutdown", store.close)

    @defer.inlineCallbacks
    def stream(k: int):
        for i in range(per_stream):
            user = f"{mode}{k}x{i}"
            yield call(register, user, k)
            yield call(list_users, user, k)

    @defer.inlineCallbacks
    def main():
        try:
            yield prepare()
            began, cpu = time.perf_counter(), time.process_time()
            yield defer.gatherResults([stream(k) for k in range(streams)])
            done = 2 * per_stream * streams
            wall = (time.perf_counter() - began) / done * 1e6
            print(f"{mode} {(time.process_time() - cpu) / done * 1e6:.0f} {wall:.0f}")
        finally:
            reactor.stop()

    reactor.callWhenRunning(main)
    reactor.run()


def life_cycle_requests(directory, prefix: str):
    """Endless requests (as the node builds them) of user life cycles, one user after
    another."""
    from indexer_load import life_cycle

    from p2p import wire

    n = 0
    while True:
        user = f"{prefix}u{n}"
        n += 1
        for op, rest in life_cycle(user, 20000):
            address = ("127.0.0.1", rest[0]) if op == "CONNECT" else None
            yield directory.request(getattr(wire, op), user, list(rest), address, None, None, False)


def statement_cost(uri: str, batches: int = 2000) -> None:
    """Print the server's CPU (and the wall time) per request of ``p2p_batch`` by batch
    size, and per ``SELECT 1``."""
    import json

    import psycopg
    from indexer_load import cpu_seconds

    from p2p.indexer.pgdirectory import ClusterDirectory
    from p2p.indexer.pgstore import PgStore

    store = PgStore(uri, threads=1)
    directory = ClusterDirectory(store)  # its rules go in with the tables
    store.open()
    store.close()
    with psycopg.connect(uri, autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]

        def measure(label: str, statements: list[tuple], requests: int) -> None:
            for query, params in statements[:100]:  # warm: plans, caches
                conn.execute(query, params)
            cpu, began = cpu_seconds(backend), time.perf_counter()
            for query, params in statements[100:]:
                conn.execute(query, params).fetchone()
            cpu = (cpu_seconds(backend) - cpu) / requests * 1e6
            wall = (time.perf_counter() - began) / requests * 1e6
            print(f"  {label:28} server CPU {cpu:5.0f} us/request  wall {wall:5.0f} us/request")

        measure("SELECT 1", [("SELECT 1", ())] * (batches + 100), batches)
        for size in (1, 4, 8):
            streams = [life_cycle_requests(directory, f"b{size}s{k}") for k in range(size)]
            statements = [
                (
                    "SELECT p2p_batch(%s::jsonb, %s::float8)",
                    (json.dumps(sorted((next(s) for s in streams), key=lambda r: r["user"])), 30.0),
                )
                for _ in range(batches + 100)
            ]
            measure(f"p2p_batch, {size} a batch", statements, batches * size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=MODES, help="(internal) run one mode here")
    parser.add_argument("--uri", help="(internal) the database")
    parser.add_argument(
        "--statement-cost", action="store_true", help="the server's CPU per batched request"
    )
    args = parser.parse_args(argv)
    if args.mode:
        run(args.mode, args.uri, args.requests, args.streams)
        return 0
    from tests import postgres

    server = postgres.server()
    uri = server.create_database()
    if args.statement_cost:
        statement_cost(uri)
        return 0
    from p2p.indexer.pgstore import PgStore

    store = PgStore(uri)
    store.open()  # the tables
    store.close()
    figures: dict[str, list[tuple[int, int]]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--mode",
                    mode,
                    "--uri",
                    uri,
                    "--requests",
                    str(args.requests),
                    "--streams",
                    str(args.streams),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            figures[mode].append((int(out[1]), int(out[2])))
            print(f"{mode:8} CPU {out[1]:>5} us/request  wall {out[2]:>5} us/request")
    print("medians:")
    for mode, runs in figures.items():
        cpu = sorted(c for c, _ in runs)[len(runs) // 2]
        wall = sorted(w for _, w in runs)[len(runs) // 2]
        print(f"  {mode:8} CPU {cpu:5} us/request  wall {wall:5} us/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
