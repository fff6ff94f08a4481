"""Peer download throughput against the raw loopback copy, measured in one run.

Two processes each time, on 127.0.0.1:

- raw: a child ``socket.sendfile``s the file; this process ``recv_into`` one
  reused buffer and writes each piece to a destination file (a plain copy
  with nothing on top), and a variant that discards the bytes (the ceiling).
- peer: a child runs ``p2p.peer.server.PeerServer``; this process runs
  ``p2p.peer.download.download()`` (FETCH, temporary file, rename).

Rounds alternate raw and peer so both see the same machine state; the best of
each is compared and printed as a ratio. ``--compare-plain`` adds a second peer
server started with ``P2P_PLAIN_TWISTED=1`` (no sendfile) to every round, and
the servers' CPU time per GiB is printed. ``--tls`` adds a peer server with an
identity and a TLS download checked against its fingerprint (what our clients
do between each other) beside the plaintext one, in the same rounds; with
``--compare-plain`` too, a TLS peer server without the fast paths as well
(``tls_bulk``: see ``p2p/twisted_internals.py``). ``--verified`` adds a
download from the plaintext peer checked against the file's size and SHA-256
(what GET_FILE does when the owner published them: the hash runs in a thread
as the bytes arrive), in the same rounds; ``--resumable`` one more, verified and
resumable as GET_FILE downloads now are (``.<name>.p2p-part`` and its JSON state,
recorded every second), and with ``--tls`` the same over TLS (what GET_FILE does
between two of our clients). Never run as a test.

    .venv/bin/python bench/transfer.py                  # 1 GiB, 3 rounds
    .venv/bin/python bench/transfer.py --size-mb 200 --rounds 1 --verify
    .venv/bin/python bench/transfer.py --compare-plain   # and without sendfile
    .venv/bin/python bench/transfer.py --tls             # and over TLS
    .venv/bin/python bench/transfer.py --verified        # and verified (SHA-256)
    .venv/bin/python bench/transfer.py --verified --resumable  # and as GET_FILE does
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.indexer_load import cpu_seconds  # noqa: E402

RAW_SENDER = """
import socket, sys
with socket.create_server(("127.0.0.1", 0)) as srv:
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        with conn, open(sys.argv[1], "rb") as f:
            conn.sendfile(f)
"""

PEER_SERVER = """
import sys
from pathlib import Path
from twisted.internet import reactor
from p2p.peer.server import PeerServer
identity = None
if sys.argv[2:] == ["tls"]:
    from p2p.tls import Identity
    identity = Identity.generate()
server = PeerServer(Path(sys.argv[1]), lambda name: True, reactor, identity=identity)
server.listen("tcp:0:interface=127.0.0.1").addCallback(
    lambda port: print(port, identity.fingerprint if identity else "-", flush=True)
)
reactor.run()
"""

CHUNK = 1024 * 1024


def make_source(path: Path, size: int) -> None:
    """A file of ``size`` incompressible bytes (a random block repeated)."""
    block = os.urandom(16 * CHUNK)
    with open(path, "wb") as f:
        left = size
        while left:
            left -= f.write(block[: min(left, len(block))])


def start_child(code: str, *args: str, plain: bool = False) -> tuple[subprocess.Popen, int]:
    """Start a child process; ``plain``: without the Twisted fast paths (P2P_PLAIN_TWISTED=1).

    The child prints its port first (and may print more on that line: see :data:`said`).
    """
    env = dict(os.environ, PYTHONPATH=str(REPO), P2P_PLAIN_TWISTED="1" if plain else "")
    child = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env
    )
    port, *rest = child.stdout.readline().split()
    said[child.pid] = rest
    return child, int(port)


#: What each child printed after its port (a TLS peer server: its key's fingerprint).
said: dict[int, list[str]] = {}


def raw_copy(port: int, destination: Path | None) -> tuple[int, float]:
    """Receive one file with ``recv_into``; write it unless ``destination`` is None."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    received = 0
    start = time.perf_counter()
    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if destination else None
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            while True:
                n = sock.recv_into(view)
                if not n:
                    break
                received += n
                if fd is not None:
                    written = 0
                    while written < n:
                        written += os.write(fd, view[written:n])
    finally:
        if fd is not None:
            os.close(fd)
    return received, time.perf_counter() - start


