"""Round trip of one command as our client sees it: TLS beside classic plaintext, in one run.

Starts a ``twistd p2p-indexer``, then drives it with the client's own
``IndexerClient`` (the code every shell command goes through), one request at
a time, as a user at a shell does: full user life cycles (REGISTER, CONNECT,
PUBLISH x3, LIST_CONTENT, LIST_PEERS, DELETE x3, DISCONNECT, UNREGISTER).
``tls`` is the default our client uses (one kept TLS connection presenting the
user's key, so every name is claimed); ``plaintext`` is the classic protocol, a
connection per request (``use_tls=False``). In those two the DATETIME stamp is
fixed; ``tls+time`` is a whole command as the shell runs it: a get_time call to
a real ``twistd p2p-time`` through the client's own ``TimeClient`` (zeep, in the
thread pool), then the request over TLS.

    python bench/client_latency.py --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twisted.internet import defer, task  # noqa: E402

from bench.indexer_load import cpu_seconds, spawn_indexer  # noqa: E402
from bench.time_load import start_service  # noqa: E402
from p2p import wire  # noqa: E402
from p2p.client.home import Home  # noqa: E402
from p2p.client.indexer_client import IndexerClient  # noqa: E402
from p2p.client.time_client import TimeClient  # noqa: E402

DATETIME = "01/01/2026 00:00:00"
MODES = ("plaintext", "tls", "tls+time")


def life_cycle(user: str) -> list[tuple[str, tuple]]:
    files = [f"file{i}.txt" for i in range(3)]
    steps = [("REGISTER", ()), ("CONNECT", (20000,))]
    steps += [("PUBLISH", (f, f"the file {f}")) for f in files]
    steps += [("LIST_CONTENT", (user,)), ("LIST_PEERS", ())]
    steps += [("DELETE", (f,)) for f in files]
    steps += [("DISCONNECT", ()), ("UNREGISTER", ())]
    return steps


@defer.inlineCallbacks
def run(reactor, mode: str, port: int, seconds: float, home: Home, tag: str, stamp=None):
    """Life cycles for ``seconds``; fires with (round trips in seconds, unexpected codes).

    ``stamp``: where the DATETIME of each request comes from (default: fixed).
    """
    client = IndexerClient(
        "127.0.0.1",
        port,
        stamp if stamp is not None else (lambda: defer.succeed(DATETIME)),
        reactor=reactor,
        home=home,
        use_tls=mode != "plaintext",
    )
    samples: list[float] = []
    unexpected = 0
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        user = f"{tag}{n}"
        n += 1
        if mode != "plaintext":
            home.create_identity(user)  # as REGISTER makes it (on disk, 0600), not timed
        for op, args in life_cycle(user):
            began = time.perf_counter()
            code, _rows = yield client.request(op, user, *args)
            samples.append(time.perf_counter() - began)
            unexpected += code != wire.OK
        if mode != "plaintext":
            # A user's shell keeps one connection; the next user is another shell.
            yield client.close()
            home.forget_identity(user)
    yield client.close()
    return samples, unexpected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    figures: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in MODES}
    failed = False

    @defer.inlineCallbacks
    def bench(reactor):
        nonlocal failed
        with tempfile.TemporaryDirectory() as workdir:
            server, port = spawn_indexer(workdir, "normal")
            timews, wsdl = start_service([])
            clock = TimeClient(wsdl, warn=lambda text: print("time client:", text), reactor=reactor)
            try:
                home = Home(Path(workdir) / "home")
                for round_ in range(1, args.rounds + 1):
                    for mode in MODES:
                        cpu = cpu_seconds(server.pid)
                        stamp = clock.now if mode == "tls+time" else None
                        samples, unexpected = yield run(
                            reactor, mode, port, args.seconds, home, f"r{round_}{mode[0]}x", stamp
                        )
                        cpu = cpu_seconds(server.pid) - cpu
                        failed = failed or unexpected > 0
                        samples.sort()
                        row = (  # requests/s while requests ran (key making left out)
                            len(samples) / sum(samples),
                            samples[len(samples) // 2] * 1e3,
                            samples[int(len(samples) * 0.99)] * 1e3,
                            cpu / len(samples) * 1e6,
                        )
                        figures[mode].append(row)
                        print(
                            f"round {round_}  {mode:9s} {row[0]:6.0f} requests/s  "
                            f"p50 {row[1]:.2f} ms  p99 {row[2]:.2f} ms  "
                            f"indexer {row[3]:.0f} us/request  unexpected={unexpected}",
                            flush=True,
                        )
            finally:
                server.terminate()
                timews.terminate()
                server.wait()
                timews.wait()
                server._drain.wait()
        summary(figures)
        if failed:
            raise RuntimeError("some requests got an unexpected code")

    task.react(bench)  # exits with 1 if bench failed
    return 0


def summary(figures: dict) -> None:
    print("\nmedians, one client, one request at a time:")
    for mode, rows in figures.items():
        rate, p50, p99, cpu = (statistics.median(r[i] for r in rows) for i in range(4))
        print(
            f"  {mode:9s} {rate:6.0f} requests/s, round trip p50 {p50:.2f} ms, "
            f"p99 {p99:.2f} ms, indexer {cpu:.0f} us/request"
        )
    tls, plain = (statistics.median(r[0] for r in figures[m]) for m in ("tls", "plaintext"))
    print(f"  TLS / plaintext: {tls / plain:.0%} of the requests/s (target: at least 50%)")
    p50 = statistics.median(r[1] for r in figures["tls+time"])
    print(
        f"  a whole command (get_time through zeep, then the request): p50 {p50:.2f} ms "
        "(target: under 5 ms)"
    )


if __name__ == "__main__":
    sys.exit(main())
