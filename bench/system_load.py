"""The whole system's throughput: commands/s end to end beside each service alone.

Starts a ``twistd p2p-indexer`` and a ``twistd p2p-time`` (each on a free
loopback port) and runs, in the same run, N load processes three ways, one
after the other, for ``--rounds`` rounds:

* ``indexer``: user life cycles against the indexer alone (bench/indexer_load.py's
  load: a request per connection, as the classic protocol says);
* ``time``: get_time calls alone, each process over one keep-alive connection
  with a fixed envelope (bench/time_load.py's ``raw`` client);
* ``system``: the same life cycles, each request stamped with a get_time call
  made just before it, as our client does: a command's round trip is both.

For each: requests (or commands) per second, the round trip p50/p99, and the
CPU each service spent per request (user + system, the service's worker
processes included). The time service must serve at least as many get_time/s
as the indexer serves requests/s under the same load.

    .venv/bin/python bench/system_load.py [--clients 4] [--seconds 5] [--rounds 3]
        [--time-args "--workers 2"] [--indexer-args "..."]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from indexer_load import client as indexer_client  # noqa: E402
from indexer_load import spawn_indexer  # noqa: E402
from time_load import TimeCaller, start_service  # noqa: E402


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU so far of a process and its live descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        child = int(entry.name)
        children.setdefault(int(fields[1]), []).append(child)
        times[child] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += times.get(current, 0.0)
        todo += children.get(current, [])
    return total


def time_client(index: int, wsdl: str, seconds: float, start: float, out) -> None:
    """get_time calls until the deadline; report like the indexer's load clients."""
    call = TimeCaller(wsdl)
    call()  # connected
    clock = time.perf_counter
    samples: list[float] = []
    while time.time() < start:
        time.sleep(0.001)
    end = start + seconds
    while time.time() < end:
        began = clock()
        call()
        samples.append(clock() - began)
    call.close()
    out.put((len(samples), 0, None, samples))


class Stamper:
    """A get_time call returning its stamp: the DATETIME of the next request."""

    def __init__(self, wsdl: str) -> None:
        self.call = TimeCaller(wsdl)

    def __call__(self) -> str:
        body = self.call()
        start = body.index(b"get_timeResult>") + len(b"get_timeResult>")
        return body[start : body.index(b"<", start)].decode("ascii")


def system_client(
    index: int, address: tuple[str, int], wsdl: str, seconds: float, start: float, out
) -> None:
    """Life cycles with every request stamped by a get_time call just before it."""
    indexer_client(index, address, seconds, start, out, stamp=Stamper(wsdl))


def run_load(kind: str, args: argparse.Namespace, address, wsdl: str, pids: dict) -> dict:
    """One run of ``args.clients`` load processes of ``kind``; its figures."""
    out: multiprocessing.Queue = multiprocessing.Queue()
    start = time.time() + 0.5
    procs = []
    for i in range(args.clients):
        if kind == "indexer":
            target, targs = indexer_client, (i, address, args.seconds, start, out)
        elif kind == "time":
            target, targs = time_client, (i, wsdl, args.seconds, start, out)
        else:
            target, targs = system_client, (i, address, wsdl, args.seconds, start, out)
        procs.append(multiprocessing.Process(target=target, args=targs))
    cpu_before = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    cpu = {name: tree_cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    total = sum(r[0] for r in results)
    samples = sorted(x for r in results for x in r[3])
    first = next((r[2] for r in results if r[2] is not None), None)
    return {
        "rate": total / args.seconds,
        "total": total,
        "unexpected": sum(r[1] for r in results),
        "first": first,
        "p50_ms": samples[len(samples) // 2] * 1e3 if samples else float("nan"),
        "p99_ms": samples[int(len(samples) * 0.99)] * 1e3 if samples else float("nan"),
        "us": {name: used / total * 1e6 if total else float("nan") for name, used in cpu.items()},
    }


KINDS = ("indexer", "time", "system")
UNITS = {"indexer": "requests/s", "time": "get_time/s", "system": "commands/s"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4, help="load processes (4)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run (5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three runs (3)")
    parser.add_argument("--time-args", default="", help="more options of p2p-time")
    parser.add_argument("--indexer-args", default="", help="more options of p2p-indexer")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as workdir:
        extra = tuple(shlex.split(args.indexer_args))
        indexer, port = spawn_indexer(workdir, "normal", extra=extra)
        timews, wsdl = start_service(shlex.split(args.time_args))
        pids = {"indexer": indexer.pid, "time": timews.pid}
        runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        try:
            print(
                f"indexer 127.0.0.1:{port}, time service {wsdl}; {args.clients} load "
                f"processes, {args.seconds:g} s per run, {os.cpu_count()} CPUs"
            )
            for round_ in range(1, args.rounds + 1):
                for kind in KINDS:
                    run = run_load(kind, args, ("127.0.0.1", port), wsdl, pids)
                    runs[kind].append(run)
                    print(
                        f"round {round_}  {kind:8s} {run['rate']:7.0f} {UNITS[kind]:11s} "
                        f"p50 {run['p50_ms']:.2f} ms  p99 {run['p99_ms']:.2f} ms  "
                        f"CPU per {'command' if kind == 'system' else 'call'}: "
                        f"indexer {run['us']['indexer']:.0f} us, time {run['us']['time']:.0f} us"
                        f"  unexpected={run['unexpected']}"
                    )
                    if run["first"] is not None:
                        print(f"  first unexpected: {run['first']!r}")
        finally:
            for proc in (timews, indexer):
                proc.terminate()
                proc.wait(timeout=30)
            indexer._drain.wait()
    median = {kind: statistics.median(r["rate"] for r in runs[kind]) for kind in KINDS}
    print(f"\nmedians over {args.rounds} rounds:")
    for kind in KINDS:
        us = {
            name: statistics.median(r["us"][name] for r in runs[kind])
            for name in ("indexer", "time")
        }
        p50 = statistics.median(r["p50_ms"] for r in runs[kind])
        print(
            f"  {kind:8s} {median[kind]:7.0f} {UNITS[kind]:11s} round trip p50 {p50:.2f} ms, "
            f"CPU indexer {us['indexer']:.0f} us, time {us['time']:.0f} us"
        )
    ratio = median["time"] / median["indexer"]
    print(
        f"  time service / indexer: {ratio:.2f}x (target: at least 1.00x); "
        f"system / indexer: {median['system'] / median['indexer']:.2f}x"
    )
    failed = any(r["unexpected"] for values in runs.values() for r in values)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
