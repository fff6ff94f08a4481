"""``p2p-client``: the command-line entry point of the interactive shell.

Wires the pieces together: options, the client's home (``$P2P_HOME``), the
time client, the indexer client, the shell, and the input front end (an
editable prompt in a terminal, where downloads run in the background under a
status area; plain lines from a pipe, each command ending before the next).
Every way of ending (QUIT, end of input, Ctrl-D, SIGTERM; Ctrl-C only outside a
terminal) stops the reactor, and a before-shutdown trigger cancels running
downloads, disconnects the connected user and stops the peer server first.

``--export-identity USER FILE`` and ``--import-identity FILE`` move a user's
identity between homes (machines) and exit without starting the shell.
"""

from __future__ import annotations

import os
import signal
import sys
from functools import partial
from pathlib import Path

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    globalLogBeginner,
)
from twisted.python import usage

from p2p import wire
from p2p.client.completion import Completer
from p2p.client.frontends import StdioOutput, attach_pipe, attach_terminal, raw_terminal
from p2p.client.history import History
from p2p.client.home import Home, HomeError, IdentityExists
from p2p.client.indexer_client import IndexerClient
from p2p.client.nodes import BadNodeList, parse_nodes
from p2p.client.shell import Shell
from p2p.client.time_client import TimeClient, wsdl_url
from p2p.client.uploads import UploadNotices
from p2p.console import parse_command_line
from p2p.listening import DEFAULT_MAX_PER_SOURCE, positive_int
from p2p.metrics import METRICS_OPTION
from p2p.peer.ratelimit import parse_rate
from p2p.startup import StartFailure
from p2p.tls import is_fingerprint


class Options(usage.Options):
    """Command-line options of ``p2p-client``."""

    synopsis = (
        "p2p-client -s HOST[:PORT][,HOST[:PORT]...] [-p PORT] [options]\n"
        "       p2p-client --export-identity USER FILE\n"
        "       p2p-client --import-identity FILE [--replace-identity]"
    )
    longdesc = (
        "The p2p shell: register, connect, publish and fetch files. "
        "Type HELP at the c> prompt for the commands."
    )
    optParameters = [
        [
            "server",
            "s",
            "localhost",
            "Host name or address of the indexer; or several nodes of one directory, "
            "HOST[:PORT] separated by commas ([ADDR]:PORT for IPv6), tried in order when "
            "one does not answer: -s host1:9090,host2:9090.",
        ],
        ["port", "p", wire.INDEXER_PORT, "TCP port of the indexer (of -s nodes without one).", int],
        [
            "wsdl",
            None,
            None,
            "WSDL of the time service (default: $WSDL_URL, else "
            f"http://localhost:{wire.TIME_PORT}/?wsdl).",
        ],
        ["share-dir", None, ".", "Directory whose published files peers may download."],
        [
            "peer-listen",
            None,
            "tcp:0",
            "Endpoint the peer server listens on after CONNECT "
            "(default: a free port on all interfaces).",
        ],
        [
            "max-uploads",
            None,
            None,
            "Files peers may download from this client at once; beyond it a FETCH is "
            "answered 4 (busy, try again later) and a classic GET_FILE 2 (default: no limit).",
            positive_int,
        ],
        [
            "max-upload-rate",
            None,
            None,
            "Bytes per second all uploads to peers together may take (GET_FILE, FETCH, "
            "RANGE); a whole number, or with K, M or G for KiB, MiB, GiB (1024-based): "
            "--max-upload-rate 512K (default: no limit).",
            parse_rate,
        ],
        [
            "max-per-source",
            None,
            DEFAULT_MAX_PER_SOURCE,
            "Connections one address may hold open on the peer server; beyond it its "
            "new ones are closed at once.",
            positive_int,
        ],
        ["timeout", None, wire.DEFAULT_TIMEOUT, "Seconds to wait for the indexer.", float],
        ["download-timeout", None, 30.0, "Seconds a peer may stay silent during GET_FILE.", float],
        ["min-rate", None, 1024.0, "Bytes/s a GET_FILE peer must average over 30 s.", float],
        ["time-timeout", None, 5.0, "Seconds to wait for the time service.", float],
        [
            "indexer-fingerprint",
            None,
            None,
            "The key fingerprint the indexer must have (64 hex digits, as it prints at "
            "start); pinned in $P2P_HOME/known_indexers instead of the one met first.",
        ],
        [
            "export-identity",
            None,
            None,
            "Write USER's identity (private key!) to FILE (mode 0600) and exit: "
            "--export-identity USER FILE.",
        ],
        [
            "import-identity",
            None,
            None,
            "Keep the identity exported to FILE in $P2P_HOME and exit.",
        ],
        METRICS_OPTION,
    ]
    optFlags = [
        ["replace-identity", None, "With --import-identity: replace another kept identity."],
        ["no-edit", None, "Read plain lines even when stdin is a terminal."],
        ["verbose", "v", "Log internal events to stderr."],
    ]

    def opt_version(self) -> None:
        """Display the p2p version and exit."""
        from importlib.metadata import version

        print(f"p2p-client {version('p2p')}")
        sys.exit(0)

    def parseArgs(self, *args: str) -> None:
        if self["export-identity"] is not None and len(args) == 1:
            self["export-file"] = args[0]
        elif self["export-identity"] is not None:
            raise usage.UsageError("--export-identity takes a user and a file: USER FILE")
        elif args:
            raise usage.UsageError(f"unexpected arguments: {' '.join(args)}")

    def postOptions(self) -> None:
        if self["export-identity"] is not None and self["import-identity"] is not None:
            raise usage.UsageError("--export-identity and --import-identity go one at a time")
        fingerprint = self["indexer-fingerprint"]
        if fingerprint is not None:
            fingerprint = fingerprint.replace(":", "").lower()
            if not is_fingerprint(fingerprint):
                raise usage.UsageError(
                    f"--indexer-fingerprint {self['indexer-fingerprint']}: not 64 hex digits"
                )
            self["indexer-fingerprint"] = fingerprint
        if not 0 < self["port"] < 65536:
            raise usage.UsageError(f"not a TCP port: {self['port']}")
        try:
            self["nodes"] = parse_nodes(self["server"], self["port"])
        except BadNodeList as exc:
            raise usage.UsageError(f"-s: {exc}; expected HOST[:PORT][,HOST[:PORT]...]") from None
        share = Path(self["share-dir"])
        if not share.is_dir():
            raise usage.UsageError(f"--share-dir {share} is not a directory")
        self["share-dir"] = share.resolve()


