"""Load benchmark of the indexer: N client processes running user life cycles.

Each client process runs, for T seconds, full life cycles of users with unique
names: REGISTER, CONNECT, PUBLISH x3, LIST_CONTENT, LIST_USERS, DELETE x3,
DISCONNECT, UNREGISTER -- one TCP connection per request, as the protocol says,
with plain blocking sockets. Prints requests per second, the round trip each
request took as its client saw it (p50, p99), and the number of unexpected
reply codes (which must be 0).

``--compare-tls`` runs the same load, in the same run, three ways: classic
plaintext (a connection per request); TLS as our client speaks it (protocol.md
section 6: one TLS 1.3 connection per client process, presenting its own
identity, so every name it registers is claimed, requests one after another on
it); and TLS with a full handshake per request (what the persistent connection
saves).

``--compare-liveness`` alternates runs of the indexer with its default
``--peer-timeout`` (60 s: leases kept, a tick every second) and with a lease so
long that no user ever reaches it (protocol.md section 7).

    python bench/indexer_load.py --spawn --clients 8 --seconds 10
    python bench/indexer_load.py --spawn --compare-plain --rounds 3 --seconds 5
    python bench/indexer_load.py --spawn --compare-plain --plain read_now
    python bench/indexer_load.py --spawn --compare-tls --rounds 3 --seconds 5
    python bench/indexer_load.py --spawn --compare-liveness --rounds 3 --seconds 5
    python bench/indexer_load.py --spawn --compare-metrics --rounds 3 --clients 4 --seconds 5
    python bench/indexer_load.py --host 127.0.0.1 --port 9090
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from p2p import wire  # noqa: E402
from tests.support import TWISTD  # noqa: E402

DATETIME = "01/01/2026 00:00:00"


def request(address: tuple[str, int], data: bytes) -> bytes:
    """One request on its own connection; the whole reply (up to the server's close).

    A numeric address and a bare ``connect`` (no name resolution), so the
    clients spend their CPU on the protocol, not on getaddrinfo.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.connect(address)
        s.sendall(data)
        reply = s.recv(65536)
        if reply:
            while chunk := s.recv(65536):
                reply += chunk
    return reply


#: Ways the load clients talk to the indexer (--compare-tls).
MODES = ("plaintext", "tls", "tls-handshake-each")
#: Fields per row after code 0 of the listing operations.
_COLUMNS = {"LIST_USERS": 3, "LIST_CONTENT": 2, "LIST_PEERS": 4}


def tls_context(pem_path: str) -> ssl.SSLContext:
    """TLS 1.3 presenting the identity in ``pem_path``; the indexer's key is not checked
    (the bench measures cost, and a pin check is one comparison per handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(pem_path)
    return ctx


def read_reply(sock: socket.socket, columns: int) -> bytes:
    """One self-delimiting reply on a connection that stays open: the code, and after
    code 0 of a listing its count and rows (``columns`` fields each; 0: no listing)."""
    data = b""
    while True:
        if data and (data[0] != wire.OK or not columns):
            return data
        # Complete fields: all but the unterminated tail; the first is the count.
        fields = data[1:].split(b"\0")
        if len(fields) > 1 and fields[0].isdigit() and len(fields) - 2 >= int(fields[0]) * columns:
            return data
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


class Talker:
    """Sends one request and returns its reply, the way ``mode`` says."""

    def __init__(self, mode: str, address: tuple[str, int], ctx: ssl.SSLContext | None) -> None:
        self.mode = mode
        self.address = address
        self.ctx = ctx
        self.conn: ssl.SSLSocket | None = None

    def _tls(self) -> ssl.SSLSocket:
        raw = socket.create_connection(self.address)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.ctx.wrap_socket(raw)

    def __call__(self, op: str, data: bytes) -> bytes:
        if self.mode == "plaintext":
            return request(self.address, data)
        if self.mode == "tls-handshake-each":
            with self._tls() as conn:
                conn.sendall(data)
                return read_reply(conn, _COLUMNS.get(op, 0))
        if self.conn is None:
            self.conn = self._tls()
        self.conn.sendall(data)
        return read_reply(self.conn, _COLUMNS.get(op, 0))


def life_cycle(user: str, port: int) -> list[tuple[str, tuple]]:
    """The requests of one user's life cycle: (operation, arguments after the user)."""
    files = [f"file{i}.txt" for i in range(3)]
    steps: list[tuple[str, tuple]] = [("REGISTER", ()), ("CONNECT", (port,))]
    steps += [("PUBLISH", (f, f"the file {f}")) for f in files]
    steps += [("LIST_CONTENT", (user,)), ("LIST_USERS", ())]
    steps += [("DELETE", (f,)) for f in files]
    steps += [("DISCONNECT", ()), ("UNREGISTER", ())]
    return steps


def client(
    index: int,
    address: tuple[str, int],
    seconds: float,
    start: float,
    out,
    mode: str = "plaintext",
    pem: str | None = None,
    stamp: Callable[[], str] | None = None,
) -> None:
    """Run life cycles until the deadline; report (requests, unexpected codes, first
    unexpected, round-trip samples in seconds).

    ``stamp``: called before each request for its DATETIME, inside the measured
    round trip (a time service call, as our client makes); default a constant.
    """
    enc = wire.encode_request
    talk = Talker(mode, address, tls_context(pem) if pem else None)
    clock = time.perf_counter
    samples: list[float] = []
    port = 20000 + index
    done = unexpected = 0
    n = 0
    while time.time() < start:
        time.sleep(0.001)
    end = start + seconds
    first_unexpected = None
    while time.time() < end:
        user = f"b{os.getpid()}x{n}"
        n += 1
        for op, rest in life_cycle(user, port):
            began = clock()
            data = enc(op, stamp() if stamp is not None else DATETIME, user, *rest)
            reply = talk(op, data)
            samples.append(clock() - began)
            done += 1
            if not reply or reply[0] != wire.OK:
                unexpected += 1
                if first_unexpected is None:
                    first_unexpected = (data, reply[:20])
    out.put((done, unexpected, first_unexpected, samples))


def preload(db_path: str, users: int) -> None:
    """Fill the database with ``users`` offline users with three files each."""
    from p2p.indexer.store import Store

    store = Store(db_path)
    store.open()
    db = store.db
    db.execute("BEGIN")
    db.executemany("INSERT INTO users (name) VALUES (?)", ((f"pre{i}",) for i in range(users)))
    db.executemany(
        "INSERT INTO files (user, name, description) VALUES (?, ?, ?)",
        ((f"pre{i}", f"f{j}", "preloaded") for i in range(users) for j in range(3)),
    )
    db.execute("COMMIT")
    store.close()


def spawn_indexer(
    workdir: str,
    sync: str,
    plain: str = "",
    extra: tuple[str, ...] = (),
    db: str | None = None,
    pythonpath: str = str(REPO),
) -> tuple[subprocess.Popen, int]:
    """Start ``twistd p2p-indexer`` on a kernel-chosen port; return it and the port.

    ``plain``: its ``P2P_PLAIN_TWISTED`` (``1``: without the Twisted fast paths);
    ``extra``: more options of the indexer; ``db``: its database (default
    ``bench.db`` in ``workdir``); ``pythonpath``: the tree it runs (default this one).
    """
    args = [
        *TWISTD,
        "-n",
        "--pidfile=",
        "--logfile=twistd.log",
        "p2p-indexer",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--db",
        db or os.path.join(workdir, "bench.db"),
        "--sync",
        sync,
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1")
    env["P2P_PLAIN_TWISTED"] = plain
    started = time.time()
    proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        match = re.search(r"s> init server \S+:(\d+)", line)
        if match:
            break
    else:
        raise RuntimeError("the indexer did not start")
    print(f"indexer started (database loaded) in {time.time() - started:.2f} s")
    # Drain its operator lines so it never blocks on a full pipe.
    drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
    proc.stdout.close()
    proc._drain = drain  # type: ignore[attr-defined]
    return proc, int(match.group(1))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), or NaN."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    args: argparse.Namespace, plain: str = "", mode: str = "plaintext", extra: tuple = ()
) -> dict:
    """One run: start the indexer if asked, run the clients, return the figures."""
    server = None
    with tempfile.TemporaryDirectory() as workdir:
        pems: list[str | None] = [None] * args.clients
        if mode != "plaintext":
            from p2p.tls import Identity

            for i in range(args.clients):
                pems[i] = os.path.join(workdir, f"client{i}.pem")
                Path(pems[i]).write_bytes(Identity.generate().to_pem())
        if args.spawn:
            if args.preload:
                preload(os.path.join(workdir, "bench.db"), args.preload)
            server, args.port = spawn_indexer(workdir, args.sync, plain, extra)
        try:
            out: multiprocessing.Queue = multiprocessing.Queue()
            start = time.time() + 0.5
            procs = [
                multiprocessing.Process(
                    target=client,
                    args=(i, (args.host, args.port), args.seconds, start, out, mode, pems[i]),
                )
                for i in range(args.clients)
            ]
            server_cpu = cpu_seconds(server.pid) if server is not None else float("nan")
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            for p in procs:
                p.start()
            results = [out.get() for _ in procs]
            for p in procs:
                p.join()
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            client_cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
            if server is not None:
                server_cpu = cpu_seconds(server.pid) - server_cpu
        finally:
            if server is not None:
                server.terminate()
                server.wait()
                server._drain.wait()
    total = sum(r[0] for r in results)
    first = next((r[2] for r in results if r[2] is not None), None)
    samples = sorted(x for r in results for x in r[3])
    return {
        "p50_ms": samples[len(samples) // 2] * 1e3 if samples else float("nan"),
        "p99_ms": samples[int(len(samples) * 0.99)] * 1e3 if samples else float("nan"),
        "total": total,
        "rate": total / args.seconds,
        "unexpected": sum(r[1] for r in results),
        "server_us": server_cpu / total * 1e6 if total else float("nan"),
        "client_us": client_cpu / total * 1e6 if total else float("nan"),
        "first": first,
    }


def report(args: argparse.Namespace, run: dict) -> None:
    print(
        f"clients={args.clients} seconds={args.seconds:g} requests={run['total']} "
        f"requests/s={run['rate']:.0f} unexpected={run['unexpected']}"
    )
    print(
        f"round trip as the clients saw it: p50 {run['p50_ms']:.2f} ms, p99 {run['p99_ms']:.2f} ms"
    )
    if run["total"]:
        print(
            f"CPU per request: server {run['server_us']:.0f} us, "
            f"clients {run['client_us']:.0f} us (user+system)"
        )
    if run["first"] is not None:
        print(f"first unexpected: request={run['first'][0]!r} reply={run['first'][1]!r}")


def compare(args: argparse.Namespace, variants: list[tuple]) -> dict:
    """Alternate runs of each (label, P2P_PLAIN_TWISTED, mode[, indexer options]) for
    ``args.rounds`` rounds; print each run and the medians; return
    {label: (requests/s, server us/request, p50, p99)}."""
    runs: dict[str, list[dict]] = {label: [] for label, *_ in variants}
    for round_ in range(1, args.rounds + 1):
        for label, plain, mode, *extra in variants:
            run = measure(args, plain, mode, *extra)
            runs[label].append(run)
            print(
                f"round {round_}  {label:18s} {run['rate']:7.0f} requests/s  "
                f"server {run['server_us']:.0f} us/request  p50 {run['p50_ms']:.2f} ms  "
                f"p99 {run['p99_ms']:.2f} ms  unexpected={run['unexpected']}"
            )
    print(f"\n{args.clients} clients, {args.seconds:g} s per run, {args.rounds} rounds:")
    median = {}
    for label, values in runs.items():
        rates = [r["rate"] for r in values]
        median[label] = tuple(
            statistics.median(r[key] for r in values)
            for key in ("rate", "server_us", "p50_ms", "p99_ms")
        )
        rate, cpu, p50, p99 = median[label]
        print(
            f"  {label:18s} median {rate:7.0f} requests/s (best {max(rates):.0f}), "
            f"server {cpu:.0f} us/request, round trip p50 {p50:.2f} ms, p99 {p99:.2f} ms"
        )
    args.failed = any(r["unexpected"] for values in runs.values() for r in values)
    return median


def compare_plain(args: argparse.Namespace) -> int:
    """Alternate runs with Twisted fast paths on and off (P2P_PLAIN_TWISTED=--plain)."""
    print(f"plain = P2P_PLAIN_TWISTED={args.plain}")
    median = compare(
        args, [("fast paths", "", "plaintext"), ("plain Twisted", args.plain, "plaintext")]
    )
    fast, plain = median["fast paths"], median["plain Twisted"]
    print(
        f"  fast / plain: {fast[0] / plain[0] - 1:+.0%} requests/s, "
        f"{fast[1] / plain[1] - 1:+.0%} server CPU per request"
    )
    return 1 if args.failed else 0


def compare_tls(args: argparse.Namespace) -> int:
    """Classic plaintext beside TLS as our client speaks it (and a handshake per request)."""
    median = compare(args, [(mode, "", mode) for mode in MODES])
    plain, tls = median["plaintext"], median["tls"]
    print(
        f"  TLS / plaintext: {tls[0] / plain[0]:.0%} of the requests/s "
        f"(target: at least 50%), round trip p50 {tls[2] / plain[2]:.2f}x"
    )
    return 1 if args.failed else 0


def compare_metrics(args: argparse.Namespace) -> int:
    """The indexer counting for /metrics (--metrics) beside the same indexer without."""
    on_ = ("--metrics", "tcp:0:interface=127.0.0.1")
    median = compare(args, [("metrics off", "", "plaintext"), ("metrics on", "", "plaintext", on_)])
    on, off = median["metrics on"], median["metrics off"]
    print(
        f"  metrics on / off: {on[0] / off[0]:.1%} of the requests/s "
        f"(target: within 5%), server CPU per request {on[1] / off[1] - 1:+.1%}"
    )
    return 1 if args.failed else 0


def compare_liveness(args: argparse.Namespace) -> int:
    """The default lease (60 s) beside one no user ever reaches (liveness idle)."""
    default = ("--peer-timeout", str(wire.DEFAULT_PEER_TIMEOUT))
    endless = ("--peer-timeout", "1e9")
    median = compare(
        args,
        [("liveness", "", "plaintext", default), ("lease 1e9 s", "", "plaintext", endless)],
    )
    on, off = median["liveness"], median["lease 1e9 s"]
    print(
        f"  liveness / endless lease: {on[0] / off[0]:.0%} of the requests/s "
        f"(target: at least 90%), server CPU per request {on[1] / off[1] - 1:+.0%}"
    )
    return 1 if args.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=wire.INDEXER_PORT)
    parser.add_argument("--spawn", action="store_true", help="start a twistd p2p-indexer")
    parser.add_argument("--sync", default="normal", help="--sync of the spawned indexer")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--preload", type=int, default=0, help="with --spawn: users (3 files each) already stored"
    )
    parser.add_argument(
        "--compare-plain",
        action="store_true",
        help="with --spawn: alternate runs with and without the Twisted fast paths",
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --compare-* (3)")
    parser.add_argument(
        "--plain",
        default="1",
        help="with --compare-plain: P2P_PLAIN_TWISTED of the plain runs "
        "(1: all fast paths off, or names such as read_now)",
    )
    parser.add_argument(
        "--compare-tls",
        action="store_true",
        help="with --spawn: plaintext beside TLS (persistent, and a handshake per request)",
    )
    parser.add_argument(
        "--compare-liveness",
        action="store_true",
        help="with --spawn: the default --peer-timeout beside one no user reaches",
    )
    parser.add_argument(
        "--compare-metrics",
        action="store_true",
        help="with --spawn: the indexer with --metrics beside the same without",
    )
    args = parser.parse_args(argv)
    if args.compare_metrics:
        if not args.spawn:
            parser.error("--compare-metrics needs --spawn")
        return compare_metrics(args)
    if args.compare_liveness:
        if not args.spawn:
            parser.error("--compare-liveness needs --spawn")
        return compare_liveness(args)
    if args.compare_tls:
        if not args.spawn:
            parser.error("--compare-tls needs --spawn")
        return compare_tls(args)
    if args.compare_plain:
        if not args.spawn:
            parser.error("--compare-plain needs --spawn")
        return compare_plain(args)
    run = measure(args)
    report(args, run)
    return 1 if run["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
