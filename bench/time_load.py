"""Load benchmark of the SOAP time service: get_time calls per second.

Runs, for a few seconds each:

* ``zeep``: one zeep client (one keep-alive ``requests`` session), then N
  client processes each with its own zeep client;
* ``raw``: the same with a hand-written envelope POSTed over one keep-alive
  HTTP/1.1 connection per process (a bare socket), which shows the server's own
  capacity without zeep's client-side cost.

It starts its own ``twistd p2p-time`` on a free loopback port, or measures
the service at ``--url``. Usage::

    .venv/bin/python bench/time_load.py [--seconds 5] [--clients 4] [--url URL]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
ENVELOPE = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/" xmlns:t="urn:p2p:time">'
    b"<e:Body><t:get_time/></e:Body></e:Envelope>"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(extra: list[str]) -> tuple[subprocess.Popen, str]:
    """``twistd -n p2p-time`` on a free loopback port; returns it and its WSDL URL."""
    port = free_port()
    twistd = Path(sys.executable).with_name("twistd")
    cmd = [str(twistd), "-n", "--pidfile=", "--logfile=/dev/null", "p2p-time"]
    cmd += ["--listen", f"tcp:{port}:interface=127.0.0.1", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    for line in proc.stdout:  # the service prints its URL once it listens
        match = re.search(r"s> time service (\S+)", line)
        if match:
            return proc, match.group(1)
    raise SystemExit(f"the service did not start: exit {proc.wait()}")


def zeep_worker(wsdl: str, seconds: float) -> tuple[int, float]:
    """Calls made by one zeep client in ``seconds``, and the time they took."""
    import zeep

    client = zeep.Client(wsdl)  # one requests.Session: keep-alive
    client.service.get_time()  # warm up: WSDL parsed, connection open
    calls, start = 0, time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        client.service.get_time()
        calls += 1
    return calls, time.perf_counter() - start


class TimeCaller:
    """get_time over one keep-alive HTTP/1.1 connection, as lean as a client can be:
    the request bytes built once, the answer read by its Content-Length."""

    def __init__(self, wsdl: str) -> None:
        url = urlsplit(wsdl)
        self.address = (url.hostname, url.port)
        self.request = (
            f"POST {url.path or '/'} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            "Content-Type: text/xml; charset=utf-8\r\n"
            f'SOAPAction: "get_time"\r\nContent-Length: {len(ENVELOPE)}\r\n\r\n'
        ).encode("ascii") + ENVELOPE
        self.sock: socket.socket | None = None
        self.pending = b""

    def __call__(self) -> bytes:
        """One call; the answer's body (raises on anything but a 200 with a stamp)."""
        if self.sock is None:
            self.sock = socket.create_connection(self.address)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(self.request)
        data = self.pending
        while (end := data.find(b"\r\n\r\n")) < 0:
            data += self._recv()
        head = data[:end]
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if not head.startswith(b"HTTP/1.1 200") or match is None:
            raise RuntimeError(f"bad answer: {data[:200]!r}")
        stop = end + 4 + int(match.group(1))
        while len(data) < stop:
            data += self._recv()
        body, self.pending = data[end + 4 : stop], data[stop:]
        if b"get_timeResult>" not in body:
            raise RuntimeError(f"bad answer: {body[:200]!r}")
        return body

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RuntimeError("the service closed the connection")
        return chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def raw_worker(wsdl: str, seconds: float) -> tuple[int, float]:
    """Calls made over one keep-alive connection with a fixed envelope."""
    call = TimeCaller(wsdl)
    call()
    calls, start = 0, time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        call()
        calls += 1
    call.close()
    return calls, time.perf_counter() - start


WORKERS = {"zeep": zeep_worker, "raw": raw_worker}


def measure(kind: str, wsdl: str, clients: int, seconds: float) -> tuple[int, float]:
    """Total calls and calls per second of ``clients`` processes (one: in this process)."""
    worker = WORKERS[kind]
    if clients == 1:
        results = [worker(wsdl, seconds)]
    else:
        with multiprocessing.Pool(clients) as pool:
            results = pool.starmap(worker, [(wsdl, seconds)] * clients)
    total = sum(calls for calls, _ in results)
    rate = sum(calls / elapsed for calls, elapsed in results)
    return total, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="WSDL URL of a running service (default: start one)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client processes")
    parser.add_argument("--kinds", default="zeep,raw", help="comma list of: zeep, raw")
    parser.add_argument(
        "service_args", nargs="*", help="extra p2p-time options when starting our own"
    )
    args = parser.parse_args()

    proc = None
    wsdl = args.url
    if wsdl is None:
        proc, wsdl = start_service(args.service_args)
    try:
        print(f"time service {wsdl}, {os.cpu_count()} CPUs, {args.seconds:g} s per run")
        print(f"{'client':<6} {'procs':>5} {'calls':>8} {'calls/s':>9} {'ms/call':>8}")
        for kind in args.kinds.split(","):
            for clients in sorted({1, args.clients}):
                total, rate = measure(kind, wsdl, clients, args.seconds)
                latency = 1000.0 * clients / rate if rate else float("nan")
                print(f"{kind:<6} {clients:>5} {total:>8} {rate:>9.0f} {latency:>8.2f}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
