"""The shell's behaviour: its state (one connected user, that user's published
files, the peer server) and what every command does and prints.

Input front ends (``frontends.py``) hand lines to :meth:`Shell.submit`; commands
run one at a time, in order, each to completion (a download blocks the next
command, not the reactor, so the peer server keeps serving meanwhile). Result
lines are exactly protocol.md section 5; explanations go to ``Output.note``
(stderr).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2p import wire
from p2p.client import commands
from p2p.client.commands import ParseError


class Output(Protocol):
    """Where the shell writes: result lines, notes for humans, a progress stream."""

    def line(self, text: str) -> None: ...

    def note(self, text: str) -> None: ...

    def progress_stream(self) -> Any | None: ...


class Indexer(Protocol):
    def request(self, op: str, user: str, *args: str | int) -> Deferred: ...


def _outcomes(op: str, fail: str, **by_role: str) -> tuple[dict[int, str], str]:
    """Map an operation's reply codes to its lines, by the role of each code in OPS."""
    spec = wire.OPS[op]
    table = {wire.OK: f"c> {op} OK"}
    for role, text in by_role.items():
        code = getattr(spec, role)
        assert code is not None, (op, role)
        table[code] = f"c> {text}"
    return table, f"c> {fail}"


#: For every indexer operation: code -> line, and the plain FAIL line.
OUTCOMES: dict[str, tuple[dict[int, str], str]] = {
    "REGISTER": _outcomes("REGISTER", "REGISTER FAIL", own="USERNAME IN USE"),
    "UNREGISTER": _outcomes("UNREGISTER", "UNREGISTER FAIL", no_user="USER DOES NOT EXIST"),
    "CONNECT": _outcomes(
        "CONNECT",
        "CONNECT FAIL",
        no_user="CONNECT FAIL, USER DOES NOT EXIST",
        own="USER ALREADY CONNECTED",
    ),
    "PUBLISH": _outcomes(
        "PUBLISH",
        "PUBLISH FAIL",
        no_user="PUBLISH FAIL, USER DOES NOT EXIST",
        not_connected="PUBLISH FAIL, USER NOT CONNECTED",
        own="PUBLISH FAIL, CONTENT ALREADY PUBLISHED",
    ),
    "DELETE": _outcomes(
        "DELETE",
        "DELETE FAIL",
        no_user="DELETE FAIL, USER DOES NOT EXIST",
        not_connected="DELETE FAIL, USER NOT CONNECTED",
        own="DELETE FAIL, CONTENT NOT PUBLISHED",
    ),
    "LIST_USERS": _outcomes(
        "LIST_USERS",
        "LIST_USERS FAIL",
        no_user="LIST_USERS FAIL, USER DOES NOT EXIST",
        not_connected="LIST_USERS FAIL, USER NOT CONNECTED",
    ),
    "LIST_CONTENT": _outcomes(
        "LIST_CONTENT",
        "LIST_CONTENT FAIL",
        no_user="LIST_CONTENT FAIL, USER DOES NOT EXIST",
        not_connected="LIST_CONTENT FAIL, USER NOT CONNECTED",
        own="LIST_CONTENT FAIL, REMOTE USER DOES NOT EXIST",
    ),
    "DISCONNECT": _outcomes(
        "DISCONNECT",
        "DISCONNECT FAIL",
        no_user="DISCONNECT FAIL / USER DOES NOT EXIST",
        not_connected="DISCONNECT FAIL / USER NOT CONNECTED",
    ),
}

#: Extra words for a human when an operation gets its "any other error" code.
HINTS = {
    "UNREGISTER": "; a connected user cannot be unregistered, DISCONNECT it first",
    "CONNECT": "; the port sent may be unacceptable",
}

GET_FILE_OK = "c> GET_FILE OK"
GET_FILE_NO_FILE = "c> GET_FILE FAIL / FILE NOT EXIST"
GET_FILE_FAIL = "c> GET_FILE FAIL"


def not_connected_line(op: str) -> str:
    """The line of a command that needs a connected user when there is none."""
    table, _fail = OUTCOMES[op]
    return table[wire.OPS[op].not_connected]


