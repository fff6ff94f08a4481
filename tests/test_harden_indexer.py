"""Adversarial tests of the indexer (protocol.md section 1).

Deterministic fuzzing over in-memory transports: random valid and invalid
requests, split at random points, checked against a tiny reference model of the
protocol (dicts of users, addresses and files) written from protocol.md alone.
Invariants: at most one reply per connection (one code valid for the OP, or a
listing after 0), no byte for an unknown OP, a refused request changes neither
memory nor SQLite, and a valid request gets the model's code and listing. Trial
fails any test that logs an error, so "never raises" is checked too.

A few end-to-end checks against a real ``twistd p2p-indexer`` cover what an
in-memory transport cannot: a slowloris client, a reset mid-reply, a client that
never reads a large listing, and a half-close after the request.
"""

from __future__ import annotations

import random
import socket
import unicodedata

from twisted.internet import defer, protocol, reactor, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from p2p import wire
from tests.support import deadline, exchange, indexer_port, spawn_twistd
from tests.test_indexer_e2e import indexer_db
from tests.test_indexer_protocol import DT, Harness

OPS = list(wire.OPS)
SEED = 20261125

# --- The reference model (protocol.md section 1, independent of p2p.wire's checks) ---

LIMIT = {
    "op": 32,
    "datetime": 64,
    "user": 256,
    "name": 256,
    "file": 256,
    "text": 256,
    "words": 256,
}


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _cc(ch: str) -> bool:
    return unicodedata.category(ch) == "Cc"


def model_valid(kind: str, raw: bytes) -> bool:
    """Whether protocol.md accepts ``raw`` as a field of ``kind``."""
    if kind == "port":
        return 1 <= len(raw) <= 5 and all(0x30 <= b <= 0x39 for b in raw) and 1 <= int(raw) <= 65535
    # Section 8: a size is 1-20 ASCII digits up to 2**63-1, a limit 1-4 up to 1000.
    if kind == "size":
        return 1 <= len(raw) <= 20 and all(0x30 <= b <= 0x39 for b in raw) and int(raw) < 2**63
    if kind == "limit":
        return 1 <= len(raw) <= 4 and all(0x30 <= b <= 0x39 for b in raw) and 1 <= int(raw) <= 1000
    if kind == "sha256":
        return len(raw) == 64 and all(b in b"0123456789abcdef" for b in raw)
    if kind == "mode":
        return raw in (b"new", b"replace")
    if not 1 <= len(raw) <= LIMIT[kind]:
        return False
    text = _utf8(raw)
    if text is None:
        return False
    if kind == "name":
        return not any(ch.isspace() or _cc(ch) for ch in text)
    if kind == "file":  # a file name may hold spaces, never a control character
        return not any(_cc(ch) for ch in text)
    if kind == "user":  # a name, and no look-alike: NFC, no format (Cf) characters
        return not any(
            ch.isspace() or _cc(ch) or unicodedata.category(ch) == "Cf" for ch in text
        ) and unicodedata.is_normalized("NFC", text)
    if kind in ("text", "words"):
        return not any(_cc(ch) and ch != "\t" for ch in text)
    # DATETIME ends up in an audit record, which the logger stores as one line.
    return not any(_cc(ch) or ch in "\u2028\u2029" for ch in text)


ARG_KINDS = {
    "REGISTER": (),
    "UNREGISTER": (),
    "CONNECT": ("port",),
    "DISCONNECT": (),
    "PUBLISH": ("file", "text"),
    "DELETE": ("file",),
    "LIST_USERS": (),
    "LIST_CONTENT": ("name",),
    "LIST_PEERS": (),
    "ALIVE": (),
    "HOLD": (),
    "PUBLISH_FILE": ("file", "text", "size", "sha256", "mode"),
    "LIST_FILES": ("name",),
    "SEARCH": ("words", "limit"),
    "SOURCES": ("sha256",),
}
ERROR = {"REGISTER": 2, "UNREGISTER": 2, "CONNECT": 3, "DISCONNECT": 3}


