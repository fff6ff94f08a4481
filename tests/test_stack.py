"""Tests of ``twistd p2p-stack``: its composed options, and the whole stack as a real process."""

from __future__ import annotations

import shlex
import signal
from io import BytesIO
from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.python import usage
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from p2p import stack, wire
from tests.support import (
    deadline,
    exchange,
    hold_port,
    indexer_port,
    poll_until,
    spawn_twistd,
    time_url,
    url_port,
)
from tests.test_indexer_e2e import indexer_db

GET_TIME = (
    b'<?xml version="1.0"?><e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/"'
    b' xmlns:t="urn:p2p:time"><e:Body><t:get_time/></e:Body></e:Envelope>'
)


def parse(*argv: str) -> usage.Options:
    options = stack.Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(TestCase):
    """The stack's command line is the three parts' command lines."""

    def test_every_part_option_is_there(self):
        """Each option of each part has a stack spelling; shared ones are prefixed."""
        names = stack.stack_names(
            [o for part, m in stack.PARTS.items() for o in stack.part_options(part, m.Options)]
        )
        for part, module in stack.PARTS.items():
            for option in stack.part_options(part, module.Options):
                self.assertIn(option, names.values())
        for part in ("indexer", "logger", "time"):
            self.assertEqual(names[f"{part}-listen"].part, part)
        self.assertNotIn("listen", names)
        self.assertEqual(names["db"].part, "indexer")
        self.assertEqual(names["audit-file"].part, "logger")
        self.assertEqual(names["max-body"].part, "time")
        self.assertFalse(names["inline"].takes_value)

    def test_defaults(self):
        options = parse()
        self.assertEqual(options.parts["indexer"]["listen"], f"tcp:{wire.INDEXER_PORT}")
        self.assertEqual(options.parts["time"]["listen"], f"tcp:{wire.TIME_PORT}")
        self.assertEqual(
            options.parts["indexer"]["logger"], f"tcp:host=127.0.0.1:port={wire.LOGGER_PORT}"
        )
        self.assertEqual(options.parts["indexer"]["logger-program"], wire.LOGGER_PROGRAM)

    def test_options_reach_their_part(self):
        options = parse(
            "--indexer-listen=tcp:7001",
            "--logger-listen",
            "tcp:7002:interface=127.0.0.1",
            "--logger-listen=udp:7002",
            "--time-listen=tcp:7003",
            "--db=x.db",
            "--program=0x20000999",
            "--inline",
        )
        self.assertEqual(options.parts["indexer"]["listen"], "tcp:7001")
        self.assertEqual(options.parts["indexer"]["db"], "x.db")
        self.assertEqual(
            options.parts["logger"]["listen"], ["tcp:7002:interface=127.0.0.1", "udp:7002"]
        )
        self.assertTrue(options.parts["time"]["inline"])
        # the indexer follows the stack's own logger: its address and its program
        self.assertEqual(options.parts["indexer"]["logger"], "tcp:host=127.0.0.1:port=7002")
        self.assertEqual(options.parts["indexer"]["logger-program"], 0x20000999)

    def test_explicit_logger_wins(self):
        options = parse("--logger=tcp:host=10.1.1.1:port=99")
        self.assertEqual(options.parts["indexer"]["logger"], "tcp:host=10.1.1.1:port=99")
        options = parse("--logger-host=loghost")
        self.assertIsNone(options.parts["indexer"]["logger"])
        self.assertEqual(options.parts["indexer"]["logger-host"], "loghost")

    def test_part_errors_name_the_part(self):
        exc = self.assertRaises(usage.UsageError, parse, "--max-body=1")
        self.assertTrue(str(exc).startswith("time: "), str(exc))
        self.assertRaises(usage.UsageError, parse, "--listen=tcp:1")

    def test_logger_on_port_zero_needs_explicit_logger(self):
        self.assertRaises(usage.UsageError, parse, "--logger-listen=tcp:0")
        parse("--logger-listen=tcp:0", "--logger=tcp:host=h:port=1")

    def test_connect_to(self):
        connect = stack.connect_to
        self.assertEqual(connect("tcp:9090").endpoint, "tcp:host=127.0.0.1:port=9090")
        self.assertEqual(connect("tcp:port=1:interface=10.0.0.2").host, "10.0.0.2")
        self.assertEqual(connect("tcp:5:interface=10.0.0.3").endpoint, "tcp:host=10.0.0.3:port=5")
        self.assertEqual(connect("tcp6:7").endpoint, "tcp6:host=\\:\\:1:port=7")
        self.assertIsNone(connect("tcp:0"))
        self.assertIsNone(connect("unix:/tmp/x"))

    def test_client_command(self):
        command = stack.client_command(parse("--indexer-listen=tcp:1", "--time-listen=tcp:2"))
        self.assertEqual(
            client_arguments(command),
            ["-s", "127.0.0.1", "-p", "1", "--wsdl", "http://127.0.0.1:2/?wsdl"],
        )

    def test_client_command_pastes_anywhere(self):
        """An absolute program path, and the URL quoted (``?`` is a glob to a shell)."""
        command = stack.client_command(parse("--indexer-listen=tcp:1", "--time-listen=tcp:2"))
        program = Path(shlex.split(command)[0])
        self.assertTrue(program.is_absolute(), command)
        self.assertEqual(program.name, "p2p-client")
        self.assertIn("'http://127.0.0.1:2/?wsdl'", command)


