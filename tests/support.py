"""Shared helpers for end-to-end tests: real child processes and real sockets.

Nothing here sleeps for a fixed time: every wait is for a port, a line of
output or a process exit, with a deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

REPO = Path(__file__).resolve().parent.parent
TWISTD = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
]
#: Deadline for a service to start or a line to appear.
DEADLINE = 20.0


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: this checkout first on the path, unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def hold_port(testcase: TestCase, port: int = 0, host: str = "127.0.0.1") -> int:
    """A TCP port bound on ``host`` but not listening, held until the test ends.

    Connections to it are refused, and no program can take it meanwhile, unlike
    a port that was merely free a moment ago. It is bound with SO_REUSEADDR, as
    Twisted binds its listening ports, so the test's own service may still come
    up on it later (Linux lets a listener share the port with a bound socket
    that is not listening when both set the option): "the logger is down, then
    up on this address" needs no bind-close-reuse race.
    """
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind((host, port))
    testcase.addCleanup(held.close)
    return held.getsockname()[1]


def deadline(d: Deferred, seconds: float = DEADLINE) -> Deferred:
    """Fail ``d`` with ``defer.TimeoutError`` if it has not fired in ``seconds``."""
    return d.addTimeout(seconds, reactor)


@defer.inlineCallbacks
def poll_until(
    condition: Callable[[], object],
    timeout: float = DEADLINE,
    interval: float = 0.02,
    what: str = "condition",
):
    """Fire with ``condition()``'s first true value, checked every ``interval`` seconds.

    For state nothing announces (a file's content, a counter in another
    object); fails with ``defer.TimeoutError`` naming ``what`` after ``timeout``.
    """
    start = reactor.seconds()
    while True:
        value = condition()
        if value:
            return value
        if reactor.seconds() - start > timeout:
            raise defer.TimeoutError(f"{what} not reached in {timeout}s")
        yield task.deferLater(reactor, interval, lambda: None)


class _UntilClosed(protocol.Protocol):
    """Keeps every byte received; ``done`` fires with them when the peer closes."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.done.callback(self.data)


@defer.inlineCallbacks
def exchange(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = DEADLINE):
    """Connect over TCP, send ``data``, fire with all bytes received until the server closes."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    proto = yield connectProtocol(TCP4ClientEndpoint(reactor, host, port), _UntilClosed())
    proto.transport.write(data)
    received = yield deadline(proto.done, timeout)
    return received


class ServiceProcess(protocol.ProcessProtocol):
    """A child process whose stdout/stderr lines are kept and can be waited for."""

    def __init__(self, name: str = "child") -> None:
        self.name = name
        self.lines: list[str] = []
        self.errlines: list[str] = []
        self._partial = {1: b"", 2: b""}
        self._waiters: list[tuple[re.Pattern[str], Deferred]] = []
        self.ended: Deferred = Deferred()
        self.exit_code: int | None = None
        self.exit_signal: int | None = None  # the signal that ended it, if one did
        self.exited = False

    # ProcessProtocol

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd not in self._partial:
            return
        buf = self._partial[fd] + data
        *complete, self._partial[fd] = buf.split(b"\n")
        for raw in complete:
            self._add_line(fd, raw.decode("utf-8", "replace").rstrip("\r"))

    def _add_line(self, fd: int, line: str) -> None:
        (self.lines if fd == 1 else self.errlines).append(line)
        for item in list(self._waiters):
            pattern, d = item
            match = pattern.search(line)
            if match:
                self._waiters.remove(item)
                d.callback(match)

    def processEnded(self, reason) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._add_line(fd, rest.decode("utf-8", "replace"))
        self.exited = True
        self.exit_code = getattr(reason.value, "exitCode", None)
        self.exit_signal = getattr(reason.value, "signal", None)
        waiters, self._waiters = self._waiters, []
        for pattern, d in waiters:
            d.errback(
                RuntimeError(
                    f"{self.name} exited before printing {pattern.pattern!r}:\n" + self.output()
                )
            )
        self.ended.callback(self.exit_code)

    # API

    def output(self) -> str:
        """Everything printed so far, stdout then stderr (for failure messages)."""
        return "\n".join([*self.lines, "--- stderr ---", *self.errlines])

    def wait_for_line(self, pattern: str, timeout: float = DEADLINE) -> Deferred:
        """Fire with the first match of ``pattern`` in a stdout or stderr line."""
        regex = re.compile(pattern)
        for line in self.lines + self.errlines:
            match = regex.search(line)
            if match:
                return defer.succeed(match)
        if self.exited:
            return defer.fail(RuntimeError(f"{self.name} exited:\n{self.output()}"))
        d: Deferred = Deferred()
        self._waiters.append((regex, d))

        def timed_out(failure):
            failure.trap(defer.TimeoutError)
            if (regex, d) in self._waiters:
                self._waiters.remove((regex, d))
            raise defer.TimeoutError(
                f"{self.name} did not print {pattern!r} in {timeout}s:\n{self.output()}"
            )

        return d.addTimeout(timeout, reactor).addErrback(timed_out)

    def write(self, data: bytes) -> None:
        """Send bytes to the child's stdin."""
        self.transport.write(data)

    def close_stdin(self) -> None:
        self.transport.closeStdin()

    def signal(self, name: str) -> None:
        """Send a signal (``"TERM"``, ``"KILL"``, ``"INT"``) unless already gone."""
        if not self.exited:
            with contextlib.suppress(error.ProcessExitedAlready):
                self.transport.signalProcess(name)

    @defer.inlineCallbacks
    def stop(self, timeout: float = 10.0):
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.exited:
            return self.exit_code
        self.signal("TERM")
        try:
            yield deadline(_chain(self.ended), timeout)
        except defer.TimeoutError:
            self.signal("KILL")
            yield _chain(self.ended)
        return self.exit_code

    @defer.inlineCallbacks
    def kill(self):
        """SIGKILL and wait for the exit (``kill -9``)."""
        self.signal("KILL")
        yield _chain(self.ended)
        return self.exit_code