class _Quit(Exception):
    """Raised inside the command loop to end the shell."""


class Shell:
    """One user's session: commands in, lines out.

    ``server_factory(share_dir, is_published, reactor=...)`` builds the peer file
    server; ``download(host, port, name, destination, progress=..., reactor=...,
    timeout=...)`` fetches a file; ``no_such_file`` is the exception ``download``
    raises when the peer answers that the file does not exist. They default to
    ``p2p.peer``'s.
    """

    log = Logger()

    def __init__(
        self,
        indexer: Indexer,
        output: Output,
        share_dir: Path,
        peer_listen: str = "tcp:0",
        reactor=None,
        server_factory: Callable[..., Any] | None = None,
        download: Callable[..., Deferred] | None = None,
        no_such_file: type[BaseException] | None = None,
        download_timeout: float = 30.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        if server_factory is None:
            from p2p.peer.server import PeerServer as server_factory
        if download is None or no_such_file is None:
            from p2p.peer.download import NoSuchFile, download

            no_such_file = NoSuchFile
        self.indexer = indexer
        self.output = output
        self.share_dir = Path(share_dir)
        self.peer_listen = peer_listen
        self.reactor = reactor
        self.server_factory = server_factory
        self.download = download
        self.no_such_file = no_such_file
        self.download_timeout = download_timeout

        #: The user this shell is connected as, or None.
        self.user: str | None = None
        #: Files the connected user has published (what the peer server may serve).
        self.published: set[str] = set()
        self.server: Any = None

        self._pending: collections.deque[str] = collections.deque()
        self._running = False
        self._pumping = False
        self._finished = False
        self._shutdown: Deferred | None = None
        self._current_download: Deferred | None = None
        #: Fires (with None) when the shell has ended: QUIT, end of input.
        self.ended: Deferred = Deferred()
        #: Called whenever the shell is idle and waiting for a line (redraw the prompt).
        self.on_idle: Callable[[], None] = lambda: None

    # --- input ------------------------------------------------------------

    def submit(self, line: str) -> None:
        """Queue one input line; it runs after the lines before it."""
        if self._finished:
            return
        self._pending.append(line)
        self._pump()

    def end_of_input(self) -> None:
        """No more lines will come (EOF): run what is queued, then quit."""
        self.submit("QUIT")

    @property
    def busy(self) -> bool:
        return self._running or bool(self._pending)

    def _pump(self) -> None:
        if self._pumping:
            return  # a command finished synchronously inside the loop below
        self._pumping = True
        try:
            while not self._running and self._pending and not self._finished:
                line = self._pending.popleft()
                self._running = True
                d = defer.maybeDeferred(self.execute, line)
                d.addErrback(self._unexpected)
                d.addBoth(self._command_done)
        finally:
            self._pumping = False
        if not self.busy and not self._finished:
            self.on_idle()

    def _command_done(self, result: Any) -> None:
        self._running = False
        if isinstance(result, Failure) and result.check(_Quit):
            self._finish()
            return
        self._pump()

    def _unexpected(self, failure: Failure) -> Failure | None:
        if failure.check(_Quit):
            return failure
        self.log.failure("command failed unexpectedly", failure)
        self.output.note(f"internal error: {failure.getErrorMessage()}")
        return None

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._pending.clear()
            self.ended.callback(None)

    # --- dispatch ---------------------------------------------------------

    def execute(self, line: str) -> Deferred | None:
        """Run one line. Fires when its output is printed; ``_Quit`` ends the shell."""
        try:
            parsed = commands.parse(line)
        except ParseError as exc:
            self.output.line(str(exc))
            return None
        if parsed is None:
            return None
        handler = getattr(self, "do_" + parsed.name.lower())
        return handler(*parsed.args)

    def do_help(self) -> None:
        for text in commands.help_text():
            self.output.line(text)

    @defer.inlineCallbacks
    def do_quit(self):
        yield self.shutdown()
        raise _Quit()

    # --- indexer commands -------------------------------------------------

    @defer.inlineCallbacks
    def _ask(self, op: str, user: str, *args: str | int):
        """Ask the indexer; print the outcome line; fire with ``(code, rows)``.

        ``code`` is None when the indexer could not be asked or answered badly.
        """
        table, fail = OUTCOMES[op]
        try:
            code, rows = yield self.indexer.request(op, user, *args)
        except Exception as exc:
            self.output.line(fail)
            self.output.note(f"{op}: the indexer could not be asked: {_reason(exc)}")
            return None, None
        line = table.get(code, fail)
        self.output.line(line)
        if code not in table:
            hint = HINTS.get(op, "")
            self.output.note(f"{op}: the indexer refused the request (code {code}){hint}")
        return code, rows

    def _bad_names(self, op: str, *names: str) -> bool:
        """Print the plain FAIL line if a name cannot travel; True if so."""
        for value in names:
            problem = commands.field_problem(value)
            if problem:
                self.output.line(OUTCOMES[op][1])
                self.output.note(f"{op}: {problem}")
                return True
        return False

    @defer.inlineCallbacks
    def do_register(self, user: str):
        if not self._bad_names("REGISTER", user):
            yield self._ask("REGISTER", user)

    @defer.inlineCallbacks
    def do_unregister(self, user: str):
        if not self._bad_names("UNREGISTER", user):
            yield self._ask("UNREGISTER", user)

    @defer.inlineCallbacks
    def do_connect(self, user: str):
        table, fail = OUTCOMES["CONNECT"]
        if self._bad_names("CONNECT", user):
            return
        if self.user is not None:
            if user == self.user:
                self.output.line(table[wire.CONNECT.own])
            else:
                self.output.line(fail)
            self.output.note(f"CONNECT: this shell is already connected as {self.user}")
            return
        server = self.server_factory(self.share_dir, self.is_published, reactor=self.reactor)
        try:
            port = yield server.listen(self.peer_listen)
        except Exception as exc:
            self.output.line(fail)
            self.output.note(f"CONNECT: cannot listen on {self.peer_listen}: {_reason(exc)}")
            return
        self.published = set()
        code, _rows = yield self._ask("CONNECT", user, port)
        if code != wire.OK:
            yield _quietly(server.stop())
            return
        self.user = user
        self.server = server
        self.output.note(f"serving {self.share_dir} to peers on port {port}")
        yield self._learn_published()

    @defer.inlineCallbacks
    def _learn_published(self):
        """Ask which files this user published in earlier sessions, to serve them too."""
        user = self.user
        try:
            code, rows = yield self.indexer.request("LIST_CONTENT", user, user)
        except Exception as exc:
            self.output.note(f"could not list the files {user} published before: {_reason(exc)}")
            return
        if code != wire.OK or rows is None:
            self.output.note(f"could not list the files {user} published before (code {code})")
            return
        if self.user == user:
            self.published.update(row[0] for row in rows)

    def is_published(self, name: str) -> bool:
        """Whether the peer server may serve ``name`` (the connected user published it)."""
        return self.user is not None and name in self.published

    @defer.inlineCallbacks
    def do_disconnect(self, user: str):
        if self._bad_names("DISCONNECT", user):
            return
        if self.user is None:
            self.output.line(not_connected_line("DISCONNECT"))
            self.output.note("DISCONNECT: no user is connected in this shell")
            return
        if user != self.user:
            self.output.note(f"DISCONNECT: note that this shell is connected as {self.user}")
        code, _rows = yield self._ask("DISCONNECT", user)
        spec = wire.DISCONNECT
        if user == self.user and code in (wire.OK, spec.no_user, spec.not_connected):
            # The indexer no longer lists us: stop serving.
            yield self._go_offline()

    @defer.inlineCallbacks
    def _go_offline(self):
        server, self.server = self.server, None
        self.user = None
        self.published = set()
        if server is not None:
            yield _quietly(server.stop())

    def _need_user(self, op: str) -> str | None:
        if self.user is None:
            self.output.line(not_connected_line(op))
            self.output.note(f"{op}: no user is connected in this shell (CONNECT first)")
        return self.user

    @defer.inlineCallbacks
    def do_publish(self, name: str, description: str):
        user = self._need_user("PUBLISH")
        if user is None or self._bad_names("PUBLISH", name):
            return
        problem = commands.field_problem(description, wire.FieldKind.TEXT)
        if problem:
            self.output.line(OUTCOMES["PUBLISH"][1])
            self.output.note(f"PUBLISH: {problem}")
            return
        self._warn_if_not_shared(name)
        code, _rows = yield self._ask("PUBLISH", user, name, description)
        if code in (wire.OK, wire.PUBLISH.own) and self.user == user:
            self.published.add(name)

    def _warn_if_not_shared(self, name: str) -> None:
        root = self.share_dir.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root) or path == root:
            self.output.note(
                f"PUBLISH: warning: {name} is not inside the share directory {root}; "
                "peers asking for it will be refused"
            )
        elif not path.is_file():
            self.output.note(
                f"PUBLISH: warning: there is no file {name} in the share directory {root} (yet)"
            )

    @defer.inlineCallbacks
    def do_delete(self, name: str):
        user = self._need_user("DELETE")
        if user is None or self._bad_names("DELETE", name):
            return
        code, _rows = yield self._ask("DELETE", user, name)
        if code in (wire.OK, wire.DELETE.own) and self.user == user:
            self.published.discard(name)

    @defer.inlineCallbacks
    def do_list_users(self):
        user = self._need_user("LIST_USERS")
        if user is None:
            return
        code, rows = yield self._ask("LIST_USERS", user)
        if code == wire.OK:
            for name, ip, port in rows:
                self.output.line(f"\t{shown(name)} {shown(ip)} {shown(port)}")

    @defer.inlineCallbacks
    def do_list_content(self, owner: str):
        user = self._need_user("LIST_CONTENT")
        if user is None or self._bad_names("LIST_CONTENT", owner):
            return
        code, rows = yield self._ask("LIST_CONTENT", user, owner)
        if code == wire.OK:
            for name, description in rows:
                self.output.line(f'\t{shown(name)} "{shown(description, keep_tab=True)}"')

    # --- downloads ----------------------------------------------------------

    @defer.inlineCallbacks
    def do_get_file(self, owner: str, remote: str, local: str):
        user = self.user
        if user is None:
            self.output.line(GET_FILE_FAIL)
            self.output.note("GET_FILE: no user is connected in this shell (CONNECT first)")
            return
        for value in (owner, remote):
            problem = commands.field_problem(value)
            if problem:
                self.output.line(GET_FILE_FAIL)
                self.output.note(f"GET_FILE: {problem}")
                return
        try:
            destination = local_destination(remote, local)
        except ValueError as exc:
            self.output.line(GET_FILE_FAIL)
            self.output.note(f"GET_FILE: {exc}")
            return
        address = yield self._find_peer(user, owner)
        if address is None:
            self.output.line(GET_FILE_FAIL)
            return
        host, port = address
        bar = _LazyProgress(self.output.progress_stream(), f"{remote} from {owner}")
        d = self.download(
            host,
            port,
            remote,
            destination,
            progress=bar.update,
            reactor=self.reactor,
            timeout=self.download_timeout,
        )
        self._current_download = d
        try:
            yield d
        except self.no_such_file:
            bar.finish()
            self.output.line(GET_FILE_NO_FILE)
            self.output.note(f"GET_FILE: {owner} has no file {remote} to share")
            return
        except Exception as exc:
            bar.finish()
            self.output.line(GET_FILE_FAIL)
            self.output.note(f"GET_FILE: download from {host}:{port} failed: {_reason(exc)}")
            return
        finally:
            self._current_download = None
        bar.finish()
        self.output.line(GET_FILE_OK)

    @defer.inlineCallbacks
    def _find_peer(self, user: str, owner: str):
        """The (host, port) where ``owner`` serves files, from LIST_USERS; None if unknown."""
        try:
            code, rows = yield self.indexer.request("LIST_USERS", user)
        except Exception as exc:
            self.output.note(f"GET_FILE: the indexer could not be asked: {_reason(exc)}")
            return None
        if code != wire.OK or rows is None:
            self.output.note(f"GET_FILE: LIST_USERS was refused (code {code})")
            return None
        for name, ip, port in rows:
            if name == owner:
                if not port.isdigit() or not 0 < int(port) < 65536:
                    self.output.note(f"GET_FILE: the indexer lists a bad port for {owner}")
                    return None
                return ip, int(port)
        self.output.note(f"GET_FILE: {owner} is not connected")
        return None

    # --- ending -------------------------------------------------------------

    def shutdown(self) -> Deferred:
        """Disconnect the connected user and stop the peer server (once; idempotent).

        Used by QUIT, end of input, Ctrl-C/Ctrl-D and SIGTERM alike.
        """
        if self._shutdown is None:
            self._shutdown = self._do_shutdown()
        return _chain(self._shutdown)

    @defer.inlineCallbacks
    def _do_shutdown(self):
        if self._current_download is not None:
            self._current_download.cancel()
        user = self.user
        if user is not None:
            try:
                code, _rows = yield self.indexer.request("DISCONNECT", user)
            except Exception as exc:
                self.output.note(f"could not disconnect {user}: {_reason(exc)}")
            else:
                if code == wire.OK:
                    self.output.note(f"disconnected {user}")
                else:
                    self.output.note(f"could not disconnect {user} (code {code})")
        yield self._go_offline()


