"""Our logger beside an rpcgen-built C logger, one LOG call at a time, TCP and UDP.

Usage::

    .venv/bin/python bench/logger_vs_rpcgen.py [--seconds 3] [--rounds 3]
    .venv/bin/python bench/logger_vs_rpcgen.py --profile /tmp/logger.prof   # cProfile ours

The reference is what ``rpcgen`` makes of ``p2p/logger/logger.x`` with a LOG
procedure that appends the record and a newline to a file with one write(2)
before replying 0 (``bench/logger_rpcgen_server.c``). The client is the C
client of the foreign-client tests (``tests/c/log_client.c`` with ``-t``):
it calls LOG, waits for the reply, calls again, for ``--seconds``. Both are
built here with rpcgen and gcc against libtirpc (skipped, with a message, when
those are missing); neither server registers with rpcbind.

``twistd -n p2p-logger`` runs as a child on free ports (``--no-rpcbind``,
audit file and printed records in a temporary directory), the C server on
ports the kernel chooses. Each round runs the same client against each server
over TCP then UDP, the order of the servers alternating between rounds.
Printed: every run with the server's CPU time per call (user + system, from
/proc), then per transport and server the median calls/s, its ratio to
rpcgen's median, the median of the per-round ratios (each run against the
rpcgen run of its round: on a busy machine neighbouring runs are disturbed
alike) and the median CPU per call. At the end every audit file must hold
exactly one line per answered call.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from logger_load import RECORD, start_logger

REPO = Path(__file__).resolve().parent.parent
LOGGER_X = REPO / "p2p/logger/logger.x"
PROGRAM = 0x20000155


def missing_tools() -> list[str]:
    missing = [f"{tool}" for tool in ("rpcgen", "gcc") if shutil.which(tool) is None]
    if not Path("/usr/include/tirpc/rpc/rpc.h").exists():
        missing.append("libtirpc headers (/usr/include/tirpc, Debian package libtirpc-dev)")
    return missing


def build(work: Path) -> tuple[Path, Path]:
    """rpcgen the stubs of logger.x; compile the C server and the C client (-O2)."""
    shutil.copy(LOGGER_X, work / "logger.x")
    for flag, out in (("-h", "logger.h"), ("-m", "logger_svc.c"), ("-c", "logger_xdr.c")):
        subprocess.run(["rpcgen", "-C", flag, "-o", out, "logger.x"], cwd=work, check=True)
    subprocess.run(["rpcgen", "-C", "-l", "-o", "logger_clnt.c", "logger.x"], cwd=work, check=True)
    cc = ["gcc", "-O2", "-I/usr/include/tirpc", "-I."]
    server, client = work / "rpcgen_server", work / "log_client"
    sources = {
        server: [str(REPO / "bench/logger_rpcgen_server.c"), "logger_svc.c"],
        client: [str(REPO / "tests/c/log_client.c"), "logger_clnt.c"],
    }
    for target, files in sources.items():
        subprocess.run(
            [*cc, "-o", str(target), *files, "logger_xdr.c", "-ltirpc"], cwd=work, check=True
        )
    return server, client


def start_rpcgen(
    server: Path, work: Path, pin: list[str]
) -> tuple[subprocess.Popen, dict[str, int], Path]:
    """The C server; its ports from the line it prints first."""
    audit = work / "rpcgen-audit.log"
    child = subprocess.Popen(
        [*pin, str(server), hex(PROGRAM), str(audit)], stdout=subprocess.PIPE, text=True
    )
    words = child.stdout.readline().split()  # rpcgen logger tcp PORT udp PORT
    if len(words) != 6:
        child.kill()
        raise RuntimeError(f"the rpcgen server did not start: {words}")
    return child, {words[2]: int(words[3]), words[4]: int(words[5])}, audit


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_client(
    client: Path, kind: str, port: int, seconds: float, server: int, pin: list[str]
) -> tuple[int, float, float]:
    """(calls, seconds, server CPU seconds) of one timed run of the C client."""
    before = cpu_seconds(server)
    out = subprocess.run(
        [*pin, str(client), "-t", str(seconds), kind, "127.0.0.1", str(port), hex(PROGRAM), RECORD],
        capture_output=True,
        text=True,
        check=False,
    )
    cpu = cpu_seconds(server) - before
    words = out.stdout.split()
    if out.returncode != 0 or len(words) != 4:
        raise RuntimeError(f"C client failed against port {port}: {out.stderr.strip()}")
    return int(words[1]), float(words[3]), cpu


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, servers interleaved")
    parser.add_argument("--profile", help="run our logger under cProfile, stats to this file")
    parser.add_argument(
        "--transports", default="tcp,udp", help="comma-separated: tcp, udp (default both)"
    )
    parser.add_argument(
        "--compare-plain",
        action="store_true",
        help="also our logger with P2P_PLAIN_TWISTED=send_now (replies through transport.write)",
    )
    parser.add_argument(
        "--baseline", metavar="CHECKOUT", help="also the logger of another checkout (before/after)"
    )
    parser.add_argument(
        "--pin",
        metavar="SERVER_CPUS[/CLIENT_CPUS]",
        help="taskset CPU lists: 1 runs everything on CPU 1 (each call's CPU time adds up); "
        "1/0 the servers on CPU 1 and the client on CPU 0 (each call wakes the other CPU)",
    )
    return parser.parse_args()


def main() -> int:
    options = parse()
    missing = missing_tools()
    if missing:
        print("logger_vs_rpcgen: skipped, not installed: " + ", ".join(missing))
        return 0
    work = Path(tempfile.mkdtemp(prefix="logger-vs-rpcgen-"))
    server, client = build(work)
    profile: tuple[str, ...] = ()
    if options.profile:
        profile = (f"--profile={os.path.abspath(options.profile)}", "--profiler=cprofile")
        profile += ("--savestats",)
    server_cpus, _, client_cpus = (options.pin or "").partition("/")
    pin = ["taskset", "-c", server_cpus] if server_cpus else []
    client_pin = ["taskset", "-c", client_cpus or server_cpus] if server_cpus else []
    # name -> (process, {"tcp": port, "udp": port}, audit file)
    servers: dict[str, tuple[subprocess.Popen, dict[str, int], Path]] = {}
    loggers = [("ours", REPO, {}, profile)]
    if options.compare_plain:
        loggers.append(("plain", REPO, {"P2P_PLAIN_TWISTED": "send_now"}, ()))
    if options.baseline:
        loggers.append(("baseline", Path(options.baseline).resolve(), {}, ()))
    try:
        for name, repo, env, twistd_options in loggers:
            child, port, files = start_logger(PROGRAM, [], twistd_options, repo, env)
            servers[name] = (child, {"tcp": port, "udp": port}, files / "p2p-audit.log")
            print(f"{name}: twistd p2p-logger from {repo}, files in {files}")
        servers["rpcgen"] = start_rpcgen(server, work, pin)
        print(f"rpcgen: built in {work}")
        if pin:
            for child, _ports, _audit in servers.values():
                subprocess.run(
                    ["taskset", "-pc", server_cpus, str(child.pid)], check=True, capture_output=True
                )
        results = measure(options, client, servers, client_pin)
    finally:
        for child, _ports, _audit in servers.values():
            child.send_signal(signal.SIGTERM)
        for child, _ports, _audit in servers.values():
            child.wait(30)
    return report(options, servers, *results)


def measure(options, client: Path, servers: dict, pin: list[str]):
    """Run the client against each server, TCP then UDP, per round; rates, costs, calls."""
    rates: dict[tuple[str, str], list[float]] = {}
    costs: dict[tuple[str, str], list[float]] = {}  # server CPU microseconds per call
    calls = dict.fromkeys(servers, 0)
    names = list(servers)
    for round_ in range(options.rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        for kind in options.transports.split(","):
            for name in order:
                child, ports, _audit = servers[name]
                done, elapsed, cpu = run_client(
                    client, kind, ports[kind], options.seconds, child.pid, pin
                )
                calls[name] += done
                rates.setdefault((name, kind), []).append(done / elapsed)
                costs.setdefault((name, kind), []).append(cpu / done * 1e6)
                print(
                    f"round {round_ + 1} {kind} {name:8s}: {done:7d} calls in "
                    f"{elapsed:5.2f} s = {done / elapsed:7.0f} LOG/s, "
                    f"server CPU {cpu / done * 1e6:5.1f} us/call",
                    flush=True,
                )
    return rates, costs, calls


def report(options, servers: dict, rates: dict, costs: dict, calls: dict) -> int:
    """Medians, ratios to rpcgen; 1 when an audit file misses an answered call."""
    print()
    for kind in options.transports.split(","):
        ref = statistics.median(rates["rpcgen", kind])
        for name in servers:
            rate = statistics.median(rates[name, kind])
            cpu = statistics.median(costs[name, kind])
            # each round's ratio, against the rpcgen run of the same round (a busy
            # machine disturbs neighbouring runs alike), then their median
            pairs = zip(rates[name, kind], rates["rpcgen", kind], strict=True)
            paired = statistics.median(mine / theirs for mine, theirs in pairs)
            print(
                f"{kind} {name:8s}: {rate:7.0f} LOG/s, ratio to rpcgen {rate / ref:.2f} "
                f"(per round {paired:.2f}), server CPU {cpu:5.1f} us/call "
                f"(medians of {options.rounds})"
            )
    stored = {name: audit.read_bytes().count(b"\n") for name, (_c, _p, audit) in servers.items()}
    for name in servers:
        print(f"{name} audit file: {stored[name]} records for {calls[name]} answered calls")
    if stored != calls:
        print("MISMATCH: a server answered a call whose record is not in its audit file")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