def client_arguments(command: str) -> list[str]:
    """The words of a printed client command after the program, as a shell splits them."""
    program, *arguments = shlex.split(command)
    if Path(program).name != "p2p-client":
        raise AssertionError(f"not a p2p-client command: {command}")
    return arguments


def wait_for_text(path: Path, text: str, timeout: float = 20.0) -> defer.Deferred:
    """Fire once ``path`` contains ``text``; fail after ``timeout``."""
    return poll_until(
        lambda: path.exists() and text in path.read_text("utf-8", "replace"),
        timeout,
        0.05,
        f"{text!r} in {path}",
    )


def logger_listen(testcase: TestCase) -> tuple[int, list[str]]:
    """The logger's TCP port and the stack's options: TCP there, UDP on ``udp:0``.

    The indexer is told where the logger is before the logger listens, so its
    TCP port cannot be the kernel's choice at listen time: the test holds one
    (bound, not listening) and the logger listens beside that socket.
    """
    port = hold_port(testcase)
    return port, [
        f"--logger-listen=tcp:{port}:interface=127.0.0.1",
        "--logger-listen=udp:0:interface=127.0.0.1",
    ]


class StackProcessTests(TestCase):
    """``twistd p2p-stack`` as a real process, on ports read from what it prints."""

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.audit = self.dir / "audit.log"
        self.logger, listen_logger = logger_listen(self)
        self.proc = spawn_twistd(
            self,
            "p2p-stack",
            "--indexer-listen=tcp:0:interface=127.0.0.1",
            *listen_logger,
            "--time-listen=tcp:0:interface=127.0.0.1",
            "--no-rpcbind",
            f"--audit-file={self.audit}",
            f"--db={indexer_db(self, str(self.dir / 'indexer.db'))}",
            cwd=self.dir,
        )
        match = yield self.proc.wait_for_line(r"p2p-indexer: TLS key fingerprint ([0-9a-f]{64})$")
        self.fingerprint = match.group(1)
        self.indexer = yield indexer_port(self.proc)
        self.time = url_port((yield time_url(self.proc)))
        match = yield self.proc.wait_for_line(r"s> client: (.+)$")
        self.client_command = match.group(1)
        yield self.proc.wait_for_line(r"s> ready")

    def test_announces_everything(self):
        """Indexer, logger, WSDL and the client command are printed."""
        self.assertEqual(
            client_arguments(self.client_command),
            [
                "-s",
                "127.0.0.1",
                "-p",
                str(self.indexer),
                "--indexer-fingerprint",
                self.fingerprint,
                "--wsdl",
                f"http://127.0.0.1:{self.time}/?wsdl",
            ],
        )
        out = "\n".join(self.proc.lines)
        self.assertIn(f"s> time service http://127.0.0.1:{self.time}/?wsdl", out)
        self.assertIn(f"s> init server 127.0.0.1:{self.indexer}", out)
        self.assertRegex(out, rf"s> logger program 0x20000155 .*tcp 127.0.0.1:{self.logger}")

    @defer.inlineCallbacks
    def test_indexer_request_is_audited(self):
        """A raw REGISTER is answered 0 and its record reaches the audit file."""
        when = wire.format_datetime()
        data = yield exchange(self.indexer, wire.encode_request("REGISTER", when, "alice"))
        self.assertEqual(data, wire.encode_code(wire.OK))
        yield wait_for_text(self.audit, wire.audit_record("alice", "REGISTER", when) + "\n")

    @defer.inlineCallbacks
    def test_time_service_answers(self):
        agent = Agent(reactor)
        response = yield deadline(
            agent.request(
                b"POST",
                f"http://127.0.0.1:{self.time}/".encode(),
                Headers({b"content-type": [b"text/xml"]}),
                FileBodyProducer(BytesIO(GET_TIME)),
            ),
            10,
        )
        body = yield readBody(response)
        self.assertEqual(response.code, 200)
        self.assertIn(b"get_timeResult", body)

    @defer.inlineCallbacks
    def test_ctrl_c_stops_cleanly(self):
        """SIGINT (Ctrl-C) stops every service; twistd then ends by the same signal."""
        self.proc.signal("INT")
        yield deadline(self.proc.ended, 15)
        self.assertEqual(self.proc.exit_signal, signal.SIGINT, self.proc.output())
        self.assertFalse([line for line in self.proc.errlines if "Traceback" in line])
        self.assertIn("s> stack stopped", self.proc.lines)
        self.assertIn("Server Shut Down.", "\n".join(self.proc.lines + self.proc.errlines))


