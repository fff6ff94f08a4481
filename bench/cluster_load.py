"""The indexer on SQLite and on PostgreSQL, one node and two, under the same load, in one run.

Each round starts, one after the other: one node on SQLite (``--sync normal``),
one node on PostgreSQL, and two nodes on one PostgreSQL database, and drives
each with the same N client processes running user life cycles as
bench/indexer_load.py does (REGISTER, CONNECT, PUBLISH x3, LIST_CONTENT,
LIST_USERS, DELETE x3, DISCONNECT, UNREGISTER; one TCP connection per
request). With two nodes the clients are split between them. Prints
requests/s, round trips, CPU per request of the indexer processes, and the
ratios: PostgreSQL node / SQLite node, two nodes / one node.

``--baseline TREE``: the two PostgreSQL setups also run from another checkout
of the project (say the version before a change, ``git archive REV | tar -x -C
TREE``), in the same rounds, so the two versions compare side by side.

``--sqlite-full``: also a SQLite node with ``--sync full`` (an fsync per group
commit: what a reply means is then the same on both stores); the ratios stay
against ``--sync normal``, the default.

``--million``: then the cost of each operation with 1,000,000 users (and
3,000,000 files) in the PostgreSQL database: the same life cycles, from one
client (``--million-clients``) so a round trip is the operation's own cost,
against one node on an empty database and on the full one, each operation's
median round trip and the CPU per request of the node and of the server.

The PostgreSQL server is a throwaway one (tests/postgres.py: a Unix socket; the
indexer connects through it) but durable as docs/operations.md recommends:
``fsync=on``, ``full_page_writes=on``, ``synchronous_commit=on`` (the tests'
server runs with ``fsync=off``; ``--tests-server`` measures that one). A reply
then means committed and flushed to disk, more than the SQLite node's
``--sync normal`` (which survives a killed process, not a power cut).
Everything shares the machine's cores: the figures compare the stores side by
side, run after run.

    python bench/cluster_load.py --clients 8 --seconds 5 --rounds 3
    python bench/cluster_load.py --clients 8 --seconds 5 --rounds 1 --million
    python bench/cluster_load.py --rounds 3 --baseline /tmp/before
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from indexer_load import cpu_seconds, life_cycle, request, spawn_indexer  # noqa: E402

from p2p import wire  # noqa: E402
from tests import postgres  # noqa: E402

DATETIME = "01/01/2026 00:00:00"
#: What each round runs: a label, the store, how many nodes.
SETUPS = (
    ("sqlite, 1 node", "sqlite", 1),
    ("postgresql, 1 node", "pg", 1),
    ("postgresql, 2 nodes", "pg", 2),
)


def client(index: int, address: tuple[str, int], seconds: float, start: float, out) -> None:
    """Life cycles until the deadline; report (requests, unexpected, {op: round trips})."""
    enc = wire.encode_request
    clock = time.perf_counter
    samples: dict[str, list[float]] = {}
    port = 20000 + index
    done = unexpected = n = 0
    while time.time() < start:
        time.sleep(0.001)
    end = start + seconds
    while time.time() < end:
        user = f"c{os.getpid()}x{n}"
        n += 1
        for op, rest in life_cycle(user, port):
            began = clock()
            reply = request(address, enc(op, DATETIME, user, *rest))
            samples.setdefault(op, []).append(clock() - began)
            done += 1
            if not reply or reply[0] != wire.OK:
                unexpected += 1
    out.put((done, unexpected, samples))


def run_load(addresses: list[tuple[str, int]], clients: int, seconds: float, pids: list[int]):
    """The clients, split over ``addresses``; the figures of the run."""
    out: multiprocessing.Queue = multiprocessing.Queue()
    start = time.time() + 0.5
    procs = [
        multiprocessing.Process(
            target=client, args=(i, addresses[i % len(addresses)], seconds, start, out)
        )
        for i in range(clients)
    ]
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    clients_cpu = done.ru_utime + done.ru_stime - children.ru_utime - children.ru_stime
    total = sum(r[0] for r in results)
    per_op: dict[str, list[float]] = {}
    for r in results:
        for op, s in r[2].items():
            per_op.setdefault(op, []).extend(s)
    every = sorted(x for s in per_op.values() for x in s)
    return {
        "total": total,
        "rate": total / seconds,
        "unexpected": sum(r[1] for r in results),
        "p50_ms": every[len(every) // 2] * 1e3 if every else float("nan"),
        "p99_ms": every[int(len(every) * 0.99)] * 1e3 if every else float("nan"),
        "indexer_us": cpu / total * 1e6 if total else float("nan"),
        "clients_us": clients_cpu / total * 1e6 if total else float("nan"),
        "per_op_ms": {op: statistics.median(s) * 1e3 for op, s in per_op.items()},
    }


#: The tests' server settings that operations.md advises against in production.
_RELAXED = "-c fsync=off -c full_page_writes=off"
#: What operations.md recommends instead (synchronous_commit=on is the default; said).
DURABLE = "-c fsync=on -c full_page_writes=on -c synchronous_commit=on"


def durable_server() -> postgres.Server:
    """A throwaway server (tests/postgres.py) with operations.md's durability settings."""
    relaxed = postgres._options

    def options(directory: Path) -> str:
        settings = relaxed(directory)
        assert _RELAXED in settings, settings  # the tests' settings changed: look again
        return settings.replace(_RELAXED, DURABLE)

    postgres._options = options
    return postgres.server()


