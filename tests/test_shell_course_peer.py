"""Peers of the original course implementation, met by our client (a real process).

Such a peer reads an operation and a file name, whatever the operation, and
answers 1 then the file's bytes for a file it has, 2 for one it does not (the
assignment text says otherwise: a typo). Here a small fake one, which sends the
1 on its own and the bytes a moment later, as a C program writing them in two
calls may.
"""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor

from tests.test_client_interop import InteropTestCase


class _CoursePeer(protocol.Protocol):
    def connectionMade(self) -> None:
        self.buffer = b""
        self.answered = False
        self.call = None

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        fields = self.buffer.split(b"\0")
        if self.answered or len(fields) < 3:  # OP and the name, both ended
            return
        self.answered = True
        op, name = fields[0].decode(), fields[1].decode()
        self.factory.seen.append(op)
        body = self.factory.files.get(name)
        if body is None:
            self.transport.write(b"\2")
            self.transport.loseConnection()
            return
        self.transport.write(b"\1")
        self.call = reactor.callLater(0.05, self.rest, body)

    def rest(self, body: bytes) -> None:
        self.transport.write(body)
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()


class CoursePeerTests(InteropTestCase):
    @defer.inlineCallbacks
    def test_a_file_it_has_and_one_it_has_not(self):
        factory = protocol.Factory.forProtocol(_CoursePeer)
        body = b"course bytes\n" * 5000
        factory.files = {"notes.txt": body}
        factory.seen = []
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = str(listening.getHost().port)
        self.indexer.users["course"] = {"addr": ("127.0.0.1", port), "files": {}}
        a = self.shell("alice")
        yield a.check("REGISTER alice", "c> REGISTER OK")
        yield a.check("CONNECT alice", "c> CONNECT OK")
        yield a.check("GET_FILE course notes.txt", "c> GET_FILE OK")
        self.assertEqual((a.cwd / "notes.txt").read_bytes(), body)
        self.assertEqual(factory.seen, ["FETCH", "GET_FILE"])
        yield a.check("GET_FILE course gone.txt", "c> GET_FILE FAIL / FILE NOT EXIST")
        self.assertFalse((a.cwd / "gone.txt").exists())
        self.assertEqual([p.name for p in a.cwd.iterdir()], ["notes.txt"])
        yield a.quit()
