"""Search benchmark of the indexer (protocol.md section 8): SEARCH latency at scale, and
what the full-text index costs PUBLISH and DELETE.

``build``: an indexer database with ``--files`` published files (default 1,000,000) by
``--users`` users (default 100,000), ``--connected`` of them connected (default 0.2).
The rows go straight into SQLite, into the schema the indexer's own
:class:`p2p.indexer.store.Store` creates; the search database beside it is then
filled by the store's own path for a missing one (an FTS5 ``rebuild``). Words
follow a Zipf law (s = 1) over 50,000 made-up words, one in ten
accented; names are ``word_word_word.ext`` (twelve extensions, also Zipf),
descriptions three to eight words; 70 % of the files carry a unique SHA-256, 20 %
one of a pool of shared ones (copies), 10 % were published classically (none).

``search``: the latency of SEARCH for one- and two-word queries of common words
(the 20 most frequent), middle ones (ranks 200-300), rare ones (10,000-20,000) and
three-letter prefixes, two ways: in the indexer's process (``Store.search`` on the
database: the work the indexer does per SEARCH) and over loopback against a real
``twistd p2p-indexer`` (a connection per request, as a classic client sends it).

``throughput``: PUBLISH then DELETE of a file, in a loop, by ``--clients``
processes, against an indexer on a copy of the database, alternating rounds of
this tree's indexer (with the search index) and ``--baseline``'s (the indexer
before the search index, exported with ``git archive``; its database copy has
the search tables dropped), so both run in the same minutes on the same machine.
Each round prints the indexer's CPU per request, and the part its search process
took; the start of both processes is not measured.

    python bench/search_load.py --db /tmp/search.db build
    python bench/search_load.py --db /tmp/search.db search --queries 200
    python bench/search_load.py --db /tmp/search.db throughput --rounds 3 --seconds 5

``--also TREE DB`` adds another checkout's indexer (on a copy of ``DB``, whose search
database it keeps) to the same rounds: two versions of the search side side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import indexer_load  # noqa: E402
from p2p import wire  # noqa: E402
from p2p.indexer.fulltext import FTS_TABLE, query_words  # noqa: E402
from p2p.indexer.searchindex import SUFFIX  # noqa: E402
from p2p.indexer.store import Store  # noqa: E402

DATETIME = "01/01/2026 00:00:00"
#: The last commit before the search index: "today" for the throughput comparison.
BASELINE = "80eb782^"

_CONSONANTS = "bcdfglmnprstvz"
_VOWELS = "aeiou"
_ACCENTED = {"a": "á", "e": "é", "i": "í", "o": "ó", "u": "ú"}
_EXTENSIONS = ["txt", "mp3", "pdf", "jpg", "ogg", "flac", "mkv", "zip", "epub", "png", "doc", "iso"]


def vocabulary(size: int, rng: random.Random) -> list[str]:
    """``size`` distinct made-up words of two to four syllables, one in ten accented."""
    words: set[str] = set()
    ordered: list[str] = []
    while len(ordered) < size:
        syllables = [
            rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 4))
        ]
        word = "".join(syllables)
        if rng.random() < 0.1:
            i = max(i for i, ch in enumerate(word) if ch in _ACCENTED)
            word = word[:i] + _ACCENTED[word[i]] + word[i + 1 :]
        if word not in words:
            words.add(word)
            ordered.append(word)
    return ordered


def zipf_weights(n: int, s: float = 1.0) -> list[float]:
    """Cumulative Zipf weights of ranks 1..n (for ``random.choices``)."""
    return list(itertools.accumulate(1.0 / (rank**s) for rank in range(1, n + 1)))


def build(
    path: str,
    files: int,
    users: int,
    connected: float,
    vocabulary_size: int = 50_000,
    seed: int = 1,
) -> None:
    """Write the database (see the module's doc)."""
    rng = random.Random(seed)
    for suffix in ("", "-wal", "-shm", SUFFIX, f"{SUFFIX}-wal", f"{SUFFIX}-shm"):
        with_suffix = Path(path + suffix)
        if with_suffix.exists():
            with_suffix.unlink()
    store = Store(path)
    store.open()  # the indexer's own schema: tables, search index, triggers
    store.close()
    words = vocabulary(vocabulary_size, rng)
    cum = zipf_weights(len(words))
    ext_cum = zipf_weights(len(_EXTENSIONS), 1.2)
    shared = [os.urandom(32).hex() for _ in range(files // 100)]  # popular content
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    names = [f"user{i:06d}" for i in range(users)]
    db.executemany(
        "INSERT INTO users (name, ip, port) VALUES (?, ?, ?)",
        (
            (n, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 7000)
            if rng.random() < connected
            else (n, None, None)
            for i, n in enumerate(names)
        ),
    )

    def rows():
        seen: set[tuple[str, str]] = set()
        for i in range(files):
            user = names[rng.randrange(users)] if i >= users else names[i]
            picked = rng.choices(words, cum_weights=cum, k=3 + rng.randint(3, 8))
            ext = rng.choices(_EXTENSIONS, cum_weights=ext_cum)[0]
            name = "_".join(picked[:3]) + "." + ext
            while (user, name) in seen:
                name = "_" + name
            seen.add((user, name))
            description = " ".join(picked[3:])
            kind = rng.random()
            if kind < 0.1:  # published classically: no size, no hash
                size, sha = None, None
            elif kind < 0.3:
                size, sha = 1_000_000, rng.choice(shared)
            else:
                size, sha = rng.randrange(1, 1 << 32), rng.randbytes(32).hex()
            yield user, name, description, size, sha
            if i % 100_000 == 99_999:
                print(f"  {i + 1} files", file=sys.stderr, flush=True)

    start = time.perf_counter()
    db.executemany(
        "INSERT INTO files (user, name, description, size, sha256) VALUES (?, ?, ?, ?, ?)", rows()
    )
    db.execute("COMMIT")
    db.close()
    # As the store does for a database that has no search database yet: build it at once.
    store = Store(path)
    store.open()
    store.open_index()
    store.close()
    print(f"built {files} files in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def word_classes(seed: int = 1, vocabulary_size: int = 50_000) -> dict[str, list[str]]:
    """The words ``build`` used, by frequency rank: common, middle, rare."""
    words = vocabulary(vocabulary_size, random.Random(seed))
    return {"common": words[:20], "middle": words[200:300], "rare": words[10_000:20_000]}


def queries(count: int, seed: int = 2) -> dict[str, list[str]]:
    """``count`` queries of each kind: one or two words, common, middle or rare, prefixes."""
    rng = random.Random(seed)
    w = word_classes()
    kinds = {
        "1 common": lambda: rng.choice(w["common"]),
        "1 middle": lambda: rng.choice(w["middle"]),
        "1 rare": lambda: rng.choice(w["rare"]),
        "1 prefix (3 letters)": lambda: rng.choice(w["middle"])[:3],
        "2 common": lambda: " ".join(rng.sample(w["common"], 2)),
        "2 common + rare": lambda: f"{rng.choice(w['common'])} {rng.choice(w['rare'])}",
        "2 middle": lambda: " ".join(rng.sample(w["middle"], 2)),
        "2 rare": lambda: " ".join(rng.sample(w["rare"], 2)),
        "2 prefixes (3 letters)": lambda: " ".join(x[:3] for x in rng.sample(w["middle"], 2)),
    }
    return {kind: [make() for _ in range(count)] for kind, make in kinds.items()}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def search_in_process(path: str, count: int, limit: int) -> dict[str, tuple]:
    """Each kind's p50, p99, max (ms) and mean hits of ``Store.search`` on the database."""
    store = Store(path)
    store.open()
    store.open_index()
    store.search(["a", "b"], 1)  # the files are counted once, at a started indexer's first
    out = {}
    try:
        for kind, texts in queries(count).items():
            times, hits = [], []
            for text in texts:
                start = time.perf_counter()
                found = store.search(query_words(text), limit)
                times.append((time.perf_counter() - start) * 1000)
                hits.append(len(found))
            out[kind] = (
                percentile(times, 50),
                percentile(times, 99),
                max(times),
                sum(hits) / len(hits),
            )
    finally:
        store.close()
    return out


def request(address: tuple[str, int], data: bytes) -> bytes:
    """One request on its own connection; the reply up to the indexer's close."""
    with socket.create_connection(address) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def spawn_indexer(
    db_path: str, workdir: str, pythonpath: str = str(REPO)
) -> tuple[subprocess.Popen, int]:
    """``twistd p2p-indexer`` of the tree at ``pythonpath`` on ``db_path``, on a free port.

    No lease runs out during a run (``--peer-timeout 1e9``): the made-up users'
    addresses are not reachable, and probing them is not what is measured.
    """
    return indexer_load.spawn_indexer(
        workdir, "normal", extra=("--peer-timeout", "1e9"), db=db_path, pythonpath=pythonpath
    )


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=60)
    proc._drain.wait(timeout=10)  # type: ignore[attr-defined]


def join(address: tuple[str, int], user: str) -> None:
    """Register and connect ``user`` (SEARCH needs a connected user)."""
    for op, args in (("REGISTER", ()), ("CONNECT", (7999,))):
        reply = request(address, wire.encode_request(op, DATETIME, user, *args))
        if reply[:1] not in (b"\0", b"\1" if op == "REGISTER" else b"\0"):
            raise RuntimeError(f"{op} {user}: {reply!r}")


def search_over_loopback(path: str, count: int, limit: int) -> dict[str, tuple]:
    """Each kind's p50, p99, max (ms) of SEARCH's round trip to a real indexer, and
    the round trip of a request answered at once (LIST_FILES of an unknown owner)."""
    with tempfile.TemporaryDirectory() as workdir:
        proc, port = spawn_indexer(path, workdir)
        address = ("127.0.0.1", port)
        out = {}
        try:
            join(address, "searcher")
            kinds = queries(count)
            kinds["(no search: LIST_FILES of nobody)"] = [""] * count
            for kind, texts in kinds.items():
                times = []
                for text in texts:
                    if text:
                        data = wire.encode_request("SEARCH", DATETIME, "searcher", text, limit)
                    else:
                        data = wire.encode_request("LIST_FILES", DATETIME, "searcher", "nobody")
                    start = time.perf_counter()
                    reply = request(address, data)
                    times.append((time.perf_counter() - start) * 1000)
                    if reply[:1] != (b"\0" if text else b"\3"):
                        raise RuntimeError(f"{kind} {text!r}: {reply[:40]!r}")
                out[kind] = (percentile(times, 50), percentile(times, 99), max(times))
        finally:
            stop(proc)
    return out


def publish_delete_client(address: tuple[str, int], user: str, seconds: float, queue) -> None:
    """PUBLISH 200 files, then DELETE them, over and over, for ``seconds``: how many requests.

    A file is deleted some 800 requests of all clients after its PUBLISH, past the
    indexer's batch of search index changes (256): each one is written to the index.
    """
    join(address, user)
    done, end, i = 0, time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        names = [f"{user}_canción_{i}_{j}.txt" for j in range(200)]
        for op, name in [("PUBLISH", n) for n in names] + [("DELETE", n) for n in names]:
            args = (name, "una canción de cuna para dormir") if op == "PUBLISH" else (name,)
            if request(address, wire.encode_request(op, DATETIME, user, *args)) != b"\0":
                raise RuntimeError(f"{user}: {op} {name} refused")
            done += 1
            if time.perf_counter() >= end:  # counted to the request, not to a loop of 400
                break
        i += 1
    queue.put(done)


def throughput_round(
    db_path: str, pythonpath: str, clients: int, seconds: float, tag: str
) -> tuple[float, float, float]:
    """PUBLISH/DELETE requests per second of one indexer run, the indexer's CPU (user +
    system, all its threads and child processes: the search process) per request in us,
    and the part of it its child processes took."""
    with tempfile.TemporaryDirectory() as workdir:
        proc, port = spawn_indexer(db_path, workdir, pythonpath)
        try:
            # The search process starts at the first SEARCH or change, as the indexer at
            # its start: not measured either (some 0.2 s of CPU, 5 us a request of a 5 s
            # round). An indexer before SEARCH resets the connection.
            address = ("127.0.0.1", port)
            join(address, f"warm{tag}")
            with contextlib.suppress(ConnectionResetError):
                request(address, wire.encode_request("SEARCH", DATETIME, f"warm{tag}", "w", 1))
            cpu, own = tree_cpu(proc.pid), indexer_load.cpu_seconds(proc.pid)
            queue = multiprocessing.Queue()
            workers = [
                multiprocessing.Process(
                    target=publish_delete_client,
                    args=(address, f"load{tag}{i}", seconds, queue),
                )
                for i in range(clients)
            ]
            for w in workers:
                w.start()
            total = sum(queue.get(timeout=seconds + 120) for _ in workers)
            cpu = tree_cpu(proc.pid) - cpu
            own = indexer_load.cpu_seconds(proc.pid) - own
            for w in workers:
                w.join()
        finally:
            stop(proc)
    return total / seconds, cpu / total * 1e6, (cpu - own) / total * 1e6


def tree_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` and of its children, theirs too (Linux /proc)."""
    total = indexer_load.cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            total += tree_cpu(int(child))
    return total


def baseline_tree(revision: str, into: str) -> str:
    """The tree of ``revision`` exported into ``into`` (``git archive``); its path."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


def without_search(source: str, target: str) -> None:
    """A copy of the database as the baseline indexer keeps it: no search tables."""
    shutil.copyfile(source, target)
    db = sqlite3.connect(target, isolation_level=None)
    for statement in (
        "DROP TRIGGER IF EXISTS online_file_added",
        "DROP TRIGGER IF EXISTS online_file_removed",
        "DROP TRIGGER IF EXISTS online_user",
        "DROP TABLE IF EXISTS online",
        f"DROP TABLE IF EXISTS {FTS_TABLE}",
        "DROP INDEX IF EXISTS files_sha256",
        "DROP TABLE IF EXISTS tombstones",
    ):
        db.execute(statement)
    db.close()


def throughput(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as work:
        tree = baseline_tree(args.baseline, tempfile.mkdtemp(dir=work))
        with_index = os.path.join(work, "with.db")
        without = os.path.join(work, "without.db")
        shutil.copyfile(args.db, with_index)
        shutil.copyfile(args.db + SUFFIX, with_index + SUFFIX)  # built: not rebuilt at start
        without_search(args.db, without)
        contestants = [
            ("with the search index", with_index, str(REPO)),
            ("baseline", without, tree),
        ]
        for i, (other_tree, other_db) in enumerate(args.also or ()):
            copy = os.path.join(work, f"also{i}.db")
            shutil.copyfile(other_db, copy)
            shutil.copyfile(other_db + SUFFIX, copy + SUFFIX)
            contestants.append((f"{Path(other_tree).name} (also)", copy, other_tree))
        runs: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in contestants}
        ratios: dict[str, list[float]] = {label: [] for label in runs}
        for r in range(args.rounds):
            for label, db_path, pythonpath in contestants:
                rate, cpu, children = throughput_round(
                    db_path, pythonpath, args.clients, args.seconds, f"{r}"
                )
                runs[label].append((rate, cpu))
                print(
                    f"round {r + 1} {label}: {rate:,.0f} PUBLISH/DELETE per s,"
                    f" indexer CPU {cpu:.0f} us per request"
                    + (f" (its search process {children:.0f})" if children else ""),
                    flush=True,
                )
            for label in runs:
                ratios[label].append(runs[label][-1][0] / runs["baseline"][-1][0])
    base = statistics.median(rate for rate, _ in runs["baseline"])
    base_cpu = statistics.median(cpu for _, cpu in runs["baseline"])
    for label in runs:
        if label == "baseline":
            continue
        new = statistics.median(rate for rate, _ in runs[label])
        new_cpu = statistics.median(cpu for _, cpu in runs[label])
        # The CPU per request of each round against the baseline's in the same round:
        # steadier than the rates when other work shares the cores.
        cpu_ratio = statistics.median(
            mine[1] / theirs[1] for mine, theirs in zip(runs[label], runs["baseline"], strict=True)
        )
        print(
            f"median: {label} {new:,.0f}/s, baseline ({args.baseline}) {base:,.0f}/s:"
            f" {100 * new / base:.1f} % (median of the rounds' ratios"
            f" {100 * statistics.median(ratios[label]):.1f} %); indexer CPU per request"
            f" {new_cpu:.0f} us against {base_cpu:.0f} us (median of the rounds' ratios"
            f" {cpu_ratio:.2f})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True, help="the benchmark's database")
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="write the database")
    b.add_argument("--files", type=int, default=1_000_000)
    b.add_argument("--users", type=int, default=100_000)
    b.add_argument("--connected", type=float, default=0.2)
    s = commands.add_parser("search", help="SEARCH latency")
    s.add_argument("--queries", type=int, default=200, help="queries of each kind")
    s.add_argument("--limit", type=int, default=wire.DEFAULT_SEARCH_LIMIT)
    s.add_argument("--in-process-only", action="store_true")
    t = commands.add_parser("throughput", help="PUBLISH/DELETE beside the baseline")
    t.add_argument("--baseline", default=BASELINE, help="git revision before the search index")
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--seconds", type=float, default=5.0)
    t.add_argument("--clients", type=int, default=4)
    t.add_argument(
        "--also",
        nargs=2,
        action="append",
        metavar=("TREE", "DB"),
        help="one more indexer in the same rounds: another checkout and its database"
        " (with its search database beside it)",
    )
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.db, args.files, args.users, args.connected)
    elif args.command == "search":
        print(f"{'query':28} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'hits':>6}  (in process)")
        for kind, (p50, p99, top, hits) in search_in_process(
            args.db, args.queries, args.limit
        ).items():
            print(f"{kind:28} {p50:8.2f} {p99:8.2f} {top:8.2f} {hits:6.1f}")
        if not args.in_process_only:
            print(f"{'query':28} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  (round trip)")
            for kind, (p50, p99, top) in search_over_loopback(
                args.db, args.queries, args.limit
            ).items():
                print(f"{kind:28} {p50:8.2f} {p99:8.2f} {top:8.2f}")
    else:
        throughput(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