def _listing(rows) -> bytes:
    rows = list(rows)
    out = str(len(rows)).encode() + b"\0"
    for row in rows:
        out += b"".join(str(v).encode() + b"\0" for v in row)
    return out


class Model:
    """users: name -> files (name -> description); connected: name -> (ip, port), in order."""

    def __init__(self) -> None:
        self.users: dict[str, dict[str, str]] = {}
        self.connected: dict[str, tuple[str, int]] = {}
        #: (owner, file) -> (size, sha256) as LIST_FILES shows them ("-" when not published).
        self.identity: dict[tuple[str, str], tuple[str, str]] = {}

    def apply(self, op: str, user: str, args: list, ip: str) -> bytes:
        """The expected reply bytes of a well-formed request."""
        if op == "HOLD":  # only over TLS: a plaintext request gets the error code
            return b"\3"
        exists = user in self.users
        online = user in self.connected
        if op == "REGISTER":
            if exists:
                return b"\1"
            self.users[user] = {}
            return b"\0"
        if not exists:
            return b"\1"
        if op == "UNREGISTER":
            if online:
                return b"\2"
            del self.users[user]
            self.identity = {k: v for k, v in self.identity.items() if k[0] != user}
            return b"\0"
        if op == "CONNECT":
            if online:
                return b"\2"
            self.connected[user] = (ip, int(args[0]))
            return b"\0"
        if not online:
            return b"\2"
        files = self.users[user]
        if op == "DISCONNECT":
            del self.connected[user]
            return b"\0"
        if op == "PUBLISH":
            if args[0] in files:
                return b"\3"
            files[args[0]] = args[1]
            self.identity.pop((user, args[0]), None)
            return b"\0"
        if op == "DELETE":
            if args[0] not in files:
                return b"\3"
            del files[args[0]]
            self.identity.pop((user, args[0]), None)
            return b"\0"
        if op == "LIST_USERS":
            return b"\0" + _listing((n, a[0], a[1]) for n, a in self.connected.items())
        if op == "ALIVE":  # the extension of section 7: the lease, 60 s by default
            return b"\x0060\x00"
        if op == "LIST_PEERS":  # no request here has an identity: every name is unclaimed
            return b"\0" + _listing((n, a[0], a[1], "-") for n, a in self.connected.items())
        if op == "LIST_CONTENT":
            if args[0] not in self.users:
                return b"\3"
            return b"\0" + _listing(self.users[args[0]].items())
        if op == "PUBLISH_FILE":
            name, description, size, sha256, mode = args
            if name in files and mode == "new":
                return b"\3"
            files[name] = description
            self.identity[(user, name)] = (str(int(size)), sha256)
            return b"\0"
        if op == "LIST_FILES":
            owner = args[0]
            if owner not in self.users:
                return b"\3"
            return b"\0" + _listing(
                (n, d, *self.identity.get((owner, n), ("-", "-")))
                for n, d in self.users[owner].items()
            )
        if op == "SEARCH":  # the code here; Fuzz checks each hit is a connected owner's file
            return b"\0" if any(ch.isalnum() for ch in args[0]) else b"\3"
        if op == "SOURCES":  # connected owners but the asker, by owner then name, at most 64
            found = sorted(
                (owner, name)
                for (owner, name), (_size, sha256) in self.identity.items()
                if sha256 == args[0] and owner != user and owner in self.connected
            )
            return b"\0" + _listing((o, n, *self.connected[o]) for o, n in found[:64])
        raise AssertionError(op)


# --- Random fields ------------------------------------------------------------