def peer_download(
    port: int, destination: Path, fingerprint: str | None = None, expected=None, resume=False
) -> tuple[int, float]:
    """One ``download()`` on a fresh reactor-driven call; blocks until it is done.

    With ``fingerprint``: over TLS, the server's key checked against it; with
    ``expected`` (``Expected``): the bytes checked against its size and SHA-256."""
    from twisted.internet import reactor

    from p2p.peer.download import download

    outcome: dict = {}
    start = time.perf_counter()

    def done(result):
        outcome["result"] = result
        outcome["elapsed"] = time.perf_counter() - start
        reactor.crash()

    download(
        "127.0.0.1",
        port,
        "source.bin",
        destination,
        reactor=reactor,
        expected_fingerprint=fingerprint,
        expected=expected,
        resume=resume,
        owner="bench",
    ).addBoth(done)
    reactor.run(installSignalHandlers=False)
    result = outcome["result"]
    if not isinstance(result, int):
        result.raiseException()
    return result, outcome["elapsed"]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="file size in MiB (1024)")
    parser.add_argument("--rounds", type=int, default=3, help="raw/peer pairs to run (3)")
    parser.add_argument("--dir", help="working directory (default: a temporary one)")
    parser.add_argument("--verify", action="store_true", help="compare SHA-256 of every copy")
    parser.add_argument(
        "--compare-plain",
        action="store_true",
        help="also a peer without the Twisted fast paths (no sendfile), in the same rounds",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also a download over TLS from a peer with an identity, in the same rounds",
    )
    parser.add_argument(
        "--verified",
        action="store_true",
        help="also a download checked against the published size and SHA-256, in the same rounds",
    )
    parser.add_argument(
        "--resumable",
        action="store_true",
        help="also a verified download that keeps resumable partial files, as GET_FILE does",
    )
    opts = parser.parse_args()

    size = opts.size_mb * 1024 * 1024
    with tempfile.TemporaryDirectory(dir=opts.dir, prefix="p2p-bench-") as work:
        work = Path(work)
        share, dest = work / "share", work / "dest"
        share.mkdir()
        dest.mkdir()
        source = share / "source.bin"
        make_source(source, size)
        digest = sha256(source) if opts.verify or opts.verified or opts.resumable else None
        expected = digest if opts.verify else None
        os.sync()
        raw_child, raw_port = start_child(RAW_SENDER, str(source))
        children = [raw_child]
        # The peer servers measured: label -> (extra argument, without the fast paths).
        peers = {"peer": ((), False)}
        if opts.compare_plain:
            peers["peer plain"] = ((), True)
        if opts.tls:
            peers["peer tls"] = (("tls",), False)
        if opts.tls and opts.compare_plain:
            peers["peer tls plain"] = (("tls",), True)
        rates: dict[str, list[float]] = {"raw copy": [], "raw discard": []}
        senders: dict[str, subprocess.Popen] = {}
        peer_runs = []
        for label, (extra, plain) in peers.items():
            child, port = start_child(PEER_SERVER, str(share), *extra, plain=plain)
            children.append(child)
            rates[label] = []
            senders[label] = child
            fingerprint = said[child.pid][0] if extra else None
            run = functools.partial(peer_download, fingerprint=fingerprint)
            peer_runs.append((label, run, port, dest / "peer.bin"))
            # Checked downloads from the same server: (label, keywords of peer_download).
            checked = []
            if label == "peer" and opts.verified:
                checked.append(("peer verified", {}))
            if label in ("peer", "peer tls") and opts.resumable:
                checked.append((f"{label} resumable", {"resume": True}))
            for name, how in checked:
                from p2p.peer.download import Expected

                published = Expected(size, digest)
                run = functools.partial(
                    peer_download, fingerprint=fingerprint, expected=published, **how
                )
                peer_runs.append((name, run, port, dest / "peer.bin"))
                senders[name] = child
                rates[name] = []
        server_cpu: dict[str, list[float]] = {label: [] for label in senders}
        client_cpu: dict[str, list[float]] = {label: [] for label in senders}
        try:
            for round_ in range(1, opts.rounds + 1):
                runs = [
                    ("raw discard", raw_copy, raw_port, None),
                    ("raw copy", raw_copy, raw_port, dest / "raw.bin"),
                    *peer_runs,
                ]
                for label, run, port, out in runs:
                    sender = senders.get(label)
                    cpu = cpu_seconds(sender.pid) if sender else 0.0
                    mine = time.process_time()
                    got, seconds = run(port, out)
                    if sender:
                        server_cpu[label].append(cpu_seconds(sender.pid) - cpu)
                        client_cpu[label].append(time.process_time() - mine)
                    if got != size:
                        raise SystemExit(f"{label}: got {got} of {size} bytes")
                    if expected and out is not None and sha256(out) != expected:
                        raise SystemExit(f"{label}: content differs")
                    rate = mbps(size, seconds)
                    rates[label].append(rate)
                    print(f"round {round_}  {label:18s} {rate:8.0f} MB/s  ({seconds:.3f} s)")
                    if out is not None:
                        out.unlink()
                    os.sync()  # no dirty pages from one run slow the next one down
        finally:
            for child in children:
                child.kill()
                child.wait()
    from twisted.internet import reactor

    reactor.callWhenRunning(reactor.stop)  # shut the reactor's thread pool down cleanly
    reactor.run(installSignalHandlers=False)
    best = {label: max(values) for label, values in rates.items()}
    median = {label: statistics.median(values) for label, values in rates.items()}
    print(f"\n{opts.size_mb} MiB over 127.0.0.1, {opts.rounds} rounds (MB = 10^6 bytes):")
    print(f"  {'':18s} {'best':>8s} {'median':>8s}")
    for label in rates:
        print(f"  {label:18s} {best[label]:8.0f} {median[label]:8.0f}  MB/s")
    pairs = [("peer", "raw copy"), ("peer", "raw discard")]
    if opts.compare_plain:
        pairs.append(("peer", "peer plain"))
    if opts.verified:
        pairs += [("peer verified", "raw copy"), ("peer verified", "peer")]
    if opts.resumable:
        pairs += [("peer resumable", "raw copy"), ("peer resumable", "peer")]
    if opts.resumable and opts.tls:
        pairs += [("peer tls resumable", "raw copy"), ("peer tls resumable", "peer tls")]
    if opts.tls:
        pairs.append(("peer tls", "peer"))
    if opts.tls and opts.compare_plain:
        pairs.append(("peer tls", "peer tls plain"))
    for one, other in pairs:
        print(
            f"  {one} / {other:14s} = {best[one] / best[other]:.0%} (best)"
            f"  {median[one] / median[other]:.0%} (median)"
        )
    gib = size / 2**30
    for side, cpu in (("server", server_cpu), ("client", client_cpu)):
        for label, values in cpu.items():
            print(
                f"  {side} CPU, {label:18s}: median {statistics.median(values) / gib:.2f} s per "
                f"GiB (user+system; runs: {', '.join(f'{v / gib:.2f}' for v in values)})"
            )


if __name__ == "__main__":
    main()
