"""End-to-end: ``twistd p2p-logger`` against foreign clients and the system rpcbind.

``rpcinfo`` (package rpcbind), a C client built here with ``rpcgen`` from
``logger.x`` (packages rpcsvc-proto, libtirpc-dev, gcc), raw UDP
retransmissions, and registration with rpcbind on 127.0.0.1:111.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from p2p import wire
from p2p.oncrpc import rpc
from tests.support import REPO, deadline, logger_ports, run_command, spawn_twistd


def find_tool(name: str) -> str | None:
    """A command on PATH or in the sbin directories (rpcinfo lives in /usr/sbin)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/bin"):
        path = Path(directory, name)
        if path.exists() and os.access(path, os.X_OK):
            return str(path)
    return None


RPCINFO = find_tool("rpcinfo")
RPCGEN = find_tool("rpcgen")
GCC = find_tool("gcc")
RPCBIND = find_tool("rpcbind")
TIRPC = Path("/usr/include/tirpc/rpc/rpc.h").exists()


def unique_program() -> int:
    """A program number of this test alone, so concurrent tests never share registrations."""
    return 0x30000000 + random.getrandbits(24)


@defer.inlineCallbacks
def start_logger(testcase, *options: str, program: int | None = None):
    """A logger on 127.0.0.1, TCP and UDP on ports the kernel chose (read from its line)."""
    program = program or unique_program()
    args = [
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--listen",
        "udp:0:interface=127.0.0.1",
        "--program",
        hex(program),
        *options,
    ]
    cwd = Path(testcase.mktemp())
    cwd.mkdir(parents=True)
    proc = spawn_twistd(testcase, "p2p-logger", *args, cwd=cwd)
    ports = yield logger_ports(proc)
    return proc, program, ports, cwd / "p2p-audit.log"


def printed(proc, records: list[str]) -> list[str]:
    """Those of ``records`` the logger printed as lines of their own, in order."""
    return [line for line in proc.lines if line in records]


def build_c_client(testcase: unittest.TestCase) -> str:
    """rpcgen the stubs from the packaged logger.x and compile tests/c/log_client.c."""
    work = Path(testcase.mktemp())
    work.mkdir(parents=True)
    shutil.copy(resources.files("p2p.logger") / "logger.x", work / "logger.x")
    subprocess.run([RPCGEN, "-C", "logger.x"], cwd=work, check=True, capture_output=True)
    sources = [str(REPO / "tests/c/log_client.c"), "logger_clnt.c"]
    if (work / "logger_xdr.c").exists():
        sources.append("logger_xdr.c")
    result = subprocess.run(
        [GCC, "-I/usr/include/tirpc", "-I.", "-o", "log_client", *sources, "-ltirpc"],
        cwd=work,
        capture_output=True,
        text=True,
    )
    testcase.assertEqual(result.returncode, 0, result.stderr)
    return str(work / "log_client")


class CClientTests(unittest.TestCase):
    def setUp(self):
        missing = [
            what
            for what, present in (
                ("rpcgen (package rpcsvc-proto)", RPCGEN),
                ("gcc", GCC),
                ("/usr/include/tirpc (package libtirpc-dev)", TIRPC),
            )
            if not present
        ]
        if missing:
            raise unittest.SkipTest("not installed: " + ", ".join(missing))
        self.client = build_c_client(self)

    @defer.inlineCallbacks
    def test_c_client_tcp_and_udp(self):
        proc, program, ports, audit = yield start_logger(self, "--no-rpcbind")
        tcp_messages = [
            "alice REGISTER 25/11/2026 10:00:00",
            "alice PUBLISH a.txt 25/11/2026 10:00:01",
        ]
        udp_messages = ["bob CONNECT 25/11/2026 10:00:02"]
        out, err, code = yield run_command(
            [self.client, "tcp", "127.0.0.1", str(ports["tcp"]), hex(program), *tcp_messages]
        )
        self.assertEqual((code, out.decode()), (0, "LOG 0\nLOG 0\n"), err)
        out, err, code = yield run_command(
            [self.client, "udp", "127.0.0.1", str(ports["udp"]), hex(program), *udp_messages]
        )
        self.assertEqual((code, out.decode()), (0, "LOG 0\n"), err)
        self.assertEqual(audit.read_text().splitlines(), tcp_messages + udp_messages)
        self.assertEqual(printed(proc, tcp_messages + udp_messages), tcp_messages + udp_messages)

    @defer.inlineCallbacks
    def test_c_client_error_result(self):
        """A message that is not one line of text is answered -1 and not stored."""
        _proc, program, ports, audit = yield start_logger(self, "--no-rpcbind")
        out, _err, code = yield run_command(
            [self.client, "tcp", "127.0.0.1", str(ports["tcp"]), hex(program), "two\nlines"]
        )
        self.assertEqual((code, out.decode()), (1, "LOG -1\n"))
        self.assertEqual(audit.read_text(), "")


class UdpClient(protocol.DatagramProtocol):
    def __init__(self):
        self.replies: list[bytes] = []
        self.waiter: defer.Deferred | None = None

    def datagramReceived(self, data, addr):
        self.replies.append(data)
        if self.waiter is not None:
            waiter, self.waiter = self.waiter, None
            waiter.callback(data)

    def next_reply(self) -> defer.Deferred:
        self.waiter = defer.Deferred()
        return deadline(self.waiter, 10)


class UdpRetransmissionTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_retransmitted_call_answered_without_second_record(self):
        _proc, program, ports, audit = yield start_logger(self, "--no-rpcbind")
        client = UdpClient()
        port = reactor.listenUDP(0, client, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        call = rpc.encode_call(
            rpc.Call(4242, program, 1, wire.LOGGER_PROC_LOG), rpc.pack_string("udp once")
        )
        other = rpc.encode_call(
            rpc.Call(4243, program, 1, wire.LOGGER_PROC_LOG), rpc.pack_string("udp twice")
        )
        replies = []
        for data in (call, call, call, other):
            d = client.next_reply()
            port.write(data, ("127.0.0.1", ports["udp"]))
            replies.append((yield d))
        self.assertEqual(replies[0], replies[1])
        self.assertEqual(replies[0], replies[2])
        decoded = [rpc.decode_reply(r) for r in replies]
        self.assertEqual([r.xid for r in decoded], [4242, 4242, 4242, 4243])
        self.assertTrue(all(rpc.unpack_int(r.body) == 0 for r in decoded))
        # Stored before the replies were sent: the file is complete now.
        self.assertEqual(audit.read_text(), "udp once\nudp twice\n")


@defer.inlineCallbacks
def rpcbind_running() -> defer.Deferred:
    out, _err, code = yield run_command([RPCINFO, "-p", "127.0.0.1"])
    return code == 0 and b"portmapper" in out


def registered(listing: bytes, program: int) -> set[tuple[str, int]]:
    found = set()
    for line in listing.decode().splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == str(program) and fields[1] == "1":
            found.add((fields[2], int(fields[3])))
    return found


class RpcbindTests(unittest.TestCase):
    """Registration with the system rpcbind (CI installs and starts it)."""

    @defer.inlineCallbacks
    def setUp(self):
        if RPCINFO is None or RPCBIND is None:
            raise unittest.SkipTest("rpcbind/rpcinfo not installed (Debian package rpcbind)")
        if not (yield rpcbind_running()):
            if os.geteuid() != 0:
                raise unittest.SkipTest(
                    "rpcbind installed but not running, and not root to start it"
                )
            # Installed but stopped: start it, as .ci/run does (it daemonises).
            yield run_command([RPCBIND, "-w"])
            if not (yield rpcbind_running()):
                raise unittest.SkipTest("rpcbind would not start")

    @defer.inlineCallbacks
    def test_registered_while_running_only(self):
        program = unique_program()
        proc, _, ports, _ = yield start_logger(self, program=program)
        yield proc.wait_for_line(r"s> rpcbind registered program")
        out, _err, code = yield run_command([RPCINFO, "-p", "127.0.0.1"])
        self.assertEqual(code, 0)
        self.assertEqual(registered(out, program), {("tcp", ports["tcp"]), ("udp", ports["udp"])})
        if RPCGEN and GCC and TIRPC:
            # clnt_create asks rpcbind for the port: the C client finds us by program number.
            client = build_c_client(self)
            for kind in ("tcp", "udp"):
                out2, err2, code2 = yield run_command(
                    [client, kind, "127.0.0.1", "0", hex(program), f"found via rpcbind {kind}"]
                )
                self.assertEqual((code2, out2), (0, b"LOG 0\n"), err2)
        yield proc.stop()
        self.assertIn("s> rpcbind unregistered program " + hex(program), proc.lines)
        out, _err, code = yield run_command([RPCINFO, "-p", "127.0.0.1"])
        self.assertEqual(registered(out, program), set())

    @defer.inlineCallbacks
    def test_rpcinfo_tcp_and_udp(self):
        """rpcinfo -n PORT pings us directly (Debian's rpcinfo wants the program
        registered with rpcbind first, which the logger does at start)."""
        proc, program, ports, _ = yield start_logger(self)
        yield proc.wait_for_line(r"s> rpcbind registered program")
        for flag, port in (("-t", ports["tcp"]), ("-u", ports["udp"])):
            out, err, code = yield run_command(
                [RPCINFO, "-n", str(port), flag, "127.0.0.1", str(program), "1"]
            )
            self.assertEqual(code, 0, (out, err))
            self.assertIn(f"program {program} version 1 ready and waiting", out.decode())
            out, err, code = yield run_command(
                [RPCINFO, "-n", str(port), flag, "127.0.0.1", str(program), "2"]
            )
            self.assertNotEqual(code, 0)
            self.assertIn("low version = 1, high version = 1", (out + err).decode())

    @defer.inlineCallbacks
    def test_relay_finds_logger_through_rpcbind(self):
        """``make_relay(host=...)`` asks rpcbind (PMAPPROC_GETPORT) for the logger's TCP port."""
        from p2p.indexer.relay import make_relay
        from tests.test_logger_relay import Outbox, records

        program = unique_program()
        proc, _, _ports, audit = yield start_logger(self, program=program)
        yield proc.wait_for_line(r"s> rpcbind registered program")
        outbox = Outbox(self)
        outbox.add(0, 20)
        relay = make_relay(outbox.store, None, "127.0.0.1", program, reactor)
        relay.startService()
        self.addCleanup(relay.stopService)
        yield outbox.wait_empty()
        self.assertEqual(audit.read_text().splitlines(), records(0, 20))