#: Valid names, some multi-byte (a 4-byte character will straddle chunk splits).
NAMES = ["alice", "bob", "é", "名前", "\U0001f600x", "a.b", "~!", "n" * 256, "é" * 128]
#: Characters a name must never contain, and some it may (no whitespace, not Cc).
BAD_IN_NAME = [" ", "\t", "\n", "\x7f", "\x85", "\xa0", "\u2028", "\u3000", "\x1f", "\x9f"]
OK_IN_NAME = ["\u200b", "\ufeff", "\u00ad", "\U0010ffff"]
BAD_UTF8 = [
    b"\xc0\xaf",  # overlong '/'
    b"\xe0\x80\xaf",  # overlong, 3 bytes
    b"\xed\xa0\x80",  # a surrogate encoded in UTF-8
    b"\x80",  # lone continuation byte
    b"\xf0\x9f\x98",  # truncated 4-byte character
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xff",
]
PORTS_OK = [b"1", b"80", b"080", b"00080", b"65535", b"9090"]
PORTS_BAD = [
    b"0",
    b"65536",
    b"+80",
    b" 80",
    b"80 ",
    b"-1",
    b"\xd9\xa3",
    b"\xef\xbc\x98",
    b"1_0",
    b"000080",
    b"99999",
    b"0x50",
    b"",
    b"8\x000"[:1] + b"a",
]


#: Good and bad values of the fields of protocol.md section 8.
SECTION_8_FIELDS = {
    "size": (
        [b"0", b"12", b"00012", b"9223372036854775807"],
        [b"", b"-1", b"+1", b"1 ", b"1.0", b"9223372036854775808", b"1" * 21, b"\xd9\xa3"],
    ),
    "sha256": (
        [b"0123456789abcdef" * 4, b"f" * 64],
        [b"", b"-", b"A" * 64, b"0" * 63, b"0" * 65, b"g" * 64],
    ),
    "mode": ([b"new", b"replace"], [b"", b"NEW", b"add", b"new ", b"\xff"]),
    "words": (
        [b"a", b"alice b", "\u00e9 \u540d".encode(), b"fi*", b'"OR" NEAR(x', b"*:^-", b"w" * 256],
        [b"", b"w" * 257, b"a\nb", b"\xc3\x28"],
    ),
    "limit": (
        [b"1", b"3", b"100", b"1000", b"0100"],
        [b"", b"0", b"1001", b"-1", b"1e3", b"01000"],
    ),
}


def random_name(rng: random.Random, valid: bool) -> bytes:
    if valid:
        base = rng.choice(NAMES[:6]) if rng.random() < 0.8 else rng.choice(NAMES)
        if rng.random() < 0.1:
            base += rng.choice(OK_IN_NAME)
        return base.encode()[:256] if len(base.encode()) <= 256 else base[:64].encode()
    kind = rng.randrange(5)
    if kind == 0:
        return b""
    if kind == 1:
        return b"x" * rng.choice([257, 300])
    if kind == 2:
        return "é".encode() * 128 + b"x"  # 257 bytes, 129 characters
    if kind == 3:
        return rng.choice(BAD_UTF8) + b"x" if rng.random() < 0.5 else b"x" + rng.choice(BAD_UTF8)
    return ("a" + rng.choice(BAD_IN_NAME) + "b").encode()


def random_field(rng: random.Random, kind: str, valid: bool) -> bytes:
    if kind == "port":
        return rng.choice(PORTS_OK if valid else PORTS_BAD)
    if kind in ("user", "name"):
        return random_name(rng, valid)
    if kind == "file":  # spaces are fine there: the model tells which of these are valid
        spaced = ["my file.txt", " lead", "trail ", "a\u3000b", "x\u00a0y"]
        return (
            rng.choice(spaced).encode() if valid and rng.random() < 0.3 else random_name(rng, valid)
        )
    if kind == "text":
        if valid:
            return rng.choice(["a file", "tab\there", "é ünï", "d" * 256, "\u2028sep"]).encode()
        return rng.choice([b"", b"d" * 257, b"line\nbreak", b"nul\x01", b"\xc3\x28", b"\x85"])
    if kind in SECTION_8_FIELDS:
        good, bad = SECTION_8_FIELDS[kind]
        return rng.choice(good if valid else bad)
    if kind == "datetime":
        if valid:
            return rng.choice([DT, "x", "d" * 64]).encode()
        return rng.choice(
            [b"", b"d" * 65, b"a\rb", b"\xff", "a\u2028b".encode(), "\u2029".encode()]
        )
    raise AssertionError(kind)


