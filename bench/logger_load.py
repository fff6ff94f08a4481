"""LOG calls per second against the audit logger, over TCP and UDP.

Usage::

    .venv/bin/python bench/logger_load.py [--seconds 3] [--window 128]
    .venv/bin/python bench/logger_load.py --host 127.0.0.1 --port 9091 [--program 0x20000155]

Without ``--host`` it starts ``twistd -n p2p-logger`` on free ports in a
temporary directory (``--no-rpcbind``, its stdout to a file) and stops it at the
end. Four runs, each ``--seconds`` long:

* ``tcp-pipelined``: one TCP connection, ``--window`` calls outstanding;
* ``tcp-serial``: one TCP connection, one call at a time;
* ``udp-serial``: one call at a time over UDP;
* ``udp-window``: ``--window`` calls outstanding over UDP (a lost datagram is
  sent again after 1 s with the same XID; the logger's reply cache answers it).

Every call stores one record (fsync off unless the logger runs with --fsync).
The client is Python on the same machine, so it costs about as much CPU as
the server: the figures are a lower bound of the logger's capacity.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twisted.internet import defer, protocol, reactor, task  # noqa: E402

from p2p import wire  # noqa: E402
from p2p.oncrpc import client as rpc_client  # noqa: E402
from p2p.oncrpc import rpc  # noqa: E402

RECORD = "benchuser PUBLISH some-file.txt 25/11/2026 12:00:00"


def free_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def start_logger(
    program: int,
    extra: list[str],
    twistd_options: tuple[str, ...] = (),
    repo: Path = REPO,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, int, Path]:
    """``twistd -n p2p-logger`` on one free port (TCP and UDP) in a temporary directory.

    ``twistd_options`` go before the plugin name (``--profile=...``, ``--reactor=...``);
    ``repo`` is the checkout whose code runs, ``env`` more environment variables.
    """
    work = Path(tempfile.mkdtemp(prefix="logger-bench-"))
    port = free_port()
    out = open(work / "stdout.txt", "wb")  # noqa: SIM115 - the child keeps it
    args = [
        sys.executable,
        "-c",
        "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "--logfile=twistd.log",
        *twistd_options,
        "p2p-logger",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--listen",
        f"udp:{port}:interface=127.0.0.1",
        "--program",
        hex(program),
        "--no-rpcbind",
        *extra,
    ]
    child_env = dict(os.environ, **(env or {}), PYTHONPATH=str(repo))
    child = subprocess.Popen(args, cwd=work, stdout=out, stderr=subprocess.STDOUT, env=child_env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if re.search(rb"s> logger program", (work / "stdout.txt").read_bytes()):
            return child, port, work
        if child.poll() is not None:
            break
        time.sleep(0.05)
    child.kill()
    raise RuntimeError("logger did not start:\n" + (work / "stdout.txt").read_text())


def log_args() -> bytes:
    return rpc.pack_string(RECORD)


@defer.inlineCallbacks
def tcp_run(host: str, port: int, program: int, seconds: float, window: int):
    proto = yield rpc_client.connect(reactor, f"tcp:host={host}:port={port}")
    args = log_args()
    done = 0
    stop_at = reactor.seconds() + seconds
    finished = defer.Deferred()

    def one(_=None):
        nonlocal done
        if _ is not None:
            if rpc.unpack_int(_) != 0:
                raise RuntimeError("LOG answered an error")
            done += 1
        if reactor.seconds() >= stop_at:
            if not proto.pending and not finished.called:
                finished.callback(None)
            return
        proto.call(program, 1, wire.LOGGER_PROC_LOG, args).addCallback(one).addErrback(
            lambda f: finished.called or finished.errback(f)
        )

    start = reactor.seconds()
    for _ in range(window):
        one()
    yield finished
    elapsed = reactor.seconds() - start
    proto.transport.loseConnection()
    return done, elapsed


class UdpBench(protocol.DatagramProtocol):
    def __init__(self, host: str, port: int, program: int) -> None:
        self.address = (host, port)
        self.program = program
        self.pending: dict[int, tuple[bytes, object]] = {}
        self.xid = 1
        self.done = 0
        self.resent = 0
        self.on_reply = None

    def send_new(self) -> None:
        self.xid += 1
        message = rpc.encode_call(
            rpc.Call(self.xid, self.program, 1, wire.LOGGER_PROC_LOG), log_args()
        )
        timer = reactor.callLater(1.0, self.resend, self.xid)
        self.pending[self.xid] = (message, timer)
        self.transport.write(message, self.address)

    def resend(self, xid: int) -> None:
        message, _ = self.pending[xid]
        self.resent += 1
        self.pending[xid] = (message, reactor.callLater(1.0, self.resend, xid))
        self.transport.write(message, self.address)

    def datagramReceived(self, data: bytes, addr) -> None:
        reply = rpc.decode_reply(data)
        entry = self.pending.pop(reply.xid, None)
        if entry is None:
            return
        entry[1].cancel()
        if rpc.unpack_int(reply.body) != 0:
            raise RuntimeError("LOG answered an error")
        self.done += 1
        self.on_reply()


@defer.inlineCallbacks
def udp_run(host: str, port: int, program: int, seconds: float, window: int):
    bench = UdpBench(host, port, program)
    listening = reactor.listenUDP(0, bench, interface="127.0.0.1")
    stop_at = reactor.seconds() + seconds
    finished = defer.Deferred()

    def on_reply():
        if reactor.seconds() < stop_at:
            bench.send_new()
        elif not bench.pending and not finished.called:
            finished.callback(None)

    bench.on_reply = on_reply
    start = reactor.seconds()
    for _ in range(window):
        bench.send_new()
    yield finished
    elapsed = reactor.seconds() - start
    yield listening.stopListening()
    return bench.done, elapsed, bench.resent


@defer.inlineCallbacks
def main(options):
    runs = [
        ("tcp-pipelined", tcp_run, options.window),
        ("tcp-serial", tcp_run, 1),
        ("udp-serial", udp_run, 1),
        ("udp-window", udp_run, min(options.window, 64)),
    ]
    for name, run, window in runs:
        result = yield run(options.host, options.port, options.program, options.seconds, window)
        done, elapsed = result[0], result[1]
        extra = f", {result[2]} resent" if len(result) > 2 and result[2] else ""
        print(
            f"{name:14s} window {window:4d}: {done:7d} calls in {elapsed:5.2f} s = "
            f"{done / elapsed:8.0f} LOG/s{extra}",
            flush=True,
        )
        yield task.deferLater(reactor, 0.2, lambda: None)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", help="benchmark a running logger instead of spawning one")
    parser.add_argument("--port", type=int, default=wire.LOGGER_PORT)
    parser.add_argument("--program", type=lambda s: int(s, 0), default=wire.LOGGER_PROGRAM)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    parser.add_argument("--window", type=int, default=128, help="calls in flight (pipelined)")
    parser.add_argument("--fsync", action="store_true", help="spawned logger runs with --fsync")
    return parser.parse_args()


def run() -> None:
    options = parse()
    child = work = None
    if options.host is None:
        child, options.port, work = start_logger(
            options.program, ["--fsync"] if options.fsync else []
        )
        options.host = "127.0.0.1"
        print(f"logger spawned on 127.0.0.1:{options.port} (tcp+udp), files in {work}")
    failure = []

    def done(result):
        if isinstance(result, Exception) or hasattr(result, "printTraceback"):
            failure.append(result)
            result.printTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: main(options).addBoth(done))
    reactor.run()
    if child is not None:
        child.send_signal(signal.SIGTERM)
        child.wait(10)
        lines = (work / "p2p-audit.log").read_bytes().count(b"\n")
        print(f"audit file: {lines} records")
    sys.exit(1 if failure else 0)


if __name__ == "__main__":
    run()
