"""The shell as a real process, driven through a pipe, against a real indexer.

Every command and every output line of protocol.md section 5, each failure code
included; the time service up and down; every way of ending disconnects first.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.client.commands import COMMANDS
from p2p.client.home import Home
from p2p.client.indexer_client import IndexerClient
from p2p.tls import Identity, write_private
from tests.support import (
    DEADLINE,
    deadline,
    fresh_home,
    hold_port,
    indexer_port,
    poll_until,
    spawn,
    spawn_twistd,
    time_url,
)
from tests.test_indexer_e2e import indexer_db


class ShellProcess:
    """One ``python -m p2p.client`` child whose stdin is a pipe.

    ``home`` is its ``P2P_HOME`` (default: a fresh one); two shells acting for
    the same user on one machine share theirs. ``extra`` are more options.
    """

    def __init__(
        self,
        testcase: TestCase,
        name: str,
        indexer_port: int,
        wsdl: str,
        cwd=None,
        share=None,
        home=None,
        extra=(),
    ):
        self.testcase = testcase
        self.cwd = Path(cwd or testcase.mktemp()).resolve()
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.share = Path(share).resolve() if share else self.cwd
        self.home = Path(home) if home is not None else fresh_home(testcase)
        argv = [
            sys.executable,
            "-m",
            "p2p.client",
            "-s",
            "127.0.0.1",
            "-p",
            str(indexer_port),
            "--wsdl",
            wsdl,
            "--share-dir",
            str(self.share),
            "--peer-listen",
            "tcp:0:interface=127.0.0.1",
            *extra,
        ]
        env = {"P2P_HOME": str(self.home)}
        self.proc = spawn(testcase, argv, cwd=self.cwd, env=env, name=name)

    @property
    def lines(self) -> list[str]:
        return self.proc.lines

    @defer.inlineCallbacks
    def run(self, command: str, count: int = 1, timeout: float = DEADLINE):
        """Send one command; fire with the ``count`` lines it prints."""
        before = len(self.proc.lines)
        self.proc.write(command.encode("utf-8") + b"\n")
        try:
            yield poll_until(
                lambda: len(self.proc.lines) >= before + count or self.proc.exited,
                timeout,
                what=f"{count} lines after {command!r}",
            )
        except defer.TimeoutError as exc:
            raise defer.TimeoutError(f"{exc}\n{self.proc.output()}") from None
        return self.proc.lines[before : before + count]

    @defer.inlineCallbacks
    def check(self, command: str, *expected: str):
        """Run ``command`` and assert the exact lines it prints."""
        got = yield self.run(command, len(expected))
        self.testcase.assertEqual(got, list(expected), f"{command}\n{self.proc.output()}")

    @defer.inlineCallbacks
    def quit(self):
        self.proc.write(b"QUIT\n")
        code = yield deadline(self.proc.ended)
        return code


class Stack:
    """A real indexer and, optionally, a real time service, for one test.

    The indexer keeps one TLS key across restarts (``tls_key``), as a real one
    does with its database, so the clients' pinned key stays right.
    """

    def __init__(self, testcase: TestCase) -> None:
        self.testcase = testcase
        self.port: int | None = None
        self.indexer = None
        self._wsdl: str | None = None
        self.time = None
        self.tls_key = new_key_file(testcase)
        self.fingerprint: str | None = None
        #: More ``twistd p2p-indexer`` options (a later ``--db`` replaces ``:memory:``).
        self.indexer_options: tuple[str, ...] = ()

    @property
    def wsdl(self) -> str:
        """The time service's WSDL URL; without one, an address that refuses connections."""
        if self._wsdl is None:
            self._wsdl = f"http://127.0.0.1:{hold_port(self.testcase)}/?wsdl"
        return self._wsdl

    @defer.inlineCallbacks
    def start_indexer(self, tls_key: Path | None = None):
        """Start an indexer: on ``tcp:0`` the first time, then on the port it printed;
        with the stack's TLS key unless given another."""
        listen = f"tcp:{self.port or 0}:interface=127.0.0.1"
        key = str(tls_key or self.tls_key)
        self.indexer = spawn_twistd(
            self.testcase,
            "p2p-indexer",
            "--listen",
            listen,
            "--db",
            indexer_db(self.testcase, ":memory:"),
            "--tls-key",
            key,
            "--tls-cert",
            key,
            *self.indexer_options,
        )
        match = yield self.indexer.wait_for_line(r"TLS key fingerprint ([0-9a-f]{64})")
        self.fingerprint = match.group(1)
        port = yield indexer_port(self.indexer)
        self.testcase.assertIn(self.port, (None, port))
        self.port = port

    @defer.inlineCallbacks
    def start_time(self):
        assert self._wsdl is None, "start the time service before asking for its URL"
        self.time = spawn_twistd(self.testcase, "p2p-time", "--listen", "tcp:0:interface=127.0.0.1")
        self._wsdl = yield time_url(self.time)

    def shell(self, name: str, cwd=None, share=None, home=None, extra=()) -> ShellProcess:
        return ShellProcess(self.testcase, name, self.port, self.wsdl, cwd, share, home, extra)

    @defer.inlineCallbacks
    def raw(self, op: str, user: str, *args, home: Path | None = None):
        """A request straight to the indexer: as a classic program would send it, or
        over TLS with the identities kept in ``home`` (a shell's P2P_HOME)."""
        client = IndexerClient(
            "127.0.0.1",
            self.port,
            lambda: defer.succeed(wire.format_datetime()),
            timeout=5,
            home=Home(home) if home is not None else None,
            use_tls=home is not None,
        )
        try:
            result = yield deadline(client.request(op, user, *args))
        finally:
            yield client.close()
        return result