def split_randomly(rng: random.Random, data: bytes) -> list[bytes]:
    if not data:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data) + 1), min(len(data), rng.randrange(1, 6))))
    out, start = [], 0
    for cut in cuts:
        out.append(data[start:cut])
        start = cut
    if start < len(data):
        out.append(data[start:])
    return out


def snapshot(h: Harness) -> tuple:
    """Memory and SQLite, to prove a refused request changed nothing."""
    memory = (
        {n: (r.address, dict(r.files)) for n, r in h.directory.users.items()},
        list(h.directory.connected.items()),
    )
    db = h.store.db
    tables = tuple(
        db.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
        for table in ("users", "files", "outbox")
    )
    return memory, tables


class Fuzz(TestCase):
    """Thousands of random requests, split anywhere, against the reference model."""

    harness = Harness

    def run_fuzz(self, seed: int, count: int, audit: bool) -> None:
        rng = random.Random(seed)
        h = self.harness(self, audit=audit)
        model = Model()
        pool = [n.encode() for n in NAMES[:6]]
        for i in range(count):
            op = rng.choice(OPS)
            valid = rng.random() < 0.75
            fields = [op.encode()]
            kinds = ["datetime", "user", *ARG_KINDS[op]]
            bad_at = rng.randrange(len(kinds)) if not valid else -1
            for j, kind in enumerate(kinds):
                if j == bad_at:
                    fields.append(random_field(rng, kind, False))
                elif kind in ("user", "name", "file") and rng.random() < 0.9:
                    fields.append(rng.choice(pool))
                else:
                    fields.append(random_field(rng, kind, True))
            # Independent judgement of the whole request, field by field, in order.
            expected = None
            for kind, raw in zip(kinds, fields[1:], strict=True):
                if not model_valid(kind, raw):
                    expected = bytes([wire.OPS[op].error])
                    break
            unknown = rng.random() < 0.03
            if unknown:
                fields[0] = rng.choice([b"register", b"FROB", b"", b"REGISTER ", b"R" * 32])
            data = b"".join(f + b"\0" for f in fields)
            if rng.random() < 0.2:
                data += rng.choice([b"junk", b"\0\0", wire.encode_request("REGISTER", DT, "zz")])
            before = snapshot(h)
            proto, transport = h.connect()
            for chunk in split_randomly(rng, data):
                proto.dataReceived(chunk)
            h.clock.advance(0)
            reply = transport.value()
            proto.connectionLost(None)
            where = f"request {i}: {data[:120]!r}"
            self.assertTrue(transport.disconnecting or transport.disconnected, where)
            if unknown:
                self.assertEqual(reply, b"", where)
                self.assertEqual(snapshot(h), before, where)
                continue
            if expected is not None:
                self.assertEqual(reply, expected, where)
                self.assertEqual(snapshot(h), before, where)
                continue
            args = [f.decode() for f in fields[3:]]
            want = model.apply(op, fields[2].decode(), args, "127.0.0.1")
            if op == "SEARCH" and want == b"\0":
                self.assert_hits(reply, model, int(args[1]), where)
                continue
            self.assertEqual(reply, want, where)
            self.assertIn(reply[0], wire.OPS[op].codes, where)
        # Memory and the store agree with the model at the end, and after a reload.
        users = {n: dict(r.files) for n, r in h.directory.users.items()}
        self.assertEqual(users, model.users)
        self.assertEqual({n: a for n, a in h.directory.connected.items()}, model.connected)
        h.directory.load()
        self.assertEqual({n: dict(r.files) for n, r in h.directory.users.items()}, model.users)
        # Every audit record is one the logger accepts: a refused one would stop the
        # relay (it retries the first unacknowledged record) and with it all auditing.
        from p2p.logger.program import valid_record

        for _seq, record in h.store.db.execute("SELECT seq, record FROM outbox"):
            self.assertTrue(valid_record(record), record)
        self.assertEqual(h.factory.open_connections, 0)

    def assert_hits(self, reply: bytes, model: Model, limit: int, where: str) -> None:
        """A SEARCH reply: code 0, at most ``limit`` hits, each a connected owner's file."""
        self.assertEqual(reply[:1], b"\0", where)
        fields = reply[1:].split(b"\0")
        self.assertEqual(fields.pop(), b"", where)
        count = int(fields[0])
        self.assertLessEqual(count, limit, where)
        self.assertEqual(len(fields), 1 + 6 * count, where)
        for i in range(count):
            owner, name, description, size, sha256, _copies = (
                f.decode() for f in fields[1 + 6 * i : 7 + 6 * i]
            )
            self.assertIn(owner, model.connected, where)
            self.assertEqual(model.users[owner].get(name), description, where)
            self.assertEqual(model.identity.get((owner, name), ("-", "-")), (size, sha256), where)

    def test_fuzz_against_model(self) -> None:
        self.run_fuzz(SEED, 3000, audit=False)

    def test_fuzz_against_model_audited(self) -> None:
        self.run_fuzz(SEED + 1, 1500, audit=True)


