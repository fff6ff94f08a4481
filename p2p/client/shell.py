"""The shell: input lines in, protocol.md section 5 lines out.

Input front ends (``frontends.py``) hand lines to :meth:`Shell.submit`. The
shell puts together what the other modules do, one job each:

- :mod:`~p2p.client.commands` parses a line into a command (quotes keep
  spaces: :mod:`~p2p.client.words`);
- :mod:`~p2p.client.command_queue` runs the lines one at a time, in order, each
  to completion;
- :mod:`~p2p.client.indexer_commands` and :mod:`~p2p.client.get_file` are the
  commands, over the :mod:`~p2p.client.session` (connected user, published
  files, peer server);
- :mod:`~p2p.client.transfers` runs each GET_FILE as a numbered transfer
  (DOWNLOADS, CANCEL): with :attr:`Shell.background` (a terminal) the command
  returns at once and the download runs beside the next commands; otherwise
  (a script) the next line waits for it, so results come in order;
- :mod:`~p2p.client.results` holds the exact result lines. Explanations go to
  ``Output.note`` (stderr).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from p2p.client import commands, results
from p2p.client.command_queue import CommandQueue, Quit
from p2p.client.home import Home
from p2p.client.indexer_commands import IndexerCommands
from p2p.client.lease import Lease
from p2p.client.session import Indexer, Output, Session
from p2p.client.transfers import Transfers


class Shell:
    """One user's session: commands in, lines out.

    ``home`` is the client's local state (identities, known indexers, what was
    published from here; default ``$P2P_HOME``).
    ``server_factory(share_dir, is_published, reactor=..., identity=...)`` builds the
    peer file server; ``download(host, port, name, destination, progress=..., reactor=...,
    timeout=...)`` fetches a file; ``no_such_file`` is the exception ``download``
    raises when the peer answers that the file does not exist. They default to
    ``p2p.peer``'s.
    """

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
        home: Home | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        if server_factory is None:
            from p2p.peer.server import PeerServer as server_factory
        if download is None or no_such_file is None:
            from p2p.peer.download import NoSuchFile, download

            no_such_file = NoSuchFile
        self.output = output
        self.session = Session(
            indexer, output, share_dir, peer_listen, reactor, server_factory, home
        )
        self.session.lease = Lease(self.session)
        self.transfers = Transfers(
            self.session, download, no_such_file, download_timeout, clock=reactor.seconds
        )
        #: GET_FILE returns at once and its download runs beside the next commands
        #: (a terminal); else each download ends before the next line runs (scripts).
        self.background = False
        #: Asks the user a question and fires with the answer (a terminal); None: there
        #: is no one to ask (a script), and what would need a yes is refused.
        self.confirm: Callable[[str], Deferred] | None = None
        self._commands: dict[str, Callable[..., Any]] = {
            **IndexerCommands(self.session).table(),
            "GET_FILE": self._get_file,
            "DOWNLOADS": self.transfers.downloads_command,
            "CANCEL": self.transfers.cancel_command,
            "HELP": self._help,
            "QUIT": self._quit,
        }
        self._queue = CommandQueue(self.execute, output.note)
        self._shutdown: Deferred | None = None
        #: Fires (with None) when the shell has ended: QUIT, end of input.
        self.ended: Deferred = self._queue.ended

    # --- state the front ends and tests look at --------------------------------

    @property
    def user(self) -> str | None:
        """The user this shell is connected as, or None."""
        return self.session.user

    @property
    def server_factory(self) -> Callable[..., Any]:
        """What CONNECT builds the peer server with."""
        return self.session.server_factory

    @server_factory.setter
    def server_factory(self, factory: Callable[..., Any]) -> None:
        self.session.server_factory = factory

    @property
    def on_idle(self) -> Callable[[], None]:
        """Called whenever the shell is idle and waiting for a line (redraw the prompt)."""
        return self._queue.on_idle

    @on_idle.setter
    def on_idle(self, callback: Callable[[], None]) -> None:
        self._queue.on_idle = callback

    @property
    def busy(self) -> bool:
        """A command is running or waiting to run."""
        return self._queue.busy

    # --- input ------------------------------------------------------------

    def submit(self, line: str) -> None:
        """Queue one input line; it runs after the lines before it."""
        self._queue.submit(line)

    def end_of_input(self) -> None:
        """No more lines will come (EOF): run what is queued, then quit."""
        self.submit("QUIT")

    def execute(self, line: str) -> Deferred | None:
        """Run one line. Fires when its output is printed; ``Quit`` ends the shell."""
        try:
            parsed = commands.parse(line)
        except commands.ParseError as exc:
            self.output.line(str(exc))
            return None
        if parsed is None:
            return None
        return self._commands[parsed.name](*parsed.args)

    def _get_file(self, owner: str, remote: str, local: str, force: str = "") -> Deferred | None:
        """GET_FILE: an existing local file is replaced only with ``--force`` or, in a
        terminal, when the user says yes (:attr:`confirm`); then the transfer starts
        (in the background in a terminal)."""
        existing = None if force else self.transfers.existing_destination(remote, local)
        if existing is None:
            return self._start(owner, remote, local)
        if self.confirm is None:
            self.output.line(results.GET_FILE_FAIL)
            self.output.note(f"GET_FILE: {existing} exists; add --force to replace it")
            return None
        asked = self.confirm(f"{existing} exists. Replace it? [y/N] ")

        def answered(answer: str) -> Deferred | None:
            if answer.strip().lower() in ("y", "yes"):
                return self._start(owner, remote, local)
            self.output.line(results.GET_FILE_FAIL)
            self.output.note(f"GET_FILE: {existing} kept as it was")
            return None

        return asked.addCallback(answered)

    def _start(self, owner: str, remote: str, local: str) -> Deferred | None:
        transfer = self.transfers.start(owner, remote, local)
        return None if self.background else transfer.done

    def _help(self) -> None:
        for text in commands.help_text():
            self.output.line(text)

    @defer.inlineCallbacks
    def _quit(self):
        self.say_running()
        yield self.shutdown()
        raise Quit()

    def say_running(self) -> None:
        """Say on stderr how many downloads are running (quitting cancels them)."""
        count = len(self.transfers.running)
        if count:
            plural = "download" if count == 1 else "downloads"
            self.output.note(f"quitting with {count} {plural} running: cancelled")

    # --- ending -------------------------------------------------------------

    def shutdown(self) -> Deferred:
        """Cancel the running downloads, disconnect the connected user, stop the
        peer server and close the connections to the indexer (once; idempotent).

        Used by QUIT, end of input, Ctrl-C/Ctrl-D and SIGTERM alike.
        """
        if self._shutdown is None:
            self._queue.close()  # queued lines would run, and print, while it ends
            self.transfers.cancel_all()
            self._shutdown = self.session.close()
            close = getattr(self.session.indexer, "close", None)
            if close is not None:
                self._shutdown.addCallback(lambda _: close())
        return _chain(self._shutdown)


def _chain(d: Deferred) -> Deferred:
    """A new Deferred with ``d``'s result, leaving ``d``'s own result intact."""
    out: Deferred = Deferred()

    def relay(result: Any) -> Any:
        out.callback(None if isinstance(result, Failure) else result)
        return result

    d.addBoth(relay)
    return out


__all__ = ["Output", "Shell"]