def _start_logging(note, verbose: bool) -> None:
    """Internal log events go to stderr: errors only, or everything with --verbose."""

    def observer(event: dict) -> None:
        text = formatEventAsClassicLogText(event)
        if text:
            note(text.rstrip("\n"))

    level = LogLevel.debug if verbose else LogLevel.error
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [predicate])],
        discardBuffer=True,
        redirectStandardIO=False,
    )


def move_identity(options: Options, home: Home) -> int:
    """``--export-identity`` / ``--import-identity``: do it, say it on stderr; the exit code."""
    say = sys.stderr.write
    try:
        if options["export-identity"] is not None:
            user = options["export-identity"]
            path = home.export_identity(user, options["export-file"])
            fingerprint = home.identity(user).fingerprint
            say(
                f"p2p-client: exported the identity of {user} (key {fingerprint}) to {path}.\n"
                f"p2p-client: that file holds {user}'s PRIVATE KEY (mode 0600): whoever has it "
                f"can act as {user}. Carry it privately, import it with "
                f"'p2p-client --import-identity {path}', then delete it.\n"
            )
            return 0
        user = home.import_identity(options["import-identity"], options["replace-identity"])
    except IdentityExists as exc:
        say(f"p2p-client: not imported: {exc}; pass --replace-identity to replace it\n")
        return 1
    except (HomeError, OSError) as exc:
        say(f"p2p-client: {exc}\n")
        return 1
    fingerprint = home.identity(user).fingerprint
    say(
        f"p2p-client: imported the identity of {user} (key {fingerprint}) "
        f"into {home.identity_file(user)}\n"
    )
    return 0


def main(argv: list[str] | None = None) -> None:
    """Run the shell until QUIT, end of input, Ctrl-C/Ctrl-D or SIGTERM."""
    options = Options()
    parse_command_line(options, argv, "p2p-client")

    home = Home()
    if options["export-identity"] is not None or options["import-identity"] is not None:
        sys.exit(move_identity(options, home))

    from twisted.internet import reactor

    from p2p.peer import download
    from p2p.peer.server import PeerServer

    served = None  # what the peer server counts for --metrics
    if options["metrics"] is not None:
        from p2p.client.metrics import serve_peer_metrics

        try:
            served = serve_peer_metrics(options["metrics"], reactor)
        except StartFailure as exc:
            sys.exit(f"p2p-client: {exc}")

    output = StdioOutput()
    interactive = os.isatty(0) and not options["no-edit"]
    _start_logging(output.note, options["verbose"])
    clock = TimeClient(
        wsdl_url(options["wsdl"]), output.note, reactor=reactor, timeout=options["time-timeout"]
    )
    first, *others = options["nodes"]
    indexer = IndexerClient(
        first.host,
        first.port,
        clock.now,
        reactor=reactor,
        timeout=options["timeout"],
        home=home,
        fingerprint=options["indexer-fingerprint"],
        note=output.note,
        more_nodes=others,
    )
    shell = Shell(
        indexer,
        output,
        options["share-dir"],
        peer_listen=options["peer-listen"],
        server_factory=partial(
            PeerServer,
            max_per_source=options["max-per-source"],
            max_uploads=options["max-uploads"],
            max_upload_rate=options["max-upload-rate"],
            uploads=UploadNotices(output.note) if interactive else None,
            metrics=served,
        ),
        reactor=reactor,
        download_timeout=options["download-timeout"],
        download=partial(download.download, limits=download.Limits(min_rate=options["min-rate"])),
        no_such_file=download.NoSuchFile,
        home=home,
    )

    stopping: list[bool] = []

    def stop(_ignored: object = None) -> None:
        # Once only: reactor.running stays true while the shutdown disconnects the
        # user, and a second stop (Ctrl-D, then the terminal closing) would raise.
        if reactor.running and not stopping:
            stopping.append(True)
            reactor.stop()

    shell.ended.addCallback(stop)
    reactor.addSystemEventTrigger("before", "shutdown", shell.shutdown)
    # A closed terminal (SIGHUP) ends the shell like SIGTERM does: disconnect first.
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(stop))

    if not interactive:
        attach_pipe(reactor, shell.submit, shell.end_of_input, output.note)
        reactor.run()
        return
    shell.background = True  # GET_FILE returns to the prompt; DOWNLOADS, CANCEL
    output.show_progress = False  # the status area under the prompt shows progress

    def quit_now() -> None:
        shell.say_running()
        stop()

    with raw_terminal(0):
        completer = Completer()
        output.seen = completer.seen
        terminal = attach_terminal(
            reactor,
            shell.submit,
            quit_now,
            output,
            status=shell.transfers.status_lines,
            completer=completer,
            history=History(home.path / "history", output.note),
        )
        shell.transfers.on_change = terminal.refresh
        shell.confirm = terminal.ask
        shell.on_idle = terminal.show_prompt
        terminal.show_prompt()
        try:
            reactor.run()
        finally:
            output.screen = None
            terminal.leave()