def server_cpu(server: postgres.Server) -> float:
    """CPU seconds of every process of the PostgreSQL server so far (its postmaster's
    children, read from /proc)."""
    pidfile = server.directory / "data" / "postmaster.pid"
    try:
        master = int(pidfile.read_text().split()[0])
    except (OSError, ValueError):
        return float("nan")
    total = cpu_seconds(master)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == master:
                total += cpu_seconds(int(entry.name))
    return total


def one_setup(
    store: str,
    nodes: int,
    args,
    server: postgres.Server,
    db: str | None = None,
    tree: str = str(REPO),
):
    """Start ``nodes`` indexers on ``store`` (the code of ``tree``), run the load, stop
    them; the figures."""
    with tempfile.TemporaryDirectory() as workdir:
        if store == "pg" and db is None:
            db = server.create_database()
        extra = ("--max-per-source", "1024")
        if store == "pg":
            extra += ("--db-threads", str(args.db_threads))
        procs, addresses = [], []
        try:
            for _ in range(nodes):
                sync = "full" if store == "sqlite-full" else "normal"
                proc, port = spawn_indexer(workdir, sync, extra=extra, db=db, pythonpath=tree)
                procs.append(proc)
                addresses.append(("127.0.0.1", port))
            pg_before = server_cpu(server) if store == "pg" else 0.0
            commits_before = commits(db) if store == "pg" else 0
            run = run_load(addresses, args.clients, args.seconds, [p.pid for p in procs])
            if store == "pg" and run["total"]:
                run["postgres_us"] = (server_cpu(server) - pg_before) / run["total"] * 1e6
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()
                proc._drain.wait()
        if store == "pg" and run["total"]:
            # The nodes' sessions ended: their counts are flushed.
            run["per_commit"] = run["total"] / max(1, commits(db) - commits_before)
    return run


def commits(uri: str) -> int:
    """Transactions committed in the database so far (``pg_stat_database``): with a
    batch a transaction, requests per commit is the mean batch (the leadership's
    and the leases' few transactions a second included)."""
    import psycopg

    with psycopg.connect(uri, autocommit=True) as conn:
        return conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()[0]


def show(label: str, run: dict) -> None:
    extra = f", postgres {run['postgres_us']:.0f} us" if "postgres_us" in run else ""
    extra += f", clients {run['clients_us']:.0f} us"
    if "per_commit" in run:
        extra += f", {run['per_commit']:.1f} requests/commit"
    print(
        f"  {label:33} {run['rate']:7.0f} requests/s  p50 {run['p50_ms']:.2f} ms"
        f"  p99 {run['p99_ms']:.2f} ms  CPU/request: indexer(s) {run['indexer_us']:.0f} us"
        f"{extra}  unexpected {run['unexpected']}"
    )