def shown(text: str, keep_tab: bool = False) -> str:
    """``text`` from the indexer, safe to print: control characters escaped.

    Our indexer refuses them, another may not; a newline would split a listing
    row and an escape sequence would reach the user's terminal. Descriptions
    keep their tabs, which the protocol allows.
    """

    def bad(ch: str) -> bool:  # wire's rule for descriptions: no control character but tab
        return not wire.check_text(ch) or (ch == "\t" and not keep_tab)

    if not any(map(bad, text)):
        return text
    return "".join(ch.encode("unicode_escape").decode() if bad(ch) else ch for ch in text)


def local_destination(remote: str, local: str) -> Path:
    """Where GET_FILE writes: ``local``, or inside it under the remote name if it is
    a directory (as ``cp`` does). ``~`` is expanded. Raises ValueError with the
    reason when the file cannot go there, before anyone is asked anything."""
    path = Path(local).expanduser()
    if path.is_dir():
        name = PurePosixPath(remote).name
        if name in ("", ".", ".."):
            raise ValueError(f"{local} is a directory; give a file name for {remote!r}")
        path = path / name
        if path.is_dir():
            raise ValueError(f"{path} is a directory")
    parent = path.parent
    if not parent.is_dir():
        why = f"{parent} is not a directory" if parent.exists() else f"no such directory {parent}"
        raise ValueError(f"cannot save {local}: {why}")
    return path