def new_key_file(testcase: TestCase) -> Path:
    """A PEM file with a new TLS key and certificate (for ``--tls-key``/``--tls-cert``)."""
    path = Path(testcase.mktemp()).resolve()
    write_private(path, Identity.generate("p2p-indexer").to_pem())
    return path


class CommandLineTests(TestCase):
    """Every line of protocol.md section 5 from real processes."""

    @defer.inlineCallbacks
    def setUp(self):
        self.stack = Stack(self)
        yield defer.gatherResults([self.stack.start_indexer(), self.stack.start_time()])

    @defer.inlineCallbacks
    def test_every_command_and_line(self):
        a = self.stack.shell("alice")
        b = self.stack.shell("bob", home=a.home)  # a registers bob for b: one machine
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("REGISTER alice", "c> USERNAME IN USE")
        yield a.check("register bob", "c> REGISTER OK")
        yield a.check("REGISTER", "Syntax error. Usage: REGISTER <user>")
        yield a.check("PUBLISH f.txt x", "c> PUBLISH FAIL, USER NOT CONNECTED")
        yield a.check("DELETE f.txt", "c> DELETE FAIL, USER NOT CONNECTED")
        yield a.check("LIST_USERS", "c> LIST_USERS FAIL, USER NOT CONNECTED")
        yield a.check("LIST_CONTENT bob", "c> LIST_CONTENT FAIL, USER NOT CONNECTED")
        yield a.check("DISCONNECT alice", "c> DISCONNECT FAIL / USER NOT CONNECTED")
        yield a.check("GET_FILE bob x y", "c> GET_FILE FAIL")
        yield a.check("CONNECT nobody", "c> CONNECT FAIL, USER DOES NOT EXIST")
        yield a.check("UNREGISTER nobody", "c> USER DOES NOT EXIST")
        yield a.check("Connect alice", "c> CONNECT OK")
        yield a.check("CONNECT alice", "c> USER ALREADY CONNECTED")
        yield b.check("CONNECT alice", "c> USER ALREADY CONNECTED")  # the indexer's code 2
        yield a.check("UNREGISTER alice", "c> UNREGISTER FAIL")  # connected: refused
        yield a.check("PUBLISH f.txt first  file", "c> PUBLISH OK")
        yield a.check("PUBLISH f.txt again", "c> PUBLISH FAIL, CONTENT ALREADY PUBLISHED")
        yield a.check("DELETE g.txt", "c> DELETE FAIL, CONTENT NOT PUBLISHED")
        yield a.check("LIST_CONTENT nobody", "c> LIST_CONTENT FAIL, REMOTE USER DOES NOT EXIST")
        # No file f.txt to hash: published classically, its size unknown (``-``).
        yield a.check("list_content alice", "c> LIST_CONTENT OK", '\tf.txt - "first  file"')
        yield b.check("CONNECT bob", "c> CONNECT OK")
        yield b.check("LIST_CONTENT bob", "c> LIST_CONTENT OK")
        listing = yield a.run("LIST_USERS", 3)
        self.assertEqual(listing[0], "c> LIST_USERS OK")
        self.assertEqual(
            sorted(line.split(" ")[:2] for line in listing[1:]),
            [["\talice", "127.0.0.1"], ["\tbob", "127.0.0.1"]],
        )
        for line in listing[1:]:
            self.assertTrue(0 < int(line.split(" ")[2]) < 65536)

        # Another client with alice's key disconnects her behind the shell's back: the
        # indexer closes the connection holding her lease (protocol.md 7.3), so the shell
        # learns it at once, says so on stderr and connects her again by itself (the
        # indexer's code 2 as each command prints it: tests/test_client_shell.py).
        code, _ = yield self.stack.raw("DISCONNECT", "alice", home=a.home)
        self.assertEqual(code, wire.OK)
        yield a.proc.wait_for_line(r"alice is connected again, serving on port \d+$")
        yield a.check("DELETE f.txt", "c> DELETE OK")
        yield a.check("DISCONNECT alice", "c> DISCONNECT OK")
        yield a.check("UNREGISTER alice", "c> UNREGISTER OK")
        yield a.check(
            "FROBNICATE", "Unknown command: FROBNICATE (type HELP for the list of commands)"
        )
        code = yield a.quit()
        self.assertEqual(code, 0)
        self.assertEqual(len(a.lines), 28, a.proc.output())  # nothing else on stdout
        yield b.check("DISCONNECT bob", "c> DISCONNECT OK")

    @defer.inlineCallbacks
    def test_user_gone_and_indexer_down(self):
        a = self.stack.shell("alice")
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        # A new indexer (nothing kept) on the same port: alice no longer exists there.
        yield self.stack.indexer.stop()
        yield self.stack.start_indexer()
        yield a.check("PUBLISH f x", "c> PUBLISH FAIL, USER DOES NOT EXIST")
        yield a.check("DELETE f", "c> DELETE FAIL, USER DOES NOT EXIST")
        yield a.check("LIST_USERS", "c> LIST_USERS FAIL, USER DOES NOT EXIST")
        yield a.check("LIST_CONTENT alice", "c> LIST_CONTENT FAIL, USER DOES NOT EXIST")
        yield a.check("DISCONNECT alice", "c> DISCONNECT FAIL / USER DOES NOT EXIST")
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        # No indexer at all: every command's plain FAIL line.
        yield self.stack.indexer.stop()
        yield a.check("PUBLISH f x", "c> PUBLISH FAIL")
        yield a.check("DELETE f", "c> DELETE FAIL")
        yield a.check("LIST_USERS", "c> LIST_USERS FAIL")
        yield a.check("LIST_CONTENT alice", "c> LIST_CONTENT FAIL")
        yield a.check("GET_FILE alice f g", "c> GET_FILE FAIL")
        yield a.check("DISCONNECT alice", "c> DISCONNECT FAIL")
        yield a.check("REGISTER carol", "c> REGISTER FAIL")
        yield a.check("UNREGISTER carol", "c> UNREGISTER FAIL")
        b = self.stack.shell("bob")
        yield b.check("CONNECT bob", "c> CONNECT FAIL")
        code = yield a.quit()
        self.assertEqual(code, 0)
        self.assertTrue(any("could not disconnect alice" in line for line in a.proc.errlines))
        self.assertFalse(any("Traceback" in line for line in a.proc.errlines), a.proc.output())

    @defer.inlineCallbacks
    def test_arguments_the_protocol_cannot_carry(self):
        a = self.stack.shell("alice")
        long_name = "n" * (wire.MAX_NAME + 1)
        yield a.check(f"REGISTER {long_name}", "c> REGISTER FAIL")
        yield a.check("REGISTER " + "é" * 128, "c> REGISTER OK")  # 256 bytes: the limit
        yield a.check("CONNECT " + "é" * 128, "c> CONNECT OK")
        yield a.check(f"PUBLISH f {'d' * (wire.MAX_DESCRIPTION + 1)}", "c> PUBLISH FAIL")
        yield a.check(f"LIST_CONTENT {long_name}", "c> LIST_CONTENT FAIL")
        self.assertEqual(sum("cannot be sent" in line for line in a.proc.errlines), 3)

    @defer.inlineCallbacks
    def test_end_of_input_disconnects(self):
        a = self.stack.shell("alice")
        b = self.stack.shell("bob", home=a.home)  # a registers bob for b: one machine
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("REGISTER bob", "c> REGISTER OK")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        yield b.check("CONNECT bob", "c> CONNECT OK")
        a.proc.close_stdin()
        code = yield deadline(a.proc.ended)
        self.assertEqual(code, 0)
        yield b.check("LIST_USERS", "c> LIST_USERS OK", f"\tbob 127.0.0.1 {b_port(b)}")

    @defer.inlineCallbacks
    def test_signals_disconnect(self):
        b = self.stack.shell("bob")
        yield b.check("REGISTER bob", "c> REGISTER OK")
        yield b.check("CONNECT bob", "c> CONNECT OK")
        for signal_name, user in (("TERM", "alice"), ("INT", "carol"), ("HUP", "dave")):
            shell = self.stack.shell(user)
            yield shell.check(f"REGISTER {user}", "c> REGISTER OK")
            yield shell.check(f"CONNECT {user}", "c> CONNECT OK")
            listing = yield b.run("LIST_USERS", 3)
            self.assertIn(user, "".join(listing))
            shell.proc.signal(signal_name)
            yield deadline(shell.proc.ended)
            self.assertTrue(any(f"disconnected {user}" in x for x in shell.proc.errlines))
            yield b.check("LIST_USERS", "c> LIST_USERS OK", f"\tbob 127.0.0.1 {b_port(b)}")

    @defer.inlineCallbacks
    def test_help_and_comments(self):
        a = self.stack.shell("alice")
        lines = yield a.run("HELP", len(COMMANDS))
        self.assertEqual([line.split()[0] for line in lines], list(COMMANDS))
        yield a.run("# a comment line, ignored", 0)
        yield a.check("register alice", "c> REGISTER OK")
        self.assertEqual(len(a.lines), len(COMMANDS) + 1)


