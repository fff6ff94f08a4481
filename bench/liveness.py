"""What liveness costs the indexer at steady state (docs/protocol.md section 7).

Starts ``twistd p2p-indexer --peer-timeout T`` and connects ``--users`` users
(default 10,000), every one announcing the port of one listener of this
process, which accepts and closes every connection: each probe succeeds. Most
users keep their lease as ``--mode`` says, from ``--loaders`` processes: by
default (``hold``) as our client does, one TLS connection per user that sent
``HOLD`` once and stays open; or with ``ALIVE`` every T/3 seconds, spread
evenly (``plaintext``: one TCP connection per request, as a classic-framed
client would; ``tls``, ``tls-handshake-each``). ``--classic`` of them (default
1,000) never send anything after CONNECT, so the indexer probes each about
once per T.

After one full lease (so the classic users' first probes have come due), the
indexer's CPU time and RSS are measured over ``--seconds`` (default one lease):
CPU share of one core, per connected user, and projected for 100,000 users
(linear: every cost here is per user). At the end LIST_USERS must still list
every user: nobody alive was dropped.

    python bench/liveness.py                       # 10,000 users, T = 60 s (about 2.5 min)
    python bench/liveness.py --users 2000 --peer-timeout 10 --seconds 20
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.indexer_load import (  # noqa: E402
    DATETIME,
    MODES,
    Talker,
    cpu_seconds,
    request,
    spawn_indexer,
    tls_context,
)
from p2p import wire  # noqa: E402
from tests.support import rss_bytes  # noqa: E402


def serve_probes(counter: list[int]) -> int:
    """A listener that accepts and closes every connection (in a thread); its port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)

    def accept_forever() -> None:
        while True:
            conn, _ = sock.accept()
            conn.close()
            counter[0] += 1

    threading.Thread(target=accept_forever, daemon=True).start()
    return sock.getsockname()[1]


def join(address: tuple[str, int], users: list[str], port: int) -> None:
    """REGISTER and CONNECT each user (one process's share)."""
    for user in users:
        for data in (
            wire.encode_request("REGISTER", DATETIME, user),
            wire.encode_request("CONNECT", DATETIME, user, port),
        ):
            reply = request(address, data)
            if reply[:1] != b"\0":
                raise RuntimeError(f"{data!r} answered {reply!r}")


def read_alive(sock) -> bytes:
    """ALIVE's reply on a connection that stays open: the code, and after 0 the lease."""
    data = sock.recv(64)
    while data[:1] == b"\0" and not data[1:].endswith(b"\0"):
        chunk = sock.recv(64)
        if not chunk:
            break
        data += chunk
    return data


def alive(talker: Talker, data: bytes) -> bytes:
    """One ALIVE the way the talker's mode says (see bench/indexer_load.py, MODES)."""
    if talker.mode == "plaintext":
        return request(talker.address, data)
    if talker.mode == "tls-handshake-each":
        with talker._tls() as conn:
            conn.sendall(data)
            return read_alive(conn)
    if talker.conn is None:
        talker.conn = talker._tls()
    talker.conn.sendall(data)
    return read_alive(talker.conn)