def _chain(d: Deferred) -> Deferred:
    """A new Deferred firing with ``d``'s result without consuming it."""
    out: Deferred = Deferred()

    def relay(result):
        out.callback(result)
        return result

    d.addBoth(relay)
    return out


def is_client(args: Sequence[str]) -> bool:
    """Whether ``args`` runs our client (``p2p-client`` or ``python -m p2p.client``)."""
    if Path(args[0]).name == "p2p-client":
        return True
    modules = ("p2p.client", "p2p.client.main")
    return any(a == "-m" and b in modules for a, b in itertools.pairwise(args))


def fresh_home(testcase: TestCase) -> Path:
    """A new, empty ``$P2P_HOME`` for one client (its identities and known indexers)."""
    home = Path(testcase.mktemp()).resolve()
    home.mkdir(mode=0o700, parents=True)
    return home


def spawn(
    testcase: TestCase,
    args: Sequence[str],
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    name: str | None = None,
    usePTY: bool = False,
) -> ServiceProcess:
    """Start ``args`` as a child process, stopped (SIGKILL-safe) when the test ends.

    A client gets its own fresh ``P2P_HOME`` unless ``env`` names one, so no
    test ever reads or writes the real ``~/.config/p2p``; clients acting for
    the same user share theirs by passing it.
    """
    if is_client(args) and "P2P_HOME" not in (env or {}):
        env = {**(env or {}), "P2P_HOME": str(fresh_home(testcase))}
    proc = ServiceProcess(name or Path(args[0]).name)
    reactor.spawnProcess(
        proc,
        args[0],
        list(args),
        env=child_env(env),
        path=str(cwd) if cwd is not None else None,
        usePTY=usePTY,
    )
    testcase.addCleanup(proc.stop)
    return proc


def spawn_twistd(
    testcase: TestCase,
    plugin: str,
    *options: str,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
) -> ServiceProcess:
    """Run ``twistd -n <plugin> <options>`` in ``cwd`` (default: the test's temp dir)."""
    if cwd is None:
        cwd = Path(testcase.mktemp())
        cwd.mkdir(parents=True)
    args = [*TWISTD, "-n", "--pidfile=", plugin, *options]
    return spawn(testcase, args, cwd=cwd, env=env, name=plugin)


def run_command(
    args: Sequence[str], cwd: str | Path | None = None, env: dict[str, str] | None = None
) -> Deferred:
    """Run a command to completion; fires with ``(stdout, stderr, exit code)``.

    Our client must be given its ``P2P_HOME`` (e.g. :func:`fresh_home`): no test
    may touch the real ``~/.config/p2p``.
    """
    from twisted.internet.utils import getProcessOutputAndValue

    if is_client(args) and "P2P_HOME" not in (env or {}):
        raise ValueError("run_command: give the client a P2P_HOME (tests.support.fresh_home)")

    return getProcessOutputAndValue(
        args[0],
        list(args[1:]),
        env=child_env(env),
        path=str(cwd) if cwd is not None else None,
        reactor=reactor,
    )


def indexer_port(proc: ServiceProcess, timeout: float = DEADLINE) -> Deferred:
    """Fire with the port ``twistd p2p-indexer`` says it listens on (``s> init server H:P``)."""
    d = proc.wait_for_line(r"s> init server \S*:(\d+)$", timeout)
    return d.addCallback(lambda match: int(match.group(1)))


def logger_ports(proc: ServiceProcess, timeout: float = DEADLINE) -> Deferred:
    """Fire with ``{"tcp": port, "udp": port}`` (those it has) from ``s> logger program ...``."""
    d = proc.wait_for_line(r"s> logger program \S+ version \d+ (.*)$", timeout)

    def ports(match: re.Match[str]) -> dict[str, int]:
        return {kind: int(port) for kind, port in re.findall(r"(tcp|udp) \S*:(\d+)", match[1])}

    return d.addCallback(ports)


def time_url(proc: ServiceProcess, timeout: float = DEADLINE) -> Deferred:
    """Fire with the WSDL URL ``twistd p2p-time`` says it serves (``s> time service URL``)."""
    d = proc.wait_for_line(r"s> time service (http://\S+:\d+/\?wsdl)$", timeout)
    return d.addCallback(lambda match: match.group(1))


def url_port(url: str) -> int:
    """The port of an ``http://host:port/...`` URL."""
    return int(re.match(r"http://.*:(\d+)/", url).group(1))


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, in bytes (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def kill_on_cleanup(testcase: TestCase, proc: ServiceProcess) -> None:
    """Make sure a process is gone at the end of the test even if it ignores SIGTERM."""
    testcase.addCleanup(lambda: proc.kill() if not proc.exited else None)


__all__ = [
    "DEADLINE",
    "REPO",
    "TWISTD",
    "ServiceProcess",
    "child_env",
    "deadline",
    "exchange",
    "fresh_home",
    "hold_port",
    "indexer_port",
    "is_client",
    "kill_on_cleanup",
    "logger_ports",
    "poll_until",
    "rss_bytes",
    "run_command",
    "spawn",
    "spawn_twistd",
    "time_url",
    "url_port",
]
