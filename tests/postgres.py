"""A throwaway PostgreSQL server for the tests: real, local, gone when the tests end.

:func:`server` starts one per test process, the first time a test asks: ``initdb``
in a temporary directory, listening on a Unix socket in that directory only (no
TCP port), trust authentication, started and stopped with ``pg_ctl``. Each test
then takes a fresh database of its own (:func:`database`), so tests never see
each other's rows. No mock: the indexer's PostgreSQL code runs against the real
server, as it does in production.

The binaries come from ``PATH`` (``initdb``, ``pg_ctl``), else from Debian's
``/usr/lib/postgresql/<version>/bin`` (the ``postgresql`` package that
``.ci/run`` installs). Without them the tests that need a server are skipped,
naming what is missing. ``initdb`` refuses to run as root: as root the server
runs as ``nobody`` (``runuser``), in a directory ``nobody`` owns; the tests,
still root, reach it through its socket.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

#: The superuser initdb creates (any name: the server trusts its socket's users).
SUPERUSER = "postgres"
#: Who runs the server when the tests run as root (initdb refuses root).
UNPRIVILEGED = "nobody"


def binaries() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres`` (None: not installed).

    ``PATH`` first, then the newest ``/usr/lib/postgresql/<N>/bin``.
    """
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(x) for x in Path(p).parent.parent.name.split(".") if x.isdigit()],
    )
    return Path(versions[-1]).parent if versions else None


@dataclass
class Server:
    """A running throwaway server: its data and socket directory, and how to reach it."""

    directory: Path
    bin: Path
    prefix: list[str]  # runs a command as the server's owner ([] when that is us)
    _databases: itertools.count

    @property
    def socket_dir(self) -> str:
        return str(self.directory)

    def uri(self, dbname: str = SUPERUSER) -> str:
        """The libpq URI of ``dbname`` on this server (its Unix socket)."""
        return f"postgresql:///{dbname}?host={self.directory}&user={SUPERUSER}"

    def create_database(self) -> str:
        """A new, empty database; its URI."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._databases)}"
        with psycopg.connect(self.uri(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def pause(self) -> None:
        """Stop the server (``fast``: its sessions end), keeping its data (blocking)."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start the paused server again (blocking)."""
        log = str(self.directory / "server.log")
        self._pg_ctl("-o", _options(self.directory), "-l", log, "-w", "-t", "60", "start")

    def _pg_ctl(self, *args: str) -> None:
        data = str(self.directory / "data")
        pg_ctl = [*self.prefix, str(self.bin / "pg_ctl"), "-D", data, *args]
        subprocess.run(pg_ctl, check=True, capture_output=True)

    def stop(self) -> None:
        """Stop the server at once (``immediate``) and remove its directory."""
        subprocess.run(
            [
                *self.prefix,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.directory / "data"),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(self.directory, ignore_errors=True)


def _run_or_remove(command: list[str], directory: Path, what: str) -> None:
    """Run ``command``; if it fails, remove ``directory`` and say why (with the
    server's log, when there is one)."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return
    log_file = directory / "server.log"
    log = log_file.read_text(errors="replace") if log_file.exists() else ""
    shutil.rmtree(directory, ignore_errors=True)
    raise RuntimeError(f"{what} failed:\n{done.stdout}\n{done.stderr}\n{log}")


def _options(directory: Path) -> str:
    """The server's settings: only the Unix socket in ``directory``; durability against
    a crash of the host is not what the tests look at (a killed indexer never takes the
    server with it): no fsync."""
    return (
        f"-c listen_addresses='' -c unix_socket_directories='{directory}' "
        "-c fsync=off -c full_page_writes=off -c max_connections=200 "
        "-c shared_buffers=32MB"
    )


_server: Server | None = None
_problem: str | None = None


def _start() -> Server:
    bin_dir = binaries()
    if bin_dir is None:
        raise SkipTest(
            "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in "
            "/usr/lib/postgresql/*/bin: install Debian's postgresql package"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise SkipTest(f"psycopg is not installed ({exc})") from None
    directory = Path(tempfile.mkdtemp(prefix="p2p-pg-"))  # short: a socket path is <108 bytes
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam(UNPRIVILEGED)
        os.chown(directory, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", UNPRIVILEGED, "--"]
    data = directory / "data"
    run = [
        *prefix,
        str(bin_dir / "initdb"),
        "-D",
        str(data),
        "-U",
        SUPERUSER,
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",
        "--no-sync",
    ]
    _run_or_remove(run, directory, "initdb")
    start = [
        *prefix,
        str(bin_dir / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        _options(directory),
        "-l",
        str(directory / "server.log"),
        "-w",
        "-t",
        "60",
        "start",
    ]
    _run_or_remove(start, directory, "pg_ctl start")
    server = Server(directory, bin_dir, prefix, itertools.count(1))
    atexit.register(server.stop)
    return server


def server() -> Server:
    """The test process's throwaway server, started on first use (SkipTest without one)."""
    global _server, _problem
    if _server is None:
        if _problem is not None:
            raise SkipTest(_problem)
        try:
            _server = _start()
        except SkipTest as exc:
            _problem = str(exc)
            raise
    return _server


def own_server(testcase: TestCase) -> Server:
    """A throwaway server of this test's own (one it may stop and start), gone after it."""
    server()  # skips the test, saying why, where there is none
    own = _start()
    atexit.unregister(own.stop)
    testcase.addCleanup(own.stop)
    return own


def database(testcase: TestCase) -> str:
    """The URI of a fresh database on the throwaway server, for this test only."""
    return server().create_database()


__all__ = ["Server", "binaries", "database", "own_server", "server"]
