"""Issue 8 as it will be checked: names no one can forge, against real processes.

alice registers, connects and publishes with our client (her own fresh
``$P2P_HOME``). Then every impersonation of the issue is tried from raw
classic sockets: each is refused with its error code while alice stays listed
at her own peer port with her files intact; bob (another client of ours)
downloads from alice and gets the right bytes; the private-key attack gets
code 1 from alice's peer; what bob's client sends the indexer, recorded by a
relay on the path, holds no user name, file name or description; and a classic
client written apart from this project runs its whole scenario meanwhile.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.recording_relay import RecordingRelay
from tests.support import exchange
from tests.test_client_e2e import ShellProcess, Stack

WHEN = "27/11/2026 12:00:00"


def request(op: str, *fields: str) -> bytes:
    """A classic request built by hand, the way another implementation writes it."""
    return b"".join(f.encode() + b"\0" for f in (op, WHEN, *fields))


def classic_scenario(port: int, user: str) -> list[int]:
    """A whole classic life cycle on blocking sockets, one connection per request:
    the first byte of each reply (every one must be 0)."""
    steps = [
        request("REGISTER", user),
        request("CONNECT", user, "4555"),
        request("PUBLISH", user, "song.ogg", "a song"),
        request("LIST_USERS", user),
        request("LIST_CONTENT", user, user),
        request("DELETE", user, "song.ogg"),
        request("DISCONNECT", user),
        request("UNREGISTER", user),
    ]
    codes = []
    for data in steps:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(data)
            codes.append(s.recv(1)[0])
    return codes


class ClaimedNamesTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.stack = Stack(self)
        yield self.stack.start_time()
        yield self.stack.start_indexer()
        self.alice = ShellProcess(self, "alice", self.stack.port, self.stack.wsdl)
        secret = self.alice.share / "secret"
        secret.mkdir()
        (secret / "private.key").write_text("-----BEGIN PRIVATE KEY----- alice's\n")
        (self.alice.share / "report.txt").write_bytes(b"the real report\n" * 1000)
        yield self.alice.check("REGISTER alice", "c> REGISTER OK")
        yield self.alice.check("CONNECT alice", "c> CONNECT OK")
        yield self.alice.check("PUBLISH report.txt quarterly figures", "c> PUBLISH OK")
        listing = yield self.alice.run("LIST_USERS", 2)
        self.assertEqual(listing[0], "c> LIST_USERS OK")
        name, _ip, port = listing[1].split()
        self.assertEqual(name, "alice")
        self.alice_peer = int(port)

    @defer.inlineCallbacks
    def _alice_intact(self):
        """alice is still listed at her own peer port, with her one file."""
        yield self.alice.check(
            "LIST_USERS", "c> LIST_USERS OK", f"\talice 127.0.0.1 {self.alice_peer}"
        )
        yield self.alice.check(
            "LIST_CONTENT alice", "c> LIST_CONTENT OK", '\treport.txt 16000 "quarterly figures"'
        )

    @defer.inlineCallbacks
    def test_every_impersonation_from_a_raw_socket_is_refused(self):
        port = self.stack.port
        attempts = [
            # (request, its "any other error" code)
            (request("DISCONNECT", "alice"), 3),
            (request("CONNECT", "alice", "6666"), 3),
            (request("PUBLISH", "alice", "secret/private.key", "mine now"), 4),
            (request("DELETE", "alice", "report.txt"), 4),
            (request("UNREGISTER", "alice"), 2),
            (request("LIST_USERS", "alice"), 3),
            (request("LIST_CONTENT", "alice", "alice"), 4),
            (request("LIST_PEERS", "alice"), 3),
            (request("REGISTER", "alice"), 2),
        ]
        for data, code in attempts:
            reply = yield exchange(port, data)
            self.assertEqual(reply, bytes([code]), data)
        # The hijack of the issue: DISCONNECT then CONNECT at the attacker's port.
        for data in (request("DISCONNECT", "alice"), request("CONNECT", "alice", "6666")):
            reply = yield exchange(port, data)
            self.assertEqual(reply, b"\x03")
        yield self._alice_intact()

    @defer.inlineCallbacks
    def test_the_private_key_attack_gets_code_1_and_bob_gets_the_real_file(self):
        # Refused at the indexer ...
        for data, code in (
            (request("CONNECT", "alice", "6666"), 3),
            (request("PUBLISH", "alice", "secret/private.key", "x"), 4),
            (request("DISCONNECT", "alice"), 3),
        ):
            reply = yield exchange(self.stack.port, data)
            self.assertEqual(reply, bytes([code]))
        # ... and alice's peer serves only what alice published from here.
        for ask in (b"GET_FILE\0secret/private.key\0", b"FETCH\0secret/private.key\x000\0"):
            reply = yield exchange(self.alice_peer, ask)
            self.assertEqual(reply, b"\x01", ask)
        bob = ShellProcess(self, "bob", self.stack.port, self.stack.wsdl)
        yield bob.check("REGISTER bob", "c> REGISTER OK")
        yield bob.check("CONNECT bob", "c> CONNECT OK")
        yield bob.check("GET_FILE alice report.txt got.txt", "c> GET_FILE OK")
        self.assertEqual((bob.cwd / "got.txt").read_bytes(), b"the real report\n" * 1000)
        yield bob.check(
            "GET_FILE alice secret/private.key key.txt", "c> GET_FILE FAIL / FILE NOT EXIST"
        )
        self.assertFalse((bob.cwd / "key.txt").exists())
        yield self._alice_intact()

    @defer.inlineCallbacks
    def test_what_our_client_sends_the_indexer_hides_every_name(self):
        relay = RecordingRelay(self, "127.0.0.1", self.stack.port)
        bob = ShellProcess(self, "bob", relay.listening_port, self.stack.wsdl)
        (bob.share / "holiday-photos.tar").write_bytes(b"photos")
        yield bob.check("REGISTER bobby-the-user", "c> REGISTER OK")
        yield bob.check("CONNECT bobby-the-user", "c> CONNECT OK")
        yield bob.check("PUBLISH holiday-photos.tar summer in the alps", "c> PUBLISH OK")
        yield bob.check(
            "LIST_CONTENT alice", "c> LIST_CONTENT OK", '\treport.txt 16000 "quarterly figures"'
        )
        yield bob.check("GET_FILE alice report.txt got.txt", "c> GET_FILE OK")
        yield bob.check("DELETE holiday-photos.tar", "c> DELETE OK")
        yield bob.check("DISCONNECT bobby-the-user", "c> DISCONNECT OK")
        captured = bytes(relay.captured)
        self.assertGreater(len(captured), 1000)  # the relay did carry the session
        for secret in (
            b"bobby-the-user",
            b"alice",
            b"holiday-photos",
            b"summer in the alps",
            b"report.txt",
            b"quarterly",
            b"REGISTER",
            b"PUBLISH",
        ):
            self.assertNotIn(secret, captured)

    @defer.inlineCallbacks
    def test_a_classic_client_runs_its_whole_scenario_meanwhile(self):
        codes = yield threads.deferToThread(classic_scenario, self.stack.port, "carol")
        self.assertEqual(codes, [0] * 8)
        yield self._alice_intact()