class EdgeCases(TestCase):
    """Each limit at exactly the limit and one over, and the odd inputs one by one."""

    def setUp(self) -> None:
        self.h = Harness(self)
        self.assertEqual(self.h.request("REGISTER", "alice"), b"\0")

    def code(self, raw_fields: list[bytes]) -> bytes:
        before = snapshot(self.h)
        reply, transport = self.h.send(b"".join(f + b"\0" for f in raw_fields))
        self.assertTrue(transport.disconnecting)
        if reply not in (b"", b"\0"):
            self.assertEqual(snapshot(self.h), before, raw_fields)
        return reply

    def test_ports(self) -> None:
        for port in PORTS_OK:
            h = Harness(self)
            h.request("REGISTER", "p")
            reply, _ = h.send(b"CONNECT\0" + DT.encode() + b"\0p\0" + port + b"\0")
            self.assertEqual(reply, b"\0", port)
            self.assertEqual(h.directory.connected["p"], ("127.0.0.1", int(port)))
        for port in PORTS_BAD:
            self.assertEqual(self.code([b"CONNECT", DT.encode(), b"alice", port]), b"\3", port)
        self.assertNotIn("alice", self.h.directory.connected)

    def test_names_with_unicode_whitespace_and_controls(self) -> None:
        for ch in BAD_IN_NAME:
            self.assertEqual(self.code([b"REGISTER", DT.encode(), ("a" + ch).encode()]), b"\2", ch)
            self.assertEqual(self.code([b"REGISTER", DT.encode(), (ch + "a").encode()]), b"\2", ch)
        self.assertEqual(set(self.h.directory.users), {"alice"})

    def test_line_separator_in_datetime_refused(self) -> None:
        """U+2028/U+2029 in DATETIME would reach the audit record, which the logger refuses."""
        h = Harness(self, audit=True)
        for sep in ("\u2028", "\u2029"):
            dt = f"17/12/2014{sep}13:20:35".encode()
            reply, _ = h.send(b"REGISTER\0" + dt + b"\0eve\0")
            self.assertEqual(reply, b"\2", sep)
        self.assertEqual(h.store.outbox_count(), 0)
        self.assertNotIn("eve", h.directory.users)

    def test_bad_utf8_everywhere(self) -> None:
        for bad in BAD_UTF8:
            self.assertEqual(self.code([b"REGISTER", DT.encode(), bad]), b"\2", bad)
            self.assertEqual(self.code([b"REGISTER", bad, b"zed"]), b"\2", bad)
        self.assertEqual(set(self.h.directory.users), {"alice"})

    def test_every_limit_at_and_over(self) -> None:
        self.h.request("CONNECT", "alice", 7000)
        n256, n257 = b"n" * 256, b"n" * 257
        d64, d65 = b"d" * 64, b"d" * 65
        self.assertEqual(self.code([b"REGISTER", d64, n256]), b"\0")
        self.assertEqual(self.code([b"REGISTER", d65, b"x1"]), b"\2")
        self.assertEqual(self.code([b"REGISTER", d64, n257]), b"\2")
        self.assertEqual(self.code([b"PUBLISH", d64, b"alice", n256, b"t" * 256]), b"\0")
        self.assertEqual(self.code([b"PUBLISH", d64, b"alice", b"f2", b"t" * 257]), b"\4")
        self.assertEqual(self.code([b"PUBLISH", d64, b"alice", n257, b"t"]), b"\4")
        # A field over its limit is refused before its NUL arrives, at exactly limit + 1.
        for prefix, limit, code in [
            (b"", 32, b""),
            (b"REGISTER\0", 64, b"\2"),
            (b"REGISTER\0d\0", 256, b"\2"),
            (b"PUBLISH\0d\0alice\0f\0", 256, b"\4"),
        ]:
            proto, transport = self.h.connect()
            proto.dataReceived(prefix + b"x" * limit)
            self.assertFalse(transport.disconnecting, prefix)
            proto.dataReceived(b"x")
            self.assertTrue(transport.disconnecting, prefix)
            self.assertEqual(transport.value(), code, prefix)

    def test_nul_at_edges_makes_empty_fields(self) -> None:
        self.assertEqual(self.code([b"REGISTER", b"", b"x"]), b"\2")
        self.assertEqual(self.code([b"REGISTER", DT.encode(), b""]), b"\2")
        self.assertEqual(self.code([b"", b"REGISTER", DT.encode(), b"x"]), b"")
        self.assertEqual(self.code([b"REGISTER", b""]), b"\2")  # "REGISTER\0\0"
        # A NUL inside a name ends it: "a\0b" is the user "a" and an ignored extra field.
        self.assertEqual(self.code([b"REGISTER", DT.encode(), b"a", b"b"]), b"\0")
        self.assertEqual(set(self.h.directory.users), {"alice", "a"})

    def test_extra_bytes_after_request_ignored(self) -> None:
        reply = self.code([b"REGISTER", DT.encode(), b"eve", b"REGISTER", DT.encode(), b"mal"])
        self.assertEqual(reply, b"\0")
        self.assertNotIn("mal", self.h.directory.users)

    def test_store_broken_for_good(self) -> None:
        """Every statement fails (disk gone): each request gets its error code, nothing raises.

        Before the fix the reload after the failed write raised out of
        ``dataReceived``: no reply byte, an unhandled error logged.
        """
        import sqlite3

        def broken(*args, **kwargs):
            raise sqlite3.OperationalError("disk I/O error")

        begin, load = self.h.store._begin, self.h.store.load
        self.patch(self.h.store, "_begin", broken)
        self.patch(self.h.store, "load", broken)
        for _ in range(3):
            self.assertEqual(self.h.request("REGISTER", "frank"), b"\2")
            self.assertEqual(self.h.request("CONNECT", "alice", 5), b"\3")
        # The write that failed and the first failed reload; later retries stay quiet.
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 2)
        # The disk comes back: the next request reloads and is served normally.
        self.patch(self.h.store, "_begin", begin)
        self.patch(self.h.store, "load", load)
        self.assertEqual(self.h.request("REGISTER", "frank"), b"\0")
        self.assertEqual(snapshot(self.h)[0][0], {"alice": (None, {}), "frank": (None, {})})

    def test_failed_commit_and_failed_reload_acknowledge_nothing(self) -> None:
        """A commit fails and so does the reload: no 0 for a change that was rolled back.

        Before the fix the flush raised (unhandled error, no reply at all) and
        memory kept the rolled-back users, so later requests saw phantoms.
        """
        import sqlite3

        def broken(*args, **kwargs):
            raise sqlite3.OperationalError("disk I/O error")

        load = self.h.store.load
        real_commit = self.h.store.commit

        def failing_commit():
            self.h.store.rollback()
            raise sqlite3.OperationalError("disk I/O error")

        self.patch(self.h.store, "commit", failing_commit)
        self.patch(self.h.store, "load", broken)
        transports = []
        for user in ("ghost1", "ghost2"):
            proto, transport = self.h.connect()
            proto.dataReceived(wire.encode_request("REGISTER", DT, user))
            transports.append(transport)
        self.h.clock.advance(0)
        self.assertEqual([t.value() for t in transports], [b"\2", b"\2"])
        self.assertTrue(all(t.disconnecting for t in transports))
        self.flushLoggedErrors(sqlite3.OperationalError)
        self.patch(self.h.store, "commit", real_commit)
        self.patch(self.h.store, "load", load)
        # No phantom: the store never had ghost1, and memory must agree.
        self.assertEqual(self.h.request("REGISTER", "ghost1"), b"\0")
        self.assertEqual(self.h.request("PUBLISH", "ghost2", "f", "d"), b"\1")
        self.assertEqual([r[0] for r in self.h.store.iter_users()], ["alice", "ghost1"])


