"""Our client against another implementation of the classic protocol.

A *minimal classic indexer* and a *minimal classic peer* written here, naively and
independently from ``p2p.wire`` (they split on NUL and know nothing of our
extensions), play "someone else's" system. Real ``python -m p2p.client``
processes, driven through a pipe, must work with them line for line, and what
our client puts on the wire is captured and checked byte for byte:
``OP, DATETIME, USER, args``, every one NUL-terminated, DATETIME as
``dd/mm/YYYY HH:MM:SS``, the port as a decimal string. The extensions our
client tries (TLS, PUBLISH_FILE, LIST_FILES, SEARCH, LIST_PEERS, HOLD) are
closed unanswered there, as a classic indexer does with any unknown OP, and
the client falls back (protocol.md 8.4).
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import TestCase

from tests.support import exchange, hold_port
from tests.test_client_e2e import ShellProcess

DATETIME = re.compile(rb"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d")

#: Strings each classic request carries (OP, DATETIME, USER and the arguments).
ARITY = {
    b"REGISTER": 3,
    b"UNREGISTER": 3,
    b"CONNECT": 4,
    b"DISCONNECT": 3,
    b"PUBLISH": 5,
    b"DELETE": 4,
    b"LIST_USERS": 3,
    b"LIST_CONTENT": 4,
}


class ClassicIndexer(protocol.Factory):
    """protocol.md section 1 as a newcomer would write it: a dict, no extras.

    LIST_USERS lists the most recently connected user first (our indexer does
    not), and gives each user's IP exactly as stored (``extra_users`` may hold
    host names).
    """

    def __init__(self) -> None:
        self.users: dict[str, dict] = {}  # name -> {"addr": (ip, port) | None, "files": {}}
        self.requests: list[bytes] = []  # every request, raw, in arrival order
        self.unanswered: list[bytes] = []  # the first field of each request closed unanswered

    def buildProtocol(self, addr):
        proto = _ClassicIndexerProtocol()
        proto.factory = self
        return proto

    def handle(self, fields: list[bytes], peer_ip: str) -> bytes:
        op, _when, user = fields[0], fields[1], fields[2].decode()
        args = [f.decode() for f in fields[3:]]
        record = self.users.get(user)
        if op == b"REGISTER":
            if record is not None:
                return b"\x01"
            self.users[user] = {"addr": None, "files": {}}
            return b"\x00"
        if record is None:
            return b"\x01"
        if op == b"UNREGISTER":
            if record["addr"] is not None:
                return b"\x02"
            del self.users[user]
            return b"\x00"
        if op == b"CONNECT":
            if record["addr"] is not None:
                return b"\x02"
            record["addr"] = (peer_ip, args[0])
            # Re-insert: the latest connected user goes last in the dict, first in LIST_USERS.
            self.users[user] = self.users.pop(user)
            return b"\x00"
        if record["addr"] is None:
            return b"\x02"
        if op == b"DISCONNECT":
            record["addr"] = None
            return b"\x00"
        if op == b"PUBLISH":
            if args[0] in record["files"]:
                return b"\x03"
            record["files"][args[0]] = args[1]
            return b"\x00"
        if op == b"DELETE":
            if record["files"].pop(args[0], None) is None:
                return b"\x03"
            return b"\x00"
        if op == b"LIST_USERS":
            online = [(n, r["addr"]) for n, r in reversed(self.users.items()) if r["addr"]]
            out = [b"\x00", b"%d\x00" % len(online)]
            for name, (ip, port) in online:
                out.append(b"%s\x00%s\x00%s\x00" % (name.encode(), ip.encode(), port.encode()))
            return b"".join(out)
        if op == b"LIST_CONTENT":
            owner = self.users.get(args[0])
            if owner is None:
                return b"\x03"
            out = [b"\x00", b"%d\x00" % len(owner["files"])]
            for name, text in owner["files"].items():
                out.append(name.encode() + b"\x00" + text.encode() + b"\x00")
            return b"".join(out)
        return b""


class _ClassicIndexerProtocol(protocol.Protocol):
    def connectionMade(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        fields = self.buffer.split(b"\0")[:-1]
        if not fields:
            return
        wanted = ARITY.get(fields[0])
        if wanted is None:
            self.factory.unanswered.append(fields[0])
            self.transport.loseConnection()  # unknown OP: close, no reply byte
            return
        if len(fields) < wanted:
            return
        self.factory.requests.append(self.buffer)
        self.transport.write(self.factory.handle(fields, self.transport.getPeer().host))
        self.transport.loseConnection()


class ClassicPeer(protocol.Factory):
    """A peer that knows only ``GET_FILE``: FETCH (or anything else) is closed unanswered."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[bytes] = []

    def buildProtocol(self, addr):
        proto = _ClassicPeerProtocol()
        proto.factory = self
        return proto


