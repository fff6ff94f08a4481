"""GET_FILE between two clients of ours is TLS, and a hijacked address cannot serve it.

Real processes on loopback: the time service, the indexer and two
``p2p-client`` shells with fresh ``$P2P_HOME``s. alice registers (claiming
her name), connects and publishes; bob downloads from her.

- A listener on the path: alice's peer server listens on 127.0.0.2 while the
  indexer lists her at 127.0.0.1 (where her indexer connection came from), so
  a recording relay on 127.0.0.1 at her port sits between bob and alice.
  What it carries is a TLS session: neither the file name nor its bytes.
- The hijack: alice's client dies without a word (still listed), and
  mallory's peer server, holding another key, takes her address and serves
  ``MALWARE from mallory``. bob's GET_FILE is refused: FAIL, one stderr line
  saying the peer is not alice, nothing kept.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from p2p import tls
from p2p.peer.server import PeerServer
from tests.recording_relay import RecordingRelay
from tests.test_client_e2e import ShellProcess, Stack

REPORT = b"the real report\n" * 4000


class PeerTLSEndToEndTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def start(self, alice_listens: str = "127.0.0.1"):
        """alice online sharing report.txt, bob online; fires with alice's listed port."""
        self.stack = Stack(self)
        yield self.stack.start_time()
        yield self.stack.start_indexer()
        extra = ("--peer-listen", f"tcp:0:interface={alice_listens}")
        self.alice = ShellProcess(self, "alice", self.stack.port, self.stack.wsdl, extra=extra)
        (self.alice.share / "report.txt").write_bytes(REPORT)
        yield self.alice.check("REGISTER alice", "c> REGISTER OK")
        yield self.alice.check("CONNECT alice", "c> CONNECT OK")
        yield self.alice.check("PUBLISH report.txt quarterly figures", "c> PUBLISH OK")
        self.bob = ShellProcess(self, "bob", self.stack.port, self.stack.wsdl)
        yield self.bob.check("REGISTER bob", "c> REGISTER OK")
        yield self.bob.check("CONNECT bob", "c> CONNECT OK")
        listing = yield self.bob.run("LIST_USERS", 3)
        [row] = [line.split() for line in listing[1:] if line.split()[0] == "alice"]
        self.assertEqual(row[1], "127.0.0.1")
        return int(row[2])

    def kept(self) -> list[str]:
        """What bob's download left in his directory (temporary files included)."""
        return sorted(p.name for p in self.bob.cwd.iterdir() if "got" in p.name)

    @defer.inlineCallbacks
    def test_a_download_between_our_clients_is_tls_on_the_path(self):
        port = yield self.start(alice_listens="127.0.0.2")
        relay = RecordingRelay(self, "127.0.0.2", port)
        path = reactor.listenTCP(port, relay, interface="127.0.0.1")  # where alice is listed
        self.addCleanup(path.stopListening)
        yield self.bob.check("GET_FILE alice report.txt got.txt", "c> GET_FILE OK")
        self.assertEqual((self.bob.cwd / "got.txt").read_bytes(), REPORT)
        captured = bytes(relay.captured)
        self.assertGreater(len(captured), len(REPORT))  # the download went through the relay
        self.assertEqual(captured[0], 0x16)  # a TLS handshake record first
        self.assertNotIn(b"report.txt", captured)
        self.assertNotIn(b"the real report", captured)
        self.assertNotIn(b"FETCH", captured)

    @defer.inlineCallbacks
    def test_a_hijacked_address_cannot_serve_the_download(self):
        port = yield self.start()
        yield self.alice.proc.kill()  # gone without DISCONNECT: still listed at her port
        evil = self.alice.cwd.parent / "mallory-share"
        evil.mkdir()
        (evil / "report.txt").write_bytes(b"MALWARE from mallory")
        asked: list[str] = []
        mallory = PeerServer(
            evil,
            lambda name: asked.append(name) or True,
            reactor,
            identity=tls.Identity.generate("mallory"),
        )
        yield mallory.listen(f"tcp:{port}:interface=127.0.0.1")
        self.addCleanup(mallory.stop)
        lines = yield self.bob.run("GET_FILE alice report.txt got.txt", 1)
        self.assertEqual(lines, ["c> GET_FILE FAIL"], self.bob.proc.output())
        why = [line for line in self.bob.proc.errlines if "GET_FILE" in line]
        self.assertEqual(len(why), 1, self.bob.proc.output())
        self.assertIn(f"the peer at 127.0.0.1:{port} is not alice", why[0])
        self.assertIn("key differs", why[0])
        self.assertEqual(self.kept(), [])
        self.assertEqual(asked, [], "bob's request must not reach mallory")
