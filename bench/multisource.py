"""One GET_FILE from three capped sources beside the same download from one, in one run.

The whole system through pipes, as a user runs it: a ``twistd p2p-indexer``,
three serving clients (alice, bob, carol), each started with
``--max-upload-rate``, and a downloading client (dave). All three publish the
same file ``same.bin`` (one SHA-256: ``SOURCES`` lists them all); alice alone
publishes ``only.bin``, as large, other bytes. Each round dave runs
``GET_FILE alice only.bin`` (one source) and ``GET_FILE alice same.bin`` (the
three at once); the time is from the command written to its ``c> GET_FILE OK``
line, and each copy is compared with the original (SHA-256). The time service
is left down (the clients fall back to their own clocks). Never run as a test.

    .venv/bin/python bench/multisource.py                    # 150 MB at 15 MB/s each, 2 rounds
    .venv/bin/python bench/multisource.py --size-mb 60 --rate 10000000 --rounds 1
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.indexer_load import spawn_indexer  # noqa: E402

DOWN_WSDL = "http://127.0.0.1:9/?wsdl"  # nothing listens there


class Client:
    """One ``python -m p2p.client`` child whose stdin is a pipe; its lines read in threads."""

    def __init__(self, name: str, port: int, cwd: Path, extra: tuple[str, ...] = ()) -> None:
        self.name = name
        self.cwd = cwd
        home = cwd / ".home"
        home.mkdir(mode=0o700, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", P2P_HOME=str(home))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "p2p.client",
                "-s",
                "127.0.0.1",
                "-p",
                str(port),
                "--wsdl",
                DOWN_WSDL,
                "--share-dir",
                str(cwd),
                "--peer-listen",
                "tcp:0:interface=127.0.0.1",
                *extra,
            ],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(
            target=self._read, args=(self.proc.stdout, self.lines.put), daemon=True
        ).start()
        threading.Thread(
            target=self._read, args=(self.proc.stderr, self.errors.append), daemon=True
        ).start()

    @staticmethod
    def _read(stream, put) -> None:
        for line in stream:
            put(line.rstrip("\n"))

    def run(self, command: str, timeout: float = 600.0) -> tuple[str, float]:
        """Send one command; its result line and the seconds until it came."""
        began = time.perf_counter()
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.lines.get(timeout=timeout)
        return line, time.perf_counter() - began

    def check(self, command: str, expected: str) -> float:
        line, seconds = self.run(command)
        if line != expected:
            raise SystemExit(
                f"{self.name}: {command!r} printed {line!r}:\n" + "\n".join(self.errors)
            )
        return seconds

    def quit(self) -> None:
        try:
            self.proc.stdin.write("QUIT\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def make_file(path: Path, size: int, seed: int) -> str:
    """``size`` bytes of varied content; returns their SHA-256."""
    block = hashlib.sha256(b"%d" % seed).digest() * (1 << 15)  # 1 MiB
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left, n = size, 0
        while left:
            chunk = block[n % 97 :] + block[: n % 97]
            chunk = chunk[: min(left, len(chunk))]
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
            n += 1
    return digest.hexdigest()


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size-mb", type=int, default=150, help="file size in MB (10^6 bytes; 150)"
    )
    parser.add_argument(
        "--rate", type=int, default=15_000_000, help="each source's --max-upload-rate, bytes/s"
    )
    parser.add_argument("--rounds", type=int, default=2, help="single/multi pairs (2)")
    parser.add_argument("--dir", help="working directory (default: a temporary one)")
    opts = parser.parse_args()
    size = opts.size_mb * 1_000_000
    clients: list[Client] = []
    with tempfile.TemporaryDirectory(dir=opts.dir, prefix="p2p-multisource-") as work:
        work = Path(work)
        indexer, port = spawn_indexer(str(work), "normal")
        try:
            dirs = {name: work / name for name in ("alice", "bob", "carol", "dave")}
            for path in dirs.values():
                path.mkdir()
            same = make_file(dirs["alice"] / "same.bin", size, 1)
            only = make_file(dirs["alice"] / "only.bin", size, 2)
            for name in ("bob", "carol"):
                os.link(dirs["alice"] / "same.bin", dirs[name] / "same.bin")
            os.sync()
            for name in ("alice", "bob", "carol"):
                client = Client(name, port, dirs[name], ("--max-upload-rate", str(opts.rate)))
                clients.append(client)
                client.check(f"REGISTER {name}", "c> REGISTER OK")
                client.check(f"CONNECT {name}", "c> CONNECT OK")
                client.check("PUBLISH same.bin the same bytes at three owners", "c> PUBLISH OK")
            clients[0].check("PUBLISH only.bin alice alone has these", "c> PUBLISH OK")
            dave = Client("dave", port, dirs["dave"])
            clients.append(dave)
            dave.check("REGISTER dave", "c> REGISTER OK")
            dave.check("CONNECT dave", "c> CONNECT OK")
            times: dict[str, list[float]] = {"one source": [], "three sources": []}
            for round_ in range(1, opts.rounds + 1):
                for label, name, digest in (
                    ("one source", "only.bin", only),
                    ("three sources", "same.bin", same),
                ):
                    said = len(dave.errors)
                    seconds = dave.check(f"GET_FILE alice {name} got.bin", "c> GET_FILE OK")
                    if sha256(dirs["dave"] / "got.bin") != digest:
                        raise SystemExit(f"{label}: the copy differs from the original")
                    (dirs["dave"] / "got.bin").unlink()
                    times[label].append(seconds)
                    print(
                        f"round {round_}  {label:13s} {seconds:7.2f} s  "
                        f"{size / seconds / 1e6:6.1f} MB/s",
                        flush=True,
                    )
                    for line in dave.errors[said:]:
                        if line.startswith("GET_FILE: source"):
                            print("   ", line)  # a source left out or dropped

        finally:
            for client in clients:
                client.quit()
            indexer.terminate()
            indexer.wait()
    one, three = (statistics.median(times[k]) for k in ("one source", "three sources"))
    print(
        f"\n{opts.size_mb} MB, each source capped at {opts.rate / 1e6:g} MB/s, "
        f"{opts.rounds} rounds (medians):"
    )
    print(f"  one source     {one:7.2f} s  {size / one / 1e6:6.1f} MB/s")
    print(f"  three sources  {three:7.2f} s  {size / three / 1e6:6.1f} MB/s")
    print(f"  three / one: {one / three:.2f}x faster (target: at least 2.5x)")


if __name__ == "__main__":
    main()
