"""GET_FILE as a user meets it: where the file lands, what an existing file
becomes, what a failure leaves behind, and ending the shell mid-download.

Peers here are small fakes (one that cuts a transfer short, one that stalls) or
the shell's own peer server; the indexer is the classic one of
``test_client_interop``.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, protocol, reactor

from tests.support import deadline, poll_until
from tests.test_client_interop import InteropTestCase
from tests.test_client_tty import _TricklingPeer


class _FakeFetchPeer(protocol.Protocol):
    """Answers FETCH with a size of 1000 and 10 bytes, then cuts or stalls."""

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"FETCH\0") and not self.factory.answered:
            self.factory.answered = True
            self.transport.write(b"\x001000\x00" + b"x" * 10)
            if self.factory.cut:
                self.transport.loseConnection()


class GetFileTests(InteropTestCase):
    def fake_peer(self, cut: bool) -> str:
        """Start a fake FETCH peer, list it as user ``fake``; returns the name."""
        factory = protocol.Factory.forProtocol(_FakeFetchPeer)
        factory.answered = False
        factory.cut = cut
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = str(listening.getHost().port)
        self.indexer.users["fake"] = {"addr": ("127.0.0.1", port), "files": {}}
        return "fake"

    @defer.inlineCallbacks
    def online(self):
        """A shell connected as alice, sharing one file; fires with it."""
        share = Path(self.mktemp())
        share.mkdir()
        (share / "song.ogg").write_bytes(b"la la la" * 1000)
        a = self.shell("alice", share=share)
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        yield a.check("PUBLISH song.ogg a song", "c> PUBLISH OK")
        return a

    def leftovers(self, directory: Path) -> list[str]:
        """Hidden download files: temporary ones, and the partial data kept to resume."""
        return sorted(
            p.name
            for p in directory.iterdir()
            if p.name.endswith((".part", ".p2p-part", ".p2p-part.json"))
        )

    @defer.inlineCallbacks
    def test_from_yourself_over_an_existing_file(self):
        a = yield self.online()
        (a.cwd / "old.ogg").write_bytes(b"old contents")
        # Not replaced without a word: a script says --force.
        asked = len(self.indexer.requests)
        yield a.check("GET_FILE alice song.ogg old.ogg", "c> GET_FILE FAIL")
        self.assertEqual((a.cwd / "old.ogg").read_bytes(), b"old contents")
        self.assertEqual(len(self.indexer.requests), asked, "refused before asking anyone")
        self.assertTrue(any("add --force" in x for x in a.proc.errlines), a.proc.output())
        yield a.check("GET_FILE --force alice song.ogg old.ogg", "c> GET_FILE OK")
        self.assertEqual((a.cwd / "old.ogg").read_bytes(), b"la la la" * 1000)

    @defer.inlineCallbacks
    def test_without_a_local_name_saves_under_the_remote_base_name(self):
        a = yield self.online()
        yield a.check("GET_FILE alice song.ogg", "c> GET_FILE OK")
        self.assertEqual((a.cwd / "song.ogg").read_bytes(), b"la la la" * 1000)
        saved = [x for x in a.proc.errlines if "saved as" in x]
        self.assertEqual(len(saved), 1, a.proc.output())
        self.assertIn("7.8 KiB (8000 bytes) in 0:0", saved[0])
        self.assertTrue(saved[0].endswith(f"saved as {a.cwd / 'song.ogg'}"), saved)

    @defer.inlineCallbacks
    def test_a_failed_download_keeps_the_existing_file(self):
        a = yield self.online()
        fake = self.fake_peer(cut=True)
        (a.cwd / "keep.bin").write_bytes(b"precious")
        yield a.check(f"GET_FILE --force {fake} big.bin keep.bin", "c> GET_FILE FAIL")
        self.assertEqual((a.cwd / "keep.bin").read_bytes(), b"precious")
        # Only the hidden partial data stays, for the next GET_FILE to continue.
        self.assertEqual(self.leftovers(a.cwd), [".keep.bin.p2p-part", ".keep.bin.p2p-part.json"])
        self.assertTrue(any("cut after 10 of 1000" in x for x in a.proc.errlines), a.proc.output())

    @defer.inlineCallbacks
    def test_into_a_directory_saves_under_the_remote_name(self):
        a = yield self.online()
        (a.cwd / "inbox").mkdir()
        yield a.check("GET_FILE alice song.ogg inbox", "c> GET_FILE OK")
        self.assertEqual((a.cwd / "inbox" / "song.ogg").read_bytes(), b"la la la" * 1000)
        yield a.check("GET_FILE alice song.ogg inbox/", "c> GET_FILE FAIL")  # it is there
        yield a.check("GET_FILE --force alice song.ogg inbox/", "c> GET_FILE OK")
        yield a.check("GET_FILE alice song.ogg .", "c> GET_FILE OK")
        self.assertEqual((a.cwd / "song.ogg").read_bytes(), b"la la la" * 1000)

    @defer.inlineCallbacks
    def test_into_a_missing_directory(self):
        a = yield self.online()
        asked = len(self.indexer.requests)
        yield a.check("GET_FILE alice song.ogg no/such/dir/x.ogg", "c> GET_FILE FAIL")
        self.assertEqual(len(self.indexer.requests), asked, "failed before asking anyone")
        self.assertTrue(
            any("no/such/dir" in x and "no such directory" in x for x in a.proc.errlines),
            a.proc.output(),
        )
        self.assertFalse((a.cwd / "no").exists())

    @defer.inlineCallbacks
    def test_a_local_name_with_a_nul_gets_its_fail_line(self):
        """A script reading one result line per command stays in step."""
        a = yield self.online()
        asked = len(self.indexer.requests)
        yield a.check("GET_FILE alice song.ogg a\0b.ogg", "c> GET_FILE FAIL")
        self.assertEqual(len(self.indexer.requests), asked, "failed before asking anyone")
        self.assertTrue(any("NUL" in x for x in a.proc.errlines), a.proc.output())
        self.assertEqual(sorted(p.name for p in a.cwd.iterdir() if p.name.startswith("a")), [])

    @defer.inlineCallbacks
    def test_not_connected(self):
        a = self.shell("alice")
        yield a.check("GET_FILE bob x y", "c> GET_FILE FAIL")
        self.assertEqual(self.indexer.requests, [])

    @defer.inlineCallbacks
    def test_sigterm_mid_download_cleans_up_and_disconnects(self):
        a = yield self.online()
        fake = self.fake_peer(cut=False)
        a.proc.write(f"GET_FILE {fake} big.bin big.bin\n".encode())
        yield poll_until(lambda: self.leftovers(a.cwd), what="a download in progress")
        a.proc.signal("TERM")
        code = yield deadline(a.proc.ended)
        self.assertEqual(code, 0, a.proc.output())
        self.assertEqual(a.lines[-1], "c> GET_FILE FAIL")
        self.assertEqual(self.leftovers(a.cwd), [".big.bin.p2p-part", ".big.bin.p2p-part.json"])
        self.assertFalse((a.cwd / "big.bin").exists())
        self.assertIsNone(self.indexer.users["alice"]["addr"])

    @defer.inlineCallbacks
    def test_quit_from_a_script_waits_for_the_download(self):
        a = yield self.online()
        factory = protocol.Factory.forProtocol(_TricklingPeer)
        peer = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(peer.stopListening)
        self.indexer.users["slow"] = {"addr": ("127.0.0.1", str(peer.getHost().port)), "files": {}}
        a.proc.write(b"GET_FILE slow f.bin f.bin\nQUIT\n")
        code = yield deadline(a.proc.ended)
        self.assertEqual(code, 0, a.proc.output())
        self.assertEqual(a.lines[-1], "c> GET_FILE OK")
        self.assertEqual((a.cwd / "f.bin").read_bytes(), b"p" * _TricklingPeer.SIZE)
        self.assertIsNone(self.indexer.users["alice"]["addr"])
