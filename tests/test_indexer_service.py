"""``twistd p2p-indexer`` options and service tree."""

from __future__ import annotations

import os

from twisted.application.service import Service
from twisted.python import usage
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.indexer import relay as relay_module
from p2p.indexer.service import IndexerService, Options, makeService


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(TestCase):
    def setUp(self) -> None:
        self.patch(os, "environ", {})

    def test_defaults(self) -> None:
        options = parse()
        self.assertEqual(options["listen"], f"tcp:{wire.INDEXER_PORT}")
        self.assertEqual(options["db"], "p2p-indexer.db")
        self.assertEqual(options["timeout"], wire.DEFAULT_TIMEOUT)
        self.assertEqual(options["max-connections"], wire.DEFAULT_MAX_CONNECTIONS)
        self.assertEqual(options["sync"], "normal")
        self.assertEqual(options["logger-program"], wire.LOGGER_PROGRAM)
        self.assertIsNone(options["logger"])
        self.assertIsNone(options["logger-host"])
        self.assertFalse(options.audit)

    def test_values(self) -> None:
        options = parse(
            "--listen=tcp:0",
            "--db=:memory:",
            "--timeout=0.5",
            "--max-connections=3",
            "--sync=full",
            "--logger-program=0x20000001",
        )
        self.assertEqual(
            (options["timeout"], options["max-connections"], options["sync"]), (0.5, 3, "full")
        )
        self.assertEqual(options["logger-program"], 0x20000001)

    def test_bad_values(self) -> None:
        for argv in (
            ["--sync=sometimes"],
            ["--timeout=0"],
            ["--timeout=x"],
            ["--max-connections=0"],
            ["--logger-program=5"],
            ["--db="],
            ["--db", " "],
        ):
            self.assertRaises(usage.UsageError, parse, *argv)

    def test_logger_host_from_environment(self) -> None:
        self.patch(os, "environ", {"LOGGER_HOST": "10.0.0.9"})
        options = parse()
        self.assertEqual(options["logger-host"], "10.0.0.9")
        self.assertTrue(options.audit)
        self.assertEqual(parse("--logger-host=h")["logger-host"], "h")


class MakeServiceTests(TestCase):
    def test_without_logger(self) -> None:
        top = makeService(parse("--db=:memory:", "--listen=tcp:0"))
        [child] = list(top)
        self.assertIsInstance(child, IndexerService)
        self.assertFalse(child.directory.audit)

    def test_with_logger(self) -> None:
        calls = []

        def make_relay(store, endpoint, host, program, reactor):
            calls.append((store, endpoint, host, program))
            return Service()

        # The real module, patched: replacing sys.modules does not reach the import system.
        self.patch(relay_module, "make_relay", make_relay)
        options = parse("--db=:memory:", "--logger=tcp:host=127.0.0.1:port=1")
        top = makeService(options)
        indexer, relay = list(top)
        self.assertIsInstance(relay, Service)
        self.assertTrue(indexer.directory.audit)
        [(store, endpoint, host, program)] = calls
        self.assertIs(store, indexer.store)
        self.assertEqual(
            (endpoint, host, program), ("tcp:host=127.0.0.1:port=1", None, wire.LOGGER_PROGRAM)
        )


class LogTests(TestCase):
    """Run by twistd with --logfile, the indexer logs through the bounded, rate-limited log."""

    def test_twistd_gets_the_rate_limited_observer_over_a_bounded_file(self):
        import signal
        from pathlib import Path

        from twisted.application.service import Application
        from twisted.internet import task
        from twisted.logger import ILogObserver, LogLevel

        from p2p.logs import RateLimitedObserver

        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        path = Path(self.mktemp())
        options = Options()
        options.parseOptions(["--db", ":memory:", "--log-size", "1000", "--log-files", "2"])
        options.parent = {"logfile": str(path), "nodaemon": True, "syslog": False, "logger": None}
        application = Application("p2p-indexer")
        makeService(options).setServiceParent(application)
        observer = ILogObserver(application, None)
        self.assertIsInstance(observer, RateLimitedObserver)
        observer.clock = task.Clock()  # its summary period, on a fake clock
        for letter in "xyz":
            observer({"log_format": letter * 600, "log_level": LogLevel.warn, "log_time": 0})
        self.assertIn("zzz", path.read_text())
        self.assertIn("xxx", Path(f"{path}.1").read_text())  # rotated at 1000 bytes