def preload_million(uri: str, users: int) -> float:
    """``users`` offline users with three files each, written by SQL on the server;
    seconds it took."""
    import psycopg

    from p2p.indexer.pgstore import PgStore

    store = PgStore(uri, threads=1)
    store.open()  # the tables
    store.close()
    began = time.time()
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (name) SELECT 'pre' || g FROM generate_series(1, %s) g", (users,)
        )
        conn.execute(
            "INSERT INTO files (owner, name, description, words)"
            " SELECT 'pre' || g, 'f' || j, 'preloaded file',"
            " array_to_tsvector(ARRAY['f' || j, 'preloaded', 'file'])"
            " FROM generate_series(1, %s) g, generate_series(0, 2) j",
            (users,),
        )
        conn.execute("VACUUM ANALYZE")
    return time.time() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--db-threads", type=int, default=1, help="--db-threads of each node")
    parser.add_argument(
        "--baseline", metavar="TREE", help="also run the PostgreSQL setups from this checkout"
    )
    parser.add_argument(
        "--tests-server",
        action="store_true",
        help="the tests' server as it is (fsync=off), not operations.md's settings",
    )
    parser.add_argument(
        "--sqlite-full",
        action="store_true",
        help="also a SQLite node with --sync full (an fsync per group commit, as durable"
        " as PostgreSQL's settings)",
    )
    parser.add_argument("--million", action="store_true", help="per-operation cost, 1M users")
    parser.add_argument("--users", type=int, default=1_000_000, help="with --million")
    parser.add_argument(
        "--million-clients", type=int, default=1, help="client processes with --million"
    )
    args = parser.parse_args(argv)
    server = postgres.server() if args.tests_server else durable_server()
    import psycopg

    with psycopg.connect(server.uri(), autocommit=True) as conn:
        settings = ", ".join(
            f"{name}={conn.execute(f'SHOW {name}').fetchone()[0]}"
            for name in ("fsync", "full_page_writes", "synchronous_commit")
        )
    print(
        f"PostgreSQL {server.bin} ({settings}), {os.cpu_count()} CPUs,"
        f" {args.clients} client processes"
    )
    setups = [(label, store, nodes, str(REPO)) for label, store, nodes in SETUPS]
    if args.sqlite_full:
        setups.insert(1, ("sqlite --sync full, 1 node", "sqlite-full", 1, str(REPO)))
    if args.baseline:
        setups += [
            (f"{label} (baseline)", store, nodes, args.baseline)
            for label, store, nodes in SETUPS
            if store == "pg"
        ]
    runs: dict[str, list[dict]] = {label: [] for label, _, _, _ in setups}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}")
        for label, store, nodes, tree in setups:
            run = one_setup(store, nodes, args, server, tree=tree)
            runs[label].append(run)
            show(label, run)
    if args.rounds:
        rate = {label: statistics.median(r["rate"] for r in rs) for label, rs in runs.items()}
        sqlite, pg1, pg2 = (rate[label] for label, _, _ in SETUPS)
        print(
            f"medians: sqlite {sqlite:.0f}/s, postgresql 1 node {pg1:.0f}/s ({pg1 / sqlite:.2f}x"
            f" sqlite), 2 nodes {pg2:.0f}/s ({pg2 / pg1:.2f}x one node)"
        )
        if args.baseline:
            old1, old2 = (rate[f"{label} (baseline)"] for label, _, _ in SETUPS[1:])
            print(
                f"baseline: postgresql 1 node {old1:.0f}/s ({old1 / sqlite:.2f}x sqlite),"
                f" 2 nodes {old2:.0f}/s ({old2 / old1:.2f}x one node)"
            )
    if args.million:
        # One client: each round trip is then the operation's own cost, not a queue's.
        args.clients = args.million_clients
        print(
            f"per-operation round trip (median, ms), {args.clients} client(s): "
            f"empty database vs {args.users:,} users"
        )
        empty = one_setup("pg", 1, args, server)
        db = server.create_database()
        took = preload_million(db, args.users)
        print(f"  preloaded {args.users:,} users and {3 * args.users:,} files in {took:.0f} s")
        full = one_setup("pg", 1, args, server, db=db)
        show("empty database", empty)
        show(f"{args.users:,} users", full)
        for op in empty["per_op_ms"]:
            print(
                f"  {op:14} {empty['per_op_ms'][op]:6.2f}"
                f"  {full['per_op_ms'].get(op, float('nan')):6.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