class LargeReplies(TestCase):
    """A large listing to clients that never read costs one chunk each, not a copy each."""

    def test_listing_is_handed_out_chunk_by_chunk(self) -> None:
        from p2p.indexer import protocol as protocol_module

        CHUNK = getattr(protocol_module, "REPLY_CHUNK", 64 * 1024)
        h = Harness(self, max_connections=10_000)
        model = Model()
        for i in range(1200):
            user = f"u{i:04d}" + "x" * 200
            for op, args in (("REGISTER", ()), ("CONNECT", (1000 + i,))):
                self.assertEqual(
                    h.request(op, user, *args), model.apply(op, user, args, "127.0.0.1")
                )
        expected = model.apply("LIST_USERS", "u0000" + "x" * 200, (), "127.0.0.1")
        self.assertGreater(len(expected), 4 * CHUNK)
        pending = []
        for _ in range(50):
            proto, transport = h.connect()
            proto.dataReceived(wire.encode_request("LIST_USERS", DT, "u0000" + "x" * 200))
            pending.append(transport)
        h.clock.advance(0)
        # Before the fix each transport held the whole listing (50 copies).
        held = sum(len(t.value()) for t in pending)
        self.assertLessEqual(held, 50 * CHUNK)
        for transport in pending:
            self.assertIsNotNone(transport.producer)
            for _ in range(1000):
                if transport.producer is None:
                    break
                transport.producer.resumeProducing()
            self.assertEqual(transport.value(), expected)
            self.assertTrue(transport.disconnecting)