def b_port(shell: ShellProcess) -> int:
    """The peer port a shell announced (from its stderr note)."""
    for line in shell.proc.errlines:
        if line.startswith("serving ") and " on port " in line:
            return int(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no peer port in\n{shell.proc.output()}")


class TerminalTests(TestCase):
    """In a terminal (a pty here) the line can be edited and history recalled."""

    @defer.inlineCallbacks
    def start(self):
        """An indexer and a shell in a pty; fires with (stack, process, type_keys)."""
        stack = Stack(self)
        yield stack.start_indexer()
        cwd = Path(self.mktemp())
        cwd.mkdir()
        argv = [sys.executable, "-m", "p2p.client", "-s", "127.0.0.1", "-p", str(stack.port)]
        argv += ["--wsdl", stack.wsdl, "--peer-listen", "tcp:0:interface=127.0.0.1"]
        self.home = fresh_home(self)
        env = {"P2P_HOME": str(self.home)}
        proc = spawn(self, argv, cwd=cwd, env=env, name="tty-shell", usePTY=True)

        def count(text: str) -> int:
            return sum(line.endswith(text) for line in proc.lines)

        @defer.inlineCallbacks
        def type_keys(keys: bytes, result: str, times: int = 1):
            proc.write(keys)
            yield poll_until(lambda: count(result) >= times, what=result)

        return stack, proc, type_keys

    @defer.inlineCallbacks
    def check_ended_disconnected(self, stack: Stack, proc) -> None:
        code = yield deadline(proc.ended)
        self.assertEqual(code, 0, proc.output())
        self.assertTrue(any("disconnected alice" in line for line in proc.lines), proc.output())
        self.assertFalse(any("Traceback" in line for line in proc.lines), proc.output())
        code, _ = yield stack.raw("DISCONNECT", "alice", home=self.home)
        self.assertEqual(code, wire.DISCONNECT.not_connected)

    @defer.inlineCallbacks
    def test_editing_history_and_ctrl_c(self):
        stack, proc, type_keys = yield self.start()
        yield type_keys(b"REGISTER alice\r", "c> REGISTER OK")
        yield type_keys(b"\x1b[A\r", "c> USERNAME IN USE")  # up arrow: the same line again
        # "REGISTR bob", five keys left, insert the missing E.
        yield type_keys(b"REGISTR bob" + b"\x1b[D" * 5 + b"E\r", "c> REGISTER OK", 2)
        yield type_keys(b"CONNECT alice\r", "c> CONNECT OK")
        # Ctrl-C drops the line being typed and leaves nothing; Ctrl-D then leaves.
        yield type_keys(b"REGISTER carol\x03LIST_USERS\r", "c> LIST_USERS OK")
        self.assertFalse(proc.exited)
        code, _ = yield stack.raw("REGISTER", "carol")
        self.assertEqual(code, wire.OK)  # the Ctrl-C'd REGISTER carol was never sent
        proc.write(b"\x04")
        yield self.check_ended_disconnected(stack, proc)

    @defer.inlineCallbacks
    def test_ctrl_d_on_an_empty_line(self):
        stack, proc, type_keys = yield self.start()
        yield type_keys(b"REGISTER alice\r", "c> REGISTER OK")
        yield type_keys(b"CONNECT alice\r", "c> CONNECT OK")
        # Ctrl-D after some text does nothing; Ctrl-U empties the line; Ctrl-D then leaves.
        yield type_keys(b"LIST_USERS\x04\r", "c> LIST_USERS OK")
        proc.write(b"junk\x15\x04")
        yield self.check_ended_disconnected(stack, proc)

    @defer.inlineCallbacks
    def test_sigterm(self):
        stack, proc, type_keys = yield self.start()
        yield type_keys(b"REGISTER alice\r", "c> REGISTER OK")
        yield type_keys(b"CONNECT alice\r", "c> CONNECT OK")
        proc.signal("TERM")
        yield self.check_ended_disconnected(stack, proc)


class TimeServiceDownTests(TestCase):
    @defer.inlineCallbacks
    def test_commands_work_and_stderr_says_so_once(self):
        stack = Stack(self)  # the time service is never started
        yield stack.start_indexer()
        a = stack.shell("alice")
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        yield a.check("PUBLISH f.txt text", "c> PUBLISH OK")
        yield a.check("LIST_CONTENT alice", "c> LIST_CONTENT OK", '\tf.txt - "text"')
        yield a.check("DISCONNECT alice", "c> DISCONNECT OK")
        warnings = [line for line in a.proc.errlines if "time service" in line]
        self.assertEqual(len(warnings), 1, a.proc.output())
        self.assertIn(stack.wsdl, warnings[0])