class StackStartFailureTests(TestCase):
    """A part that cannot listen stops the whole stack, with a line saying why."""

    @defer.inlineCallbacks
    def test_indexer_port_taken(self):
        taken = reactor.listenTCP(0, protocol.ServerFactory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        proc = spawn_twistd(
            self,
            "p2p-stack",
            f"--indexer-listen=tcp:{taken.getHost().port}:interface=127.0.0.1",
            *logger_listen(self)[1],
            "--time-listen=tcp:0:interface=127.0.0.1",
            "--no-rpcbind",
            "--db=:memory:",
        )
        match = yield proc.wait_for_line(r"s> cannot start the stack: (.*)")
        self.assertIn(str(taken.getHost().port), match.group(1))
        code = yield deadline(proc.ended, 15)
        self.assertNotIn("s> ready", "\n".join(proc.lines))
        self.assertNotEqual(code, 0)


class StackKernelPortsTests(TestCase):
    """With ``tcp:0`` the printed client command names the ports really bound."""

    @defer.inlineCallbacks
    def test_client_command_names_bound_ports(self):
        proc = spawn_twistd(
            self,
            "p2p-stack",
            "--indexer-listen=tcp:0:interface=127.0.0.1",
            *logger_listen(self)[1],
            "--time-listen=tcp:0:interface=127.0.0.1",
            "--no-rpcbind",
            "--db=:memory:",
        )
        key = yield proc.wait_for_line(r"p2p-indexer: TLS key fingerprint ([0-9a-f]{64})$")
        indexer = yield proc.wait_for_line(r"s> init server 127\.0\.0\.1:(\d+)")
        wsdl = yield proc.wait_for_line(r"s> time service (\S+)")
        command = yield proc.wait_for_line(r"s> client: (.+)$")
        self.assertEqual(
            client_arguments(command.group(1)),
            [
                "-s",
                "127.0.0.1",
                "-p",
                indexer.group(1),
                "--indexer-fingerprint",
                key.group(1),
                "--wsdl",
                wsdl.group(1),
            ],
        )
        self.assertNotEqual(indexer.group(1), "0")
