"""Readers that never read a long listing: the indexer's RSS, and what good clients wait.

Stores one user with ``--files`` published files (a ~20 MB LIST_CONTENT at the
default 40,000), starts ``twistd p2p-indexer`` on it, then opens ``--readers``
connections from 127.0.0.2-5 that ask for that listing and never read a byte
(issue 9 item 1). Meanwhile a good client on 127.0.0.1 makes ``--requests``
LIST_USERS requests one after another. Prints the indexer's RSS before and
after, and the good client's round trips (p50, p99, max).

    python bench/listing_readers.py
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.indexer_load import request, spawn_indexer  # noqa: E402
from p2p import wire  # noqa: E402
from p2p.indexer.store import Store  # noqa: E402
from tests.support import rss_bytes  # noqa: E402

WHEN = "27/11/2026 12:00:00"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=40_000)
    parser.add_argument("--readers", type=int, default=100)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        store = Store(str(Path(workdir) / "bench.db"))
        for user in ("big", "reader"):
            store.add_user(user)
            store.set_address(user, ("127.0.0.1", 4000))
        for i in range(args.files):
            store.add_file("big", f"{i:06}-" + "n" * 240, "d" * 250)
        store.commit()
        store.close()
        server, port = spawn_indexer(workdir, "normal")
        try:
            address = ("127.0.0.1", port)
            ask = wire.encode_request("LIST_CONTENT", WHEN, "reader", "big")
            listing = request(address, ask)
            before = rss_bytes(server.pid) / 2**20
            readers = []
            for i in range(args.readers):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.bind((f"127.0.0.{2 + i % 4}", 0))
                s.connect(address)
                s.sendall(ask)
                readers.append(s)
            good = wire.encode_request("LIST_USERS", WHEN, "reader")
            waits = []
            for _ in range(args.requests):
                began = time.perf_counter()
                reply = request(address, good)
                waits.append(time.perf_counter() - began)
                assert reply[:1] == b"\0", reply[:20]
            after = rss_bytes(server.pid) / 2**20
            for s in readers:
                s.close()
        finally:
            server.terminate()
            server.wait()
            server._drain.wait()
    waits.sort()
    print(
        f"listing {len(listing) / 1e6:.1f} MB, {args.readers} readers that never read: "
        f"indexer RSS {before:.0f} -> {after:.0f} MB (+{after - before:.0f} MB)"
    )
    p50, p99 = waits[len(waits) // 2] * 1e3, waits[int(len(waits) * 0.99)] * 1e3
    print(
        f"good client, {args.requests} LIST_USERS meanwhile: p50 {p50:.2f} ms, "
        f"p99 {p99:.2f} ms, max {waits[-1] * 1e3:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