class _LazyProgress:
    """A progress bar created at the first update, when the total is known."""

    def __init__(self, stream: Any | None, label: str) -> None:
        self.stream = stream
        self.label = label
        self.bar = None

    def update(self, received: int, total: int | None = None) -> None:
        if self.stream is None:
            return
        if self.bar is None:
            from p2p.client.progress import ProgressBar

            columns = getattr(self.stream, "columns", None)
            self.bar = ProgressBar(self.stream, total, self.label, columns=columns)
        self.bar.update(received, total)

    def finish(self) -> None:
        if self.bar is not None:
            bar, self.bar = self.bar, None
            bar.finish()


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _quietly(d: Deferred) -> Deferred:
    """``d`` with any failure logged and dropped (stopping a server must not break QUIT)."""
    return defer.maybeDeferred(lambda: d).addErrback(
        lambda f: Shell.log.failure("stopping the peer server failed", f)
    )


def _chain(d: Deferred) -> Deferred:
    """A new Deferred with ``d``'s result, leaving ``d``'s own result intact."""
    out: Deferred = Deferred()

    def relay(result: Any) -> Any:
        out.callback(None if isinstance(result, Failure) else result)
        return result

    d.addBoth(relay)
    return out


__all__ = ["OUTCOMES", "Output", "Shell"]
