"""The logger's command line and its service, in process (no rpcbind)."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor
from twisted.python import usage
from twisted.trial import unittest

from p2p import wire
from p2p.logger.service import Options, makeService
from p2p.oncrpc import client, rpc


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(unittest.TestCase):
    def test_defaults(self):
        options = parse()
        self.assertEqual(options["listen"], ["tcp:9091", "udp:9091"])
        self.assertEqual(options["program"], wire.LOGGER_PROGRAM)
        self.assertEqual(options["audit-file"], "p2p-audit.log")
        self.assertFalse(options["no-rpcbind"])

    def test_repeated_listen_and_program(self):
        options = parse(
            "--listen", "tcp:0", "-l", "udp:7000:interface=127.0.0.1", "--program", "0x3fffffff"
        )
        self.assertEqual(options["listen"], ["tcp:0", "udp:7000:interface=127.0.0.1"])
        self.assertEqual(options["program"], 0x3FFFFFFF)

    def test_udp_specs(self):
        from p2p.logger.service import parse_udp

        self.assertEqual(parse_udp("udp:9091"), (9091, ""))
        self.assertEqual(parse_udp("udp:0:interface=127.0.0.1"), (0, "127.0.0.1"))
        self.assertEqual(parse_udp("udp:53:interface=::1"), (53, "::1"))

    def test_bad_values(self):
        for argv in (
            ["--program", "0x1fffffff"],
            ["--program", "0x40000000"],
            ["--program", "many"],
            ["--listen", "udp:x"],
            ["--listen", "udp:9:iface=1.2.3.4"],
            ["--listen", "udp:70000"],
            ["--listen", "udp:9:interface="],
            ["--max-message", "0"],
        ):
            self.assertRaises(usage.UsageError, parse, *argv)


class ServiceTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_serves_log_and_closes(self):
        audit = Path(self.mktemp()).resolve()
        options = parse(
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--listen",
            "udp:0:interface=127.0.0.1",
            "--no-rpcbind",
            "--audit-file",
            str(audit),
            "--program",
            "0x20000777",
        )
        service = makeService(options)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        yield service.ready
        ports = {kind: port.getHost().port for kind, port in service.ports}
        self.assertEqual(sorted(ports), ["tcp", "udp"])
        tcp_port = ports["tcp"]
        proto = yield client.connect(reactor, f"tcp:host=127.0.0.1:port={tcp_port}")
        body = yield proto.call(0x20000777, 1, wire.LOGGER_PROC_LOG, rpc.pack_string("hi there"))
        self.assertEqual(rpc.unpack_int(body), 0)
        self.assertEqual(audit.read_text(), "hi there\n")
        with self.assertRaises(client.RpcReplyError) as caught:
            yield proto.call(0x20000777, 2, 0)
        self.assertEqual((caught.exception.reply.low, caught.exception.reply.high), (1, 1))
        proto.transport.loseConnection()
        yield proto.lost
        yield service.stopService()
        self.assertEqual(service.ports, [])
        self.assertEqual(audit.with_name(audit.name + ".state").read_text(), "")