class LargeReplyOverTCP(TestCase):
    """Over a real socket: a listing larger than the socket buffers, to tricky clients."""

    timeout = 60

    @defer.inlineCallbacks
    def test_half_close_during_large_listing(self):
        """EOF from a client that half-closed must not cut the listing being sent.

        With the chunked reply the transport kept reading, so the EOF ended the
        connection mid-listing (3 of 6.6 MB arrived); it must stop reading as
        loseConnection did.
        """
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ServerEndpoint

        h = Harness(self)
        for i in range(30_000):
            user = f"u{i:05d}" + "u" * 200
            h.directory.handle(wire.REGISTER, DT, user, [])
            h.directory.handle(wire.CONNECT, DT, user, [1000], ("127.0.0.1", 1000))
        h.store.commit()
        h.factory.reactor = reactor
        expected = b"\0" + h.directory.handle(wire.LIST_USERS, DT, "u00000" + "u" * 200, [])[1]
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(h.factory)
        self.addCleanup(port.stopListening)

        def half_close() -> bytes:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
                s.settimeout(10)
                s.connect(("127.0.0.1", port.getHost().port))
                s.sendall(wire.encode_request("LIST_USERS", DT, "u00001" + "u" * 200))
                s.shutdown(socket.SHUT_WR)
                data = bytearray()
                while chunk := s.recv(65536):
                    data += chunk
                return bytes(data)

        reply = yield threads.deferToThread(half_close)
        self.assertEqual(len(reply), len(expected))
        self.assertEqual(reply, expected)


# --- End to end against twistd p2p-indexer -------------------------------------------