def renew(
    address: tuple[str, int],
    users: list[str],
    period: float,
    until: float,
    out,
    mode: str = "plaintext",
    pem: str | None = None,
) -> None:
    """ALIVE for each user once per ``period``, spread evenly; report (sent, not ok)."""
    if mode == "hold":
        hold(address, users, until, out, pem)
        return
    talker = Talker(mode, address, tls_context(pem) if pem else None)
    if not users:  # every user classic (--classic = --users): only probes
        time.sleep(max(0.0, until - time.time()))
        out.put((0, 0))
        return
    step = period / len(users)
    sent = failed = 0
    start = time.time()
    while True:
        for i, user in enumerate(users):
            when = start + (sent // len(users)) * period + i * step
            if when >= until:
                out.put((sent, failed))
                return
            delay = when - time.time()
            if delay > 0:
                time.sleep(delay)
            reply = alive(talker, wire.encode_request("ALIVE", DATETIME, user))
            sent += 1
            if reply[:1] != b"\0":
                failed += 1


def hold(address: tuple[str, int], users: list[str], until: float, out, pem: str | None) -> None:
    """One TLS connection per user, each sending HOLD once, all kept open until ``until``
    (as each of our clients keeps its own); report (HOLDs sent, not ok)."""
    talker = Talker("tls", address, tls_context(pem) if pem else None)
    held, failed = [], 0
    for user in users:
        conn = talker._tls()
        conn.sendall(wire.encode_request("HOLD", DATETIME, user))
        if read_alive(conn)[:1] != b"\0":
            failed += 1
        held.append(conn)
    time.sleep(max(0.0, until - time.time()))
    for conn in held:
        conn.close()
    out.put((len(users), failed))


def listed(address: tuple[str, int], as_user: str) -> int:
    """How many users LIST_USERS shows."""
    reply = request(address, wire.encode_request("LIST_USERS", DATETIME, as_user))
    return int(reply[1:].split(b"\0", 1)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--classic", type=int, default=1_000, help="users that never renew")
    parser.add_argument("--peer-timeout", type=float, default=wire.DEFAULT_PEER_TIMEOUT)
    parser.add_argument("--loaders", type=int, default=4, help="processes sending ALIVE")
    parser.add_argument("--seconds", type=float, default=None, help="measured (one lease)")
    parser.add_argument(
        "--mode",
        choices=(*MODES, "hold"),
        default="hold",
        help="how the lease is kept: hold, one TLS connection per user holding it (HOLD, "
        "as our client does; default); or ALIVE every lease/3: plaintext, a connection per "
        "request; tls, one kept TLS connection per load process; tls-handshake-each, a TLS "
        "handshake per ALIVE",
    )
    args = parser.parse_args(argv)
    lease = args.peer_timeout
    seconds = args.seconds if args.seconds is not None else lease
    probes = [0]
    port = serve_probes(probes)
    names = [f"live{i}" for i in range(args.users)]
    renewing, classic = names[args.classic :], names[: args.classic]
    with tempfile.TemporaryDirectory() as workdir:
        pem = None
        if args.mode != "plaintext":
            from p2p.tls import Identity

            pem = os.path.join(workdir, "loader.pem")
            Path(pem).write_bytes(Identity.generate().to_pem())
        room = str(args.users + 4096)  # held connections count against the caps
        server, ix_port = spawn_indexer(
            workdir,
            "normal",
            extra=(
                "--peer-timeout",
                str(lease),
                "--max-connections",
                room,
                "--max-per-source",
                room,
            ),
        )
        address = ("127.0.0.1", ix_port)
        try:
            idle_rss = rss_bytes(server.pid) // 1024
            began = time.time()
            shares = [names[i :: args.loaders] for i in range(args.loaders)]
            joiners = [
                multiprocessing.Process(target=join, args=(address, share, port))
                for share in shares
            ]
            for p in joiners:
                p.start()
            for p in joiners:
                p.join()
            print(f"{args.users} users connected in {time.time() - began:.1f} s")
            load_start = time.time()
            until = load_start + lease + 5 + seconds
            out: multiprocessing.Queue = multiprocessing.Queue()
            loaders = [
                multiprocessing.Process(
                    target=renew,
                    args=(
                        address,
                        renewing[i :: args.loaders],
                        lease / 3,
                        until,
                        out,
                        args.mode,
                        pem,
                    ),
                )
                for i in range(args.loaders)
            ]
            for p in loaders:
                p.start()
            time.sleep(lease + 5)  # one lease: the classic users' first probes came due
            cpu0, wall0, probes0 = cpu_seconds(server.pid), time.time(), probes[0]
            time.sleep(seconds)
            cpu = cpu_seconds(server.pid) - cpu0
            wall = time.time() - wall0
            probed = probes[0] - probes0
            rss = rss_bytes(server.pid) // 1024
            results = [out.get() for _ in loaders]
            for p in loaders:
                p.join()
            still = listed(address, names[0])
        finally:
            server.terminate()
            server.wait()
            server._drain.wait()
    sent = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    share = cpu / wall * 100
    per_user = share / args.users
    grown = (rss - idle_rss) / args.users
    how = (
        "held by one TLS connection each (HOLD once)"
        if args.mode == "hold"
        else f"ALIVE every {lease / 3:g} s, {args.mode}"
    )
    print(
        f"peer timeout {lease:g} s, {len(renewing)} renewing ({how}), "
        f"{len(classic)} classic; measured {wall:.0f} s after one lease"
    )
    print(f"{'HOLD' if args.mode == 'hold' else 'ALIVE'} sent {sent}, not ok {failed}")
    print(f"probes answered in the window: {probed} ({probed / wall:.1f}/s)")
    renewals = sent / (until - load_start) * wall if args.mode != "hold" else 0
    if renewals:
        print(f"indexer CPU per renewal (all its CPU / ALIVEs): {cpu / renewals * 1e6:.0f} us")
    print(
        f"indexer CPU: {share:.2f}% of one core = {per_user * 1000:.3f} m% per user; "
        f"100,000 users: {per_user * 100_000:.1f}%"
    )
    print(
        f"indexer RSS: {rss / 1024:.1f} MiB ({idle_rss / 1024:.1f} MiB before the users) "
        f"= {grown * 1024:.0f} bytes per user; 100,000 users: "
        f"{(idle_rss + grown * 100_000) / 1024:.0f} MiB"
    )
    print(f"listed at the end: {still} of {args.users}")
    return 0 if still == args.users and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
