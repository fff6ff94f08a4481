"""The logger under a flood of made-up relay senders: memory, journal, stalls, restart.

Usage::

    .venv/bin/python bench/logger_senders.py [--senders 400000] [--window 128]

Any client can name itself a relay sender (the AUTH_SYS machine name
``p2p-outbox:<sender>:<seq>``). For each configuration, side by side in one
run, the script starts ``twistd -n p2p-logger`` on a kernel-chosen port,
sends ``--senders`` LOG calls each from a new made-up sender (pipelined, one TCP
connection), and meanwhile a second connection sends one NULL call every 10 ms
and records how long each waited. Then it stops the logger and starts it again
on the same files. Printed per configuration: the logger's RSS before and
after, the journal's size, the longest and the 99th-percentile NULL wait
during the flood, and the time from start to listening on restart.

Configurations: ``unbounded`` (``--max-senders`` 10**9, what the logger did
before the bound) and ``default`` (the default ``--max-senders``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from p2p import wire  # noqa: E402
from p2p.logcontract import relay_machinename  # noqa: E402
from p2p.oncrpc import rpc  # noqa: E402
from p2p.oncrpc.record import RecordReader, encode_record  # noqa: E402
from tests.support import rss_bytes  # noqa: E402

TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


def start(work: Path, extra: list[str]) -> tuple[subprocess.Popen, int, float]:
    """Start the logger in ``work``; (process, TCP port, seconds until it listened)."""
    out = work / "stdout.txt"
    out.write_bytes(b"")
    args = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "--logfile=twistd.log"]
    args += ["p2p-logger", "--listen=tcp:0:interface=127.0.0.1", "--no-rpcbind", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    began = time.monotonic()
    with open(out, "ab") as sink:
        child = subprocess.Popen(args, cwd=work, stdout=sink, stderr=subprocess.STDOUT, env=env)
    deadline = began + 60
    while time.monotonic() < deadline:
        found = re.search(rb"s> logger program \S+ version \d+ tcp \S+:(\d+)", out.read_bytes())
        if found:
            return child, int(found[1]), time.monotonic() - began
        if child.poll() is not None:
            break
        time.sleep(0.01)
    child.kill()
    raise RuntimeError("logger did not start:\n" + out.read_text())


def call(xid: int, proc: int, args: bytes, cred: rpc.OpaqueAuth = rpc.NULL_AUTH) -> bytes:
    header = rpc.Call(xid, wire.LOGGER_PROGRAM, wire.LOGGER_VERSION, proc, cred)
    return encode_record(rpc.encode_call(header, args))


def read_replies(sock: socket.socket, reader: RecordReader, count: int) -> None:
    got = 0
    while got < count:
        data = sock.recv(1 << 16)
        if not data:
            raise RuntimeError("logger closed the connection")
        for record in reader.feed(data):
            reply = rpc.decode_reply(record)
            if rpc.unpack_int(reply.body) != 0:
                raise RuntimeError("LOG answered an error")
            got += 1


def flood(port: int, senders: int, window: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reader = RecordReader(1 << 20)
        sent = 0
        while sent < senders:
            batch = []
            for i in range(sent, min(sent + window, senders)):
                cred = rpc.AuthSys(relay_machinename(f"made-up-{i:07d}", 1)).encode()
                text = f"made-up-{i} REGISTER 27/11/2026 12:00:00"
                batch.append(call(i + 1, wire.LOGGER_PROC_LOG, rpc.pack_string(text), cred))
            sock.sendall(b"".join(batch))
            read_replies(sock, reader, len(batch))
            sent += len(batch)


def probe(port: int, stop: threading.Event, waits: list[float]) -> None:
    """NULL calls every 10 ms on their own connection; how long each waited."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reader = RecordReader(1 << 16)
        xid = 0
        while not stop.is_set():
            xid += 1
            began = time.monotonic()
            sock.sendall(call(xid, wire.LOGGER_PROC_NULL, b""))
            done = False
            while not done:
                data = sock.recv(1 << 16)
                if not data:
                    return
                done = bool(reader.feed(data))
            waits.append(time.monotonic() - began)
            time.sleep(0.01)


def measure(name: str, extra: list[str], senders: int, window: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"logger-senders-{name}-"))
    child, port, _ = start(work, extra)
    before = rss_bytes(child.pid) / 2**20
    stop, waits = threading.Event(), []
    prober = threading.Thread(target=probe, args=(port, stop, waits))
    prober.start()
    began = time.monotonic()
    flood(port, senders, window)
    elapsed = time.monotonic() - began
    stop.set()
    prober.join()
    after = rss_bytes(child.pid) / 2**20
    child.send_signal(signal.SIGTERM)
    child.wait(30)
    journal = (work / "p2p-audit.log.state").stat().st_size / 1e6
    child, port, restart = start(work, extra)
    child.send_signal(signal.SIGTERM)
    child.wait(30)
    waits.sort()
    return {
        "name": name,
        "rate": senders / elapsed,
        "before": before,
        "after": after,
        "journal": journal,
        "p99": waits[int(len(waits) * 0.99)] * 1000 if waits else float("nan"),
        "max": waits[-1] * 1000 if waits else float("nan"),
        "restart": restart,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=400_000)
    parser.add_argument("--window", type=int, default=128)
    options = parser.parse_args()
    configs = [("unbounded", ["--max-senders=1000000000"]), ("default", [])]
    print(f"{options.senders} made-up senders, window {options.window}")
    print(
        f"{'config':10s} {'LOG/s':>8s} {'RSS before':>11s} {'RSS after':>10s} "
        f"{'journal':>8s} {'NULL p99':>9s} {'NULL max':>9s} {'restart':>8s}"
    )
    for name, extra in configs:
        r = measure(name, extra, options.senders, options.window)
        print(
            f"{r['name']:10s} {r['rate']:8.0f} {r['before']:8.1f} MB {r['after']:7.1f} MB "
            f"{r['journal']:5.1f} MB {r['p99']:6.1f} ms {r['max']:6.1f} ms {r['restart']:6.2f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