def _blocking_client(port: int, actions) -> bytes:
    """Run a raw socket conversation in a thread (for resets and half-closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return actions(s)


class _Slowloris(protocol.Protocol):
    """Sends ``request`` one byte every ``pace`` seconds; ``closed`` fires with
    ``(bytes sent, bytes received)`` when the connection ends."""

    def __init__(self, request: bytes, pace: float) -> None:
        self.request = request
        self.pace = pace
        self.sent = 0
        self.received = b""
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.sender = task.LoopingCall(self._one_byte)
        self.sender.start(self.pace)

    def _one_byte(self) -> None:
        if self.sent < len(self.request):
            self.transport.write(self.request[self.sent : self.sent + 1])
            self.sent += 1

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.sender.stop()
        self.closed.callback((self.sent, self.received))


class EndToEnd(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start(self, *options: str):
        proc = spawn_twistd(
            self,
            "p2p-indexer",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--db",
            indexer_db(self, ":memory:"),
            *options,
        )
        port = yield indexer_port(proc)
        return port, proc

    @defer.inlineCallbacks
    def well_behaved(self, port: int, user: str):
        reply = yield exchange(port, wire.encode_request("REGISTER", DT, user))
        self.assertEqual(reply, b"\0")

    @defer.inlineCallbacks
    def test_slowloris_is_cut_and_others_served(self):
        port, proc = yield self.start("--timeout", "0.5")
        request = wire.encode_request("REGISTER", DT, "slow")
        # The attack's pace: each byte well inside the timeout, the whole
        # request (about 7 s) far beyond it.
        slow = _Slowloris(request, 0.2)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), slow)
        self.addCleanup(lambda: slow.transport.connected and slow.transport.abortConnection())
        sent, received = yield deadline(slow.closed, 3.0)  # cut near the 0.5 s timeout
        self.assertEqual(received, b"")
        self.assertLess(sent, len(request), "cut before the request was complete")
        yield self.well_behaved(port, "fast")
        self.assertNotRegex(proc.output(), "Traceback|Unhandled")

    @defer.inlineCallbacks
    def test_reset_mid_reply_and_unread_listing(self):
        port, proc = yield self.start()
        for i in range(400):
            user = f"user{i:03d}" + "u" * 200
            yield exchange(port, wire.encode_request("REGISTER", DT, user))
            yield exchange(port, wire.encode_request("CONNECT", DT, user, 1000 + i))

        def reset_before_reading(s: socket.socket) -> bytes:
            import struct

            s.sendall(wire.encode_request("LIST_USERS", DT, "user000" + "u" * 200))
            s.recv(1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b""

        for _ in range(20):
            yield threads.deferToThread(_blocking_client, port, reset_before_reading)
        # Clients that never read their (large) listing, all at once.
        idle = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(wire.encode_request("LIST_USERS", DT, "user000" + "u" * 200))
            idle.append(s)
        self.addCleanup(lambda: [s.close() for s in idle])
        reply = yield exchange(port, wire.encode_request("LIST_USERS", DT, "user001" + "u" * 200))
        self.assertEqual(reply[:5], b"\x00400\x00")
        self.assertEqual(reply.count(b"\0"), 1 + 1 + 3 * 400)
        yield self.well_behaved(port, "after")

        self.assertNotRegex(proc.output(), "Traceback|Unhandled")

    @defer.inlineCallbacks
    def test_half_close_after_request_gets_reply(self):
        port, _proc = yield self.start()

        def half_close(s: socket.socket) -> bytes:
            s.sendall(wire.encode_request("REGISTER", DT, "half"))
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(100):
                data += chunk
            return data

        for i in range(20):
            reply = yield threads.deferToThread(_blocking_client, port, half_close)
            self.assertEqual(reply, b"\0" if i == 0 else b"\1", i)

    @defer.inlineCallbacks
    def test_connection_cap_then_served(self):
        port, _proc = yield self.start("--max-connections", "5", "--timeout", "1")
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        self.addCleanup(lambda: [s.close() for s in held])
        for s in held:
            s.sendall(b"REGISTER\0")  # half a request each

        def refused(s: socket.socket) -> bytes:
            try:
                return s.recv(10)
            except ConnectionResetError:
                return b""

        extra = yield threads.deferToThread(_blocking_client, port, refused)
        self.assertEqual(extra, b"")  # closed at once beyond the cap
        # After the timeout the slots are free again.
        yield threads.deferToThread(lambda: [refused(s) for s in held])
        yield self.well_behaved(port, "capped")