class _ClassicPeerProtocol(protocol.Protocol):
    def connectionMade(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        fields = self.buffer.split(b"\0")
        if len(fields) < 2:
            return
        if fields[0] != b"GET_FILE":
            self.transport.loseConnection()
            return
        if len(fields) < 3:
            return
        self.factory.requests.append(self.buffer)
        body = self.factory.files.get(fields[1].decode())
        self.transport.write(b"\x01" if body is None else b"\x00" + body)
        self.transport.loseConnection()


class _SloppyPeerProtocol(protocol.Protocol):
    """A classic peer written loosely: it serves the second field whatever the operation."""

    def dataReceived(self, data: bytes) -> None:
        self.buffer = getattr(self, "buffer", b"") + data
        fields = self.buffer.split(b"\0")
        if len(fields) < 3:
            return
        body = self.factory.files.get(fields[1].decode())
        self.transport.write(b"\x01" if body is None else b"\x00" + body)
        self.transport.loseConnection()


def request(*fields: bytes) -> re.Pattern[bytes]:
    """A pattern for one exact request: our DATETIME shape in the second field."""
    parts = [re.escape(fields[0] + b"\0"), DATETIME.pattern + b"\0"]
    parts += [re.escape(f + b"\0") for f in fields[1:]]
    return re.compile(b"".join(parts) + rb"\Z")


class InteropTestCase(TestCase):
    def setUp(self):
        self.indexer = ClassicIndexer()
        listening = reactor.listenTCP(0, self.indexer, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port
        # No time service: the client stamps with the local clock, in the same format.
        self.wsdl = f"http://127.0.0.1:{hold_port(self)}/?wsdl"  # refuses connections

    def shell(self, name: str, share: Path | None = None) -> ShellProcess:
        return ShellProcess(self, name, self.port, self.wsdl, share=share)

    def classic_peer(self, files: dict[str, bytes]) -> tuple[ClassicPeer, int]:
        peer = ClassicPeer(files)
        listening = reactor.listenTCP(0, peer, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        return peer, listening.getHost().port

    def assertRequest(self, raw: bytes, *fields: bytes) -> None:
        self.assertRegex(raw, request(*fields))


class ClassicIndexerTests(InteropTestCase):
    @defer.inlineCallbacks
    def test_every_command_every_line_and_the_bytes_sent(self):
        share = Path(self.mktemp())
        share.mkdir()
        (share / "notes.txt").write_bytes(b"hello classic world\n")
        a = self.shell("alice", share=share)
        sent = self.indexer.requests
        yield a.check("REGISTER alice", "c> REGISTER OK")
        self.assertRequest(sent[-1], b"REGISTER", b"alice")
        yield a.check("REGISTER alice", "c> USERNAME IN USE")
        yield a.check("UNREGISTER nobody", "c> USER DOES NOT EXIST")
        self.assertRequest(sent[-1], b"UNREGISTER", b"nobody")
        yield a.check("CONNECT nobody", "c> CONNECT FAIL, USER DOES NOT EXIST")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        # The CONNECT that succeeded: port as a decimal string, and it is really listening.
        connects = [r for r in sent if r.startswith(b"CONNECT\0")]
        match = re.fullmatch(
            rb"CONNECT\0" + DATETIME.pattern + rb"\0alice\0([1-9]\d{0,4})\0", connects[-1]
        )
        self.assertIsNotNone(match, connects[-1])
        alice_port = int(match.group(1))
        reply = yield exchange(alice_port, b"GET_FILE\0notes.txt\0")
        self.assertEqual(reply, b"\x01")  # listening, and not serving what is not published
        # CONNECT asks nothing more: what the indexer lists never decides what is served.
        self.assertIs(sent[-1], connects[-1])

        yield a.check("UNREGISTER alice", "c> UNREGISTER FAIL")
        self.assertRequest(sent[-1], b"UNREGISTER", b"alice")
        yield a.check("PUBLISH notes.txt my  notes, spaced", "c> PUBLISH OK")
        self.assertRequest(sent[-1], b"PUBLISH", b"alice", b"notes.txt", b"my  notes, spaced")
        yield a.check("PUBLISH notes.txt again", "c> PUBLISH FAIL, CONTENT ALREADY PUBLISHED")
        yield a.check("DELETE other.txt", "c> DELETE FAIL, CONTENT NOT PUBLISHED")
        self.assertRequest(sent[-1], b"DELETE", b"alice", b"other.txt")
        yield a.check("LIST_CONTENT bob", "c> LIST_CONTENT FAIL, REMOTE USER DOES NOT EXIST")
        self.assertRequest(sent[-1], b"LIST_CONTENT", b"alice", b"bob")
        yield a.check(
            "LIST_CONTENT alice", "c> LIST_CONTENT OK", '\tnotes.txt - "my  notes, spaced"'
        )

        # Another program registers and connects bob and carol; the listing comes in the
        # classic indexer's own order, with the IPs it stored, printed as given.
        self.indexer.users["bob"] = {"addr": ("10.1.2.3", "4000"), "files": {}}
        self.indexer.users["carol"] = {"addr": ("peer.example", "65535"), "files": {}}
        yield a.check(
            "LIST_USERS",
            "c> LIST_USERS OK",
            "\tcarol peer.example 65535",
            "\tbob 10.1.2.3 4000",
            f"\talice 127.0.0.1 {alice_port}",
        )
        self.assertRequest(sent[-1], b"LIST_USERS", b"alice")
        # The user forgotten behind the shell's back: the classic codes, with the slash forms.
        self.indexer.users["alice"]["addr"] = None
        yield a.check("PUBLISH x y", "c> PUBLISH FAIL, USER NOT CONNECTED")
        yield a.check("DELETE x", "c> DELETE FAIL, USER NOT CONNECTED")
        yield a.check("LIST_USERS", "c> LIST_USERS FAIL, USER NOT CONNECTED")
        yield a.check("LIST_CONTENT bob", "c> LIST_CONTENT FAIL, USER NOT CONNECTED")
        yield a.check("DISCONNECT alice", "c> DISCONNECT FAIL / USER NOT CONNECTED")
        self.assertRequest(sent[-1], b"DISCONNECT", b"alice")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        del self.indexer.users["alice"]
        yield a.check("PUBLISH x y", "c> PUBLISH FAIL, USER DOES NOT EXIST")
        yield a.check("DELETE x", "c> DELETE FAIL, USER DOES NOT EXIST")
        yield a.check("LIST_USERS", "c> LIST_USERS FAIL, USER DOES NOT EXIST")
        yield a.check("LIST_CONTENT bob", "c> LIST_CONTENT FAIL, USER DOES NOT EXIST")
        yield a.check("DISCONNECT alice", "c> DISCONNECT FAIL / USER DOES NOT EXIST")
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        yield a.check("DISCONNECT alice", "c> DISCONNECT OK")
        yield a.check("UNREGISTER alice", "c> UNREGISTER OK")
        count = len(sent)
        code = yield a.quit()
        self.assertEqual(code, 0)
        self.assertEqual(len(sent), count, "QUIT with nobody connected asks nothing")
        # Nothing but result lines on stdout: the 31 checked above.
        self.assertEqual(len(a.lines), 31, a.proc.output())
        # One note that names are not protected here, and no identity kept for it.
        notes = [line for line in a.proc.errlines if "does not speak TLS" in line]
        self.assertEqual(len(notes), 1, a.proc.output())
        self.assertIn("not protected", notes[0])
        self.assertFalse((a.home / "identities").exists() and any(a.home.glob("identities/*")))
        for raw in sent:  # every field of every request NUL-terminated, nothing more
            self.assertTrue(raw.endswith(b"\0"), raw)

    @defer.inlineCallbacks
    def test_control_characters_in_listings_are_shown_escaped(self):
        # Our indexer refuses them; another may store and send them back. Each row
        # must stay one line, and no escape sequence may reach the terminal.
        a = self.shell("alice")
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        self.indexer.users["alice"]["files"]["a\rb"] = "one\ntwo\x1b[2J\tend\x7f"
        self.indexer.users["m\x1b]0;x\x07"] = {"addr": ("1.2.3.4\n", "9"), "files": {}}
        yield a.check(
            "LIST_CONTENT alice", "c> LIST_CONTENT OK", '\ta\\rb - "one\\ntwo\\x1b[2J\tend\\x7f"'
        )
        yield a.check(
            "LIST_USERS",
            "c> LIST_USERS OK",
            "\tm\\x1b]0;x\\x07 1.2.3.4\\n 9",
            f"\talice 127.0.0.1 {self.indexer.users['alice']['addr'][1]}",
        )

    @defer.inlineCallbacks
    def test_the_search_extensions_fall_back(self):
        share = Path(self.mktemp())
        share.mkdir()
        (share / "canción_de_cuna.txt").write_bytes(b"a la nanita nana\n")
        (share / "b.txt").write_bytes(b"bee")
        a = self.shell("alice", share=share)
        sent, unanswered = self.indexer.requests, self.indexer.unanswered
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        # PUBLISH_FILE is closed unanswered: the same request as classic PUBLISH, once noted.
        yield a.check("PUBLISH canción_de_cuna.txt nana para dormir", "c> PUBLISH OK")
        self.assertRequest(
            sent[-1], b"PUBLISH", b"alice", "canción_de_cuna.txt".encode(), b"nana para dormir"
        )
        yield a.check("PUBLISH b.txt bees", "c> PUBLISH OK")
        self.assertRequest(sent[-1], b"PUBLISH", b"alice", b"b.txt", b"bees")
        yield a.check("PUBLISH b.txt again", "c> PUBLISH FAIL, CONTENT ALREADY PUBLISHED")
        # LIST_FILES likewise: LIST_CONTENT, every size unknown.
        for _ in range(2):
            yield a.check(
                "LIST_CONTENT alice",
                "c> LIST_CONTENT OK",
                '\tcanción_de_cuna.txt - "nana para dormir"',
                '\tb.txt - "bees"',
            )
            self.assertRequest(sent[-1], b"LIST_CONTENT", b"alice", b"alice")
        yield a.check("LIST_CONTENT nobody", "c> LIST_CONTENT FAIL, REMOTE USER DOES NOT EXIST")
        # SEARCH has no classic counterpart: the plain FAIL line, and why on stderr, each time.
        yield a.check("SEARCH cancion", "c> SEARCH FAIL")
        yield a.check("SEARCH --limit 3 cun", "c> SEARCH FAIL")
        unsupported = [line for line in a.proc.errlines if "does not support search" in line]
        self.assertEqual(len(unsupported), 2, a.proc.output())
        # Each extension was tried once in the session, then not asked again.
        for op in (b"PUBLISH_FILE", b"LIST_FILES", b"SEARCH"):
            self.assertEqual(unanswered.count(op), 1, (op, unanswered))
        for op in ("PUBLISH_FILE", "LIST_FILES"):
            said = [line for line in a.proc.errlines if f"does not know {op}" in line]
            self.assertEqual(len(said), 1, a.proc.output())
        self.assertEqual(len(a.lines), 14, a.proc.output())  # nothing else on stdout

    @defer.inlineCallbacks
    def test_other_error_codes_cut_replies_and_unknown_codes(self):
        a = self.shell("alice")
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        real = self.indexer.handle
        other_error = {b"REGISTER": 2, b"UNREGISTER": 2, b"CONNECT": 3, b"DISCONNECT": 3}
        other_error.update({b"PUBLISH": 4, b"DELETE": 4, b"LIST_USERS": 3, b"LIST_CONTENT": 4})
        commands = [
            ("REGISTER bob", "c> REGISTER FAIL"),
            ("UNREGISTER bob", "c> UNREGISTER FAIL"),
            ("PUBLISH f d", "c> PUBLISH FAIL"),
            ("DELETE f", "c> DELETE FAIL"),
            ("LIST_USERS", "c> LIST_USERS FAIL"),
            ("LIST_CONTENT bob", "c> LIST_CONTENT FAIL"),
            ("GET_FILE bob f g", "c> GET_FILE FAIL"),
            ("DISCONNECT alice", "c> DISCONNECT FAIL"),
        ]
        for reply in ("other error", "unknown code", "cut"):
            for command, line in commands:

                def answer(fields, ip, reply=reply):
                    if reply == "other error":
                        return bytes([other_error[fields[0]]])
                    if reply == "unknown code":
                        return b"\x09"
                    return real(fields, ip)[:-1] if fields[0].startswith(b"LIST") else b""

                self.indexer.handle = answer
                yield a.check(command, line)
        # CONNECT's own plain FAIL: a fresh shell, as this one stays connected.
        b = self.shell("bob")
        self.indexer.handle = lambda fields, ip: b"\x03"
        yield b.check("CONNECT bob", "c> CONNECT FAIL")

    @defer.inlineCallbacks
    def test_quit_disconnects_first(self):
        a = self.shell("alice")
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        code = yield a.quit()
        self.assertEqual(code, 0)
        self.assertRequest(self.indexer.requests[-1], b"DISCONNECT", b"alice")
        self.assertIsNone(self.indexer.users["alice"]["addr"])


class ClassicPeerTests(InteropTestCase):
    @defer.inlineCallbacks
    def test_get_file_falls_back_to_get_file(self):
        body = bytes(range(256)) * 40 + b"\0\0end"
        peer, peer_port = self.classic_peer({"data.bin": body, "fïlé-☃.bin": b"snow"})
        self.indexer.users["old"] = {"addr": ("localhost", str(peer_port)), "files": {}}
        a = self.shell("alice")
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        yield a.check("GET_FILE old data.bin got.bin", "c> GET_FILE OK")
        self.assertEqual((a.cwd / "got.bin").read_bytes(), body)
        self.assertEqual(peer.requests, [b"GET_FILE\0data.bin\0"])
        yield a.check("GET_FILE old fïlé-☃.bin dést.bin", "c> GET_FILE OK")
        self.assertEqual((a.cwd / "dést.bin").read_bytes(), b"snow")
        self.assertEqual(peer.requests[-1], "GET_FILE\0fïlé-☃.bin\0".encode())
        yield a.check("GET_FILE old missing.bin m.bin", "c> GET_FILE FAIL / FILE NOT EXIST")
        self.assertFalse((a.cwd / "m.bin").exists())
        yield a.check("GET_FILE nobody data.bin n.bin", "c> GET_FILE FAIL")
        self.assertEqual(sorted(p.name for p in a.cwd.iterdir()), ["dést.bin", "got.bin"])
        # No hash published there: each download that worked says it is unverified.
        unverified = [line for line in a.proc.errlines if "is unverified" in line]
        self.assertEqual(len(unverified), 2, a.proc.output())

    @defer.inlineCallbacks
    def test_a_classic_peer_that_ignores_the_operation(self):
        a = self.shell("alice")
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        # Its reply to FETCH is no FETCH reply; GET_FILE gets the file.
        for mode, body in (("short", b"hi"), ("empty", b""), ("long", b"x" * 100000)):
            factory = protocol.Factory.forProtocol(_SloppyPeerProtocol)
            factory.files = {"f": body}
            listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.addCleanup(listening.stopListening)
            self.indexer.users[mode] = {"addr": ("127.0.0.1", str(listening.getHost().port))}
            yield a.check(f"GET_FILE {mode} f out-{mode}", "c> GET_FILE OK")
            self.assertEqual((a.cwd / f"out-{mode}").read_bytes(), body, mode)

    @defer.inlineCallbacks
    def test_our_peer_serves_a_classic_requester(self):
        share = Path(self.mktemp())
        share.mkdir()
        body = b"\0\x01\x02binary\r\n\xff" * 1000
        (share / "file.bin").write_bytes(body)
        (share / "empty").write_bytes(b"")
        a = self.shell("alice", share=share)
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        yield a.check("PUBLISH file.bin some bytes", "c> PUBLISH OK")
        yield a.check("PUBLISH empty nothing", "c> PUBLISH OK")
        port = int(self.indexer.users["alice"]["addr"][1])
        reply = yield exchange(port, b"GET_FILE\0file.bin\0")
        self.assertEqual(reply, b"\x00" + body)
        reply = yield exchange(port, b"GET_FILE\0empty\0")
        self.assertEqual(reply, b"\x00")
        reply = yield exchange(port, b"GET_FILE\0nothere\0")
        self.assertEqual(reply, b"\x01")
        yield a.check("DISCONNECT alice", "c> DISCONNECT OK")

    @defer.inlineCallbacks
    def test_connect_with_the_indexer_down_leaves_no_port(self):
        # An indexer that accepts CONNECT's connection and closes it unanswered.
        self.indexer.users["alice"] = {"addr": None, "files": {}}
        real = self.indexer.handle
        self.indexer.handle = lambda fields, ip: (
            b"" if fields[0] == b"CONNECT" else real(fields, ip)
        )
        a = self.shell("alice")
        yield a.check("CONNECT alice", "c> CONNECT FAIL")
        raw = self.indexer.requests[-1]
        port = int(raw.split(b"\0")[3])
        # Commands run in order: once the next one answered, CONNECT has cleaned up.
        yield a.check("LIST_USERS", "c> LIST_USERS FAIL, USER NOT CONNECTED")
        yield self.assertFailure(exchange(port, b"GET_FILE\0x\0"), ConnectionRefusedError)
        self.assertEqual(len(a.lines), 2, a.proc.output())
