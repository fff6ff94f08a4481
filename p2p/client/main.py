"""``p2p-client``: the command-line entry point of the interactive shell.

Wires the pieces together: options, the time client, the indexer client, the
shell, and the input front end (an editable prompt in a terminal, plain lines
from a pipe). Every way of ending (QUIT, end of input, Ctrl-C, Ctrl-D, SIGTERM)
stops the reactor, and a before-shutdown trigger disconnects the connected user
and stops the peer server first.
"""

from __future__ import annotations

import os
import signal
import sys
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
from p2p.client.frontends import StdioOutput, attach_pipe, attach_terminal, raw_terminal
from p2p.client.indexer_client import IndexerClient
from p2p.client.shell import Shell
from p2p.client.time_client import TimeClient, wsdl_url


class Options(usage.Options):
    """Command-line options of ``p2p-client``."""

    synopsis = "p2p-client -s HOST -p PORT [options]"
    longdesc = (
        "The p2p shell: register, connect, publish and fetch files. "
        "Type HELP at the c> prompt for the commands."
    )
    optParameters = [
        ["server", "s", "localhost", "Host name or address of the indexer."],
        ["port", "p", wire.INDEXER_PORT, "TCP port of the indexer.", int],
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
        ["timeout", None, wire.DEFAULT_TIMEOUT, "Seconds to wait for the indexer.", float],
        ["download-timeout", None, 30.0, "Seconds a peer may stay silent during GET_FILE.", float],
        ["time-timeout", None, 5.0, "Seconds to wait for the time service.", float],
    ]
    optFlags = [
        ["no-edit", None, "Read plain lines even when stdin is a terminal."],
        ["verbose", "v", "Log internal events to stderr."],
    ]

    def opt_version(self) -> None:
        """Display the p2p version and exit."""
        from importlib.metadata import version

        print(f"p2p-client {version('p2p')}")
        sys.exit(0)

    def postOptions(self) -> None:
        if not 0 < self["port"] < 65536:
            raise usage.UsageError(f"not a TCP port: {self['port']}")
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


def main(argv: list[str] | None = None) -> None:
    """Run the shell until QUIT, end of input, Ctrl-C/Ctrl-D or SIGTERM."""
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as exc:
        sys.stderr.write(f"{options}\np2p-client: {exc}\n")
        sys.exit(2)

    from twisted.internet import reactor

    output = StdioOutput()
    _start_logging(output.note, options["verbose"])
    clock = TimeClient(
        wsdl_url(options["wsdl"]), output.note, reactor=reactor, timeout=options["time-timeout"]
    )
    indexer = IndexerClient(
        options["server"], options["port"], clock.now, reactor=reactor, timeout=options["timeout"]
    )
    shell = Shell(
        indexer,
        output,
        options["share-dir"],
        peer_listen=options["peer-listen"],
        reactor=reactor,
        download_timeout=options["download-timeout"],
    )

    def stop(_ignored: object = None) -> None:
        if reactor.running:
            reactor.stop()

    shell.ended.addCallback(stop)
    reactor.addSystemEventTrigger("before", "shutdown", shell.shutdown)
    # A closed terminal (SIGHUP) ends the shell like SIGTERM does: disconnect first.
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(stop))

    interactive = os.isatty(0) and not options["no-edit"]
    if not interactive:
        attach_pipe(reactor, shell.submit, shell.end_of_input, output.note)
        reactor.run()
        return
    with raw_terminal(0):
        terminal = attach_terminal(reactor, shell.submit, stop)
        shell.on_idle = terminal.show_prompt
        terminal.show_prompt()
        reactor.run()
