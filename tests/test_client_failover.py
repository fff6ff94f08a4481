"""The client fails over between indexer nodes (``-s host1:9090,host2:9090``).

Unit tests: reading the ``-s`` list and its usage errors; which node is asked
first and the one note per switch (:class:`p2p.client.nodes.Nodes`). Over real
sockets on 127.0.0.1: a node that refuses, or closes without a reply, is left
for the next; a read is asked again there, a change whose reply was lost is not
(it may have been done); a kept TLS connection holding a lease that is lost, or
left because another node answered, is held again on the node used. End to end:
two real indexer processes, a client whose first node is down, and one whose
first node is killed under it, each saying so once on stderr.
"""

from __future__ import annotations

import re

from twisted.internet import defer, protocol, reactor
from twisted.python import usage
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.client.indexer_client import IndexerClient, IndexerError, ReplyLost
from p2p.client.main import Options
from p2p.client.nodes import BadNodeList, Node, Nodes, parse_nodes
from p2p.indexer.pgdirectory import HELD
from tests.support import deadline, hold_port, poll_until
from tests.test_client_e2e import ShellProcess, Stack
from tests.test_client_indexer import ScriptedIndexer as ClassicScripted
from tests.test_client_indexer import stamp
from tests.test_client_tls import InProcessTestCase, ScriptedIndexer

LOCAL = "127.0.0.1"


class ParseNodesTests(TestCase):
    def test_one_host_takes_the_default_port(self) -> None:
        self.assertEqual(parse_nodes("localhost", 9090), [Node("localhost", 9090)])
        self.assertEqual(parse_nodes("10.0.0.5", 7), [Node("10.0.0.5", 7)])

    def test_a_list_in_order_ports_given_or_default(self) -> None:
        self.assertEqual(
            parse_nodes("host1:9090, host2 ,host3:7000", 9999),
            [Node("host1", 9090), Node("host2", 9999), Node("host3", 7000)],
        )

    def test_ipv6_in_brackets_with_or_without_a_port_or_bare(self) -> None:
        self.assertEqual(
            parse_nodes("[::1]:9090,[2001:db8::5],fe80::1", 7),
            [Node("::1", 9090), Node("2001:db8::5", 7), Node("fe80::1", 7)],
        )
        self.assertEqual(str(Node("::1", 9090)), "[::1]:9090")
        self.assertEqual(str(Node("host", 9090)), "host:9090")

    def test_bad_lists_name_the_entry(self) -> None:
        cases = {
            "": "an empty entry",
            "a,,b": "an empty entry",
            "a:1,": "an empty entry",
            "a:0": "not a TCP port",
            "a:65536": "not a TCP port",
            "a:": "not a TCP port",
            "a:http": "not a TCP port",
            "a:\N{FULLWIDTH DIGIT ONE}": "not a TCP port",
            "host:80:90": "[ADDR]:PORT",
            "[example.com]:9": "only an IPv6 address goes in brackets",
            "[::1]:x": "not a TCP port",
            "a b:1": "not a host name",
            "-x": "not a host name",
            "a/b": "not a host name",
            "a:1,b,A:1": "listed twice",
        }
        for text, problem in cases.items():
            with self.assertRaises(BadNodeList, msg=text) as caught:
                parse_nodes(text, 9090)
            self.assertIn(problem, str(caught.exception), text)

    def test_the_options_parse_the_list_and_refuse_a_bad_one(self) -> None:
        options = Options()
        options.parseOptions(["-s", "a,b:1", "-p", "7", "--share-dir", "."])
        self.assertEqual(options["nodes"], [Node("a", 7), Node("b", 1)])
        options = Options()
        options.parseOptions(["--share-dir", "."])
        self.assertEqual(options["nodes"], [Node("localhost", wire.INDEXER_PORT)])
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["-s", "a:1,b:99999", "--share-dir", "."])
        self.assertIn("-s: b:99999: not a TCP port", str(caught.exception))


class NodesTests(TestCase):
    def setUp(self) -> None:
        self.notes: list[str] = []
        self.a, self.b, self.c = Node("a", 1), Node("b", 1), Node("c", 1)
        self.nodes = Nodes([self.a, self.b, self.c], self.notes.append)

    def test_the_next_after_a_failure_and_one_note_when_it_answers(self) -> None:
        self.assertEqual(self.nodes.current, self.a)
        self.nodes.failed(self.a, "connection refused")
        self.assertEqual(self.nodes.current, self.b)
        self.nodes.failed(self.b, "connection refused")
        self.assertEqual(self.nodes.current, self.c)
        self.assertEqual(self.notes, [])  # nobody answered yet: no switch to speak of
        self.assertTrue(self.nodes.answered(self.c))
        self.assertFalse(self.nodes.answered(self.c))
        self.assertEqual(
            self.notes,
            ["the indexer at a:1 does not answer (connection refused); using the indexer at c:1"],
        )
        self.nodes.failed(self.c, "no reply in 10s")  # wraps round to the first
        self.assertEqual(self.nodes.current, self.a)
        self.nodes.answered(self.a)
        self.assertEqual(len(self.notes), 2)
        self.assertIn(
            "c:1 does not answer (no reply in 10s); using the indexer at a:1", self.notes[-1]
        )

    def test_a_late_failure_of_a_node_left_moves_nothing(self) -> None:
        self.nodes.failed(self.a, "connection refused")
        self.nodes.answered(self.b)
        self.nodes.failed(self.a, "reset")  # an older request's
        self.assertEqual(self.nodes.current, self.b)

    def test_a_late_answer_from_another_node_is_no_switch(self) -> None:
        """A reply from a node asked while the node used was failing, once the node used
        answers again, moves nothing back and forth (and says nothing)."""
        self.nodes.failed(self.a, "no reply in 10s")
        self.assertFalse(self.nodes.answered(self.a))  # a answers again: still a
        self.assertFalse(self.nodes.answered(self.b))  # b's late reply: no switch
        self.assertEqual((self.nodes.using, self.nodes.current), (self.a, self.a))
        self.assertEqual(self.notes, [])

    def test_one_node_never_notes(self) -> None:
        nodes = Nodes([self.a], self.notes.append)
        nodes.failed(self.a, "connection refused")
        self.assertEqual(nodes.current, self.a)
        self.assertFalse(nodes.answered(self.a))
        self.assertEqual(self.notes, [])


class _ClosesUnanswered(protocol.Protocol):
    """A node that accepts, reads the request and closes without a reply byte."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.requests.append(data)
        self.transport.loseConnection()


class ClassicFailOverTests(TestCase):
    """One request per connection (a classic directory): the nodes over real sockets."""

    def setUp(self) -> None:
        self.notes: list[str] = []

    def answering(self, reply: bytes) -> tuple[int, ClassicScripted]:
        factory = protocol.Factory.forProtocol(ClassicScripted)
        factory.reply, factory.fields, factory.received = reply, 3, []
        return self.listen(factory), factory

    def closing(self) -> tuple[int, protocol.Factory]:
        factory = protocol.Factory.forProtocol(_ClosesUnanswered)
        factory.requests = []
        return self.listen(factory), factory

    def listen(self, factory: protocol.Factory) -> int:
        port = reactor.listenTCP(0, factory, interface=LOCAL)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def client(self, *ports: int) -> IndexerClient:
        first, *others = ports
        return IndexerClient(
            LOCAL,
            first,
            stamp,
            timeout=5,
            use_tls=False,
            note=self.notes.append,
            more_nodes=[Node(LOCAL, p) for p in others],
        )

    @defer.inlineCallbacks
    def test_a_refused_node_is_left_once_for_the_next(self) -> None:
        down = hold_port(self)
        up, factory = self.answering(b"\x00")
        client = self.client(down, up)
        self.assertEqual((yield deadline(client.request("REGISTER", "alice"))), (0, None))
        self.assertEqual((yield deadline(client.request("REGISTER", "bob"))), (0, None))
        self.assertEqual(len(factory.received), 2)  # nothing was sent to the refused node
        self.assertEqual(
            self.notes,
            [
                f"the indexer at {LOCAL}:{down} does not answer (connection refused); "
                f"using the indexer at {LOCAL}:{up}"
            ],
        )
        self.assertEqual(client.where, f"{LOCAL}:{up}")

    @defer.inlineCallbacks
    def test_a_read_whose_reply_was_lost_is_asked_of_the_next_node(self) -> None:
        closing, dropped = self.closing()
        up, factory = self.answering(b"\x00" + wire.encode_listing([]))
        client = self.client(closing, up)
        self.assertEqual((yield deadline(client.request("LIST_USERS", "alice"))), (0, []))
        self.assertEqual((yield deadline(client.request("LIST_USERS", "alice"))), (0, []))
        self.assertEqual((len(dropped.requests), len(factory.received)), (1, 2))
        self.assertEqual(len(self.notes), 1)
        self.assertIn("closed the connection before replying", self.notes[0])

    @defer.inlineCallbacks
    def test_a_change_whose_reply_was_lost_is_not_sent_again(self) -> None:
        """The first node may have registered alice: asked again, the second would answer
        1 (user already exists) for her own new name. The next request goes on to it."""
        closing, dropped = self.closing()
        up, factory = self.answering(b"\x00")
        client = self.client(closing, up)
        with self.assertRaises(ReplyLost) as caught:
            yield deadline(client.request("REGISTER", "alice"))
        self.assertIn("may or may not have been done", str(caught.exception))
        self.assertIn(f"the next request goes to {LOCAL}:{up}", str(caught.exception))
        self.assertEqual((len(dropped.requests), factory.received), (1, []))
        self.assertEqual(self.notes, [])
        self.assertEqual((yield deadline(client.request("CONNECT", "bob", 7000))), (0, None))
        self.assertEqual(len(dropped.requests), 1)
        self.assertEqual(len(self.notes), 1)

    @defer.inlineCallbacks
    def test_no_node_answers(self) -> None:
        a, b = hold_port(self), hold_port(self)
        client = self.client(a, b)
        with self.assertRaises(IndexerError) as caught:
            yield deadline(client.request("REGISTER", "alice"))
        self.assertEqual(
            str(caught.exception),
            f"no indexer node answers ({LOCAL}:{a}: connection refused; "
            f"{LOCAL}:{b}: connection refused)",
        )
        self.assertEqual(self.notes, [])


HOLD_REPLY = b"\x0030\x00"


class HeldLeaseMovesTests(InProcessTestCase):
    """Over TLS, the connection holding a lease moves to the node the client uses."""

    def setUp(self) -> None:
        super().setUp()
        self.scripted.answer = self.answer
        self.other = ScriptedIndexer()
        self.other.answer = self.answer
        self.other_port = self.listen(self.indexer_identity, self.other)
        self.lost: list[str] = []

    @staticmethod
    def answer(fields, _fingerprint) -> bytes:
        if fields[0] == b"HOLD":
            return HOLD_REPLY
        return b"\x00" + (wire.encode_listing([]) if fields[0].startswith(b"LIST") else b"")

    def two_nodes(self) -> IndexerClient:
        return self.client(more_nodes=[Node(LOCAL, self.other_port)])

    def hold_again(self, client: IndexerClient, user: str):
        """What the lease does: when the held connection is lost, HOLD again at once."""

        def lost() -> None:
            self.lost.append(user)
            client.hold(user, lost)

        return client.hold(user, lost)

    def switch_notes(self) -> list[str]:
        return [n for n in self.notes if "does not answer" in n]

    @defer.inlineCallbacks
    def test_a_lost_held_connection_is_held_again_on_the_next_node(self) -> None:
        self.home.create_identity("alice")
        client = self.two_nodes()
        self.assertEqual((yield deadline(self.hold_again(client, "alice"))), (0, [("30",)]))
        self.assertEqual(len(self.scripted.requests), 1)
        # The first node goes away under the held connection (killed: its system closes it).
        self.scripted.connections[0].transport.abortConnection()
        yield poll_until(lambda: self.other.requests, what="HOLD on the second node")
        self.assertEqual(self.other.requests[0][0][0], b"HOLD")
        yield poll_until(self.switch_notes, what="the switch note")
        self.assertEqual(
            self.switch_notes(),
            [
                f"the indexer at {LOCAL}:{self.port} does not answer (the connection holding "
                f"the lease was lost); using the indexer at {LOCAL}:{self.other_port}"
            ],
        )
        self.assertEqual(self.lost, ["alice"])
        self.assertEqual(len(self.scripted.requests), 1)  # not asked again first

    @defer.inlineCallbacks
    def test_another_node_answering_moves_the_held_lease_there(self) -> None:
        self.home.create_identity("alice")
        client = self.two_nodes()
        yield deadline(self.hold_again(client, "alice"))
        held = self.scripted.connections[0]
        # bob's read finds the first node closing without a reply: asked of the second.
        self.scripted.answer = lambda fields, fp: None if fields[2] == b"bob" else HOLD_REPLY
        self.assertEqual((yield deadline(client.request("LIST_USERS", "bob"))), (0, []))
        yield deadline(held.closed)  # alice's held connection to the first node is left
        yield poll_until(
            lambda: [r for r in self.other.requests if r[0][0] == b"HOLD"],
            what="alice's HOLD on the second node",
        )
        self.assertEqual(self.lost, ["alice"])
        self.assertEqual(len(self.switch_notes()), 1)
        # Moving is not a failure: the node used stays the second.
        self.assertEqual(client.where, f"{LOCAL}:{self.other_port}")
        yield deadline(client.request("LIST_USERS", "alice"))
        self.assertEqual(len(self.switch_notes()), 1)


class TwoIndexersTests(TestCase):
    """Real ``twistd p2p-indexer`` processes (each its own SQLite store: fail-over needs
    no shared one to be seen) and a real client given both."""

    @defer.inlineCallbacks
    def setUp(self):
        self.first, self.second = Stack(self), Stack(self)
        yield defer.gatherResults([self.first.start_indexer(), self.second.start_indexer()])

    def switch_notes(self, shell) -> list[str]:
        return [line for line in shell.proc.errlines if "does not answer" in line]

    @defer.inlineCallbacks
    def test_first_node_down_the_client_uses_the_second(self):
        down = hold_port(self)
        nodes = f"{LOCAL}:{down},{LOCAL}:{self.second.port}"
        alice = self.second.shell("alice", extra=("-s", nodes))
        yield alice.check("REGISTER alice", "c> REGISTER OK")
        yield alice.check("CONNECT alice", "c> CONNECT OK")
        listing = yield alice.run("LIST_USERS", 2)
        self.assertEqual(listing[0], "c> LIST_USERS OK")
        self.assertEqual(
            self.switch_notes(alice),
            [
                f"the indexer at {LOCAL}:{down} does not answer (connection refused); "
                f"using the indexer at {LOCAL}:{self.second.port}"
            ],
        )
        yield self.second.indexer.wait_for_line(r"s> CONNECT FROM alice$")
        code, rows = yield self.second.raw("LIST_USERS", "alice", home=alice.home)  # claimed
        self.assertEqual((code, [row[0] for row in rows]), (wire.OK, ["alice"]))

    @defer.inlineCallbacks
    def test_first_node_killed_the_client_moves_on_and_holds_there(self):
        for stack in (self.first, self.second):  # alice exists on both (unclaimed)
            self.assertEqual((yield stack.raw("REGISTER", "alice"))[0], wire.OK)
        nodes = f"{LOCAL}:{self.first.port},{LOCAL}:{self.second.port}"
        alice = self.first.shell("alice", extra=("-s", nodes))
        yield alice.check("CONNECT alice", "c> CONNECT OK")
        yield self.first.indexer.kill()
        # The held connection is lost: HOLD on the second node, which does not list alice
        # (its own store): the client says so, connects her there and holds again.
        yield alice.proc.wait_for_line(r"alice is connected again, serving on port \d+$")
        yield self.second.indexer.wait_for_line(r"s> CONNECT FROM alice$")
        yield alice.check("LIST_CONTENT alice", "c> LIST_CONTENT OK")
        notes = self.switch_notes(alice)
        self.assertEqual(len(notes), 1, alice.proc.output())
        self.assertTrue(
            re.fullmatch(
                rf"the indexer at {LOCAL}:{self.first.port} does not answer \(.*\); "
                rf"using the indexer at {LOCAL}:{self.second.port}",
                notes[0],
            ),
            notes[0],
        )
        self.assertEqual(alice.lines[:2], ["c> CONNECT OK", "c> LIST_CONTENT OK"])
        self.assertNotIn("does not answer", "\n".join(alice.lines))
        code, rows = yield self.second.raw("LIST_USERS", "alice")
        self.assertEqual((code, [row[0] for row in rows]), (wire.OK, ["alice"]))


class ClusterFailOverTests(TestCase):
    """What the list is for: two nodes on one PostgreSQL database (tests/postgres.py). A
    node killed under a client holding its user's lease: the lease moves to the other
    node, and the user is never dropped."""

    @defer.inlineCallbacks
    def test_a_killed_node_the_held_lease_moves_and_the_user_stays(self):
        from tests.test_indexer_cluster import lease_until, start_nodes
        from tests.test_liveness_e2e import TIMEOUT

        a, b = yield start_nodes(self, 2, "--peer-timeout", str(TIMEOUT))
        nodes = f"{LOCAL}:{a.port},{LOCAL}:{b.port}"
        wsdl = f"http://{LOCAL}:{hold_port(self)}/?wsdl"
        # Her peer server listens where the indexer would not probe it (127.0.0.2): only
        # a held (or renewed) lease keeps her listed.
        alice = ShellProcess(
            self,
            "alice",
            a.port,
            wsdl,
            extra=("-s", nodes, "--peer-listen", "tcp:0:interface=127.0.0.2"),
        )
        yield alice.check("REGISTER alice", "c> REGISTER OK")
        yield alice.check("CONNECT alice", "c> CONNECT OK")
        yield poll_until(lambda: self.lease_kind("alice") == HELD, what="alice held on A")
        yield a.process.kill()
        yield alice.proc.wait_for_line(
            rf"the indexer at {LOCAL}:{a.port} does not answer \(.*\); "
            rf"using the indexer at {LOCAL}:{b.port}$"
        )
        yield poll_until(lambda: self.lease_kind("alice") == HELD, what="alice held on B")
        # Three leases later she is still held (node B renews her lease as it holds it).
        since = lease_until(self, "alice")
        yield poll_until(
            lambda: lease_until(self, "alice") > since + 3 * TIMEOUT, what="3 leases held on B"
        )
        listing = yield alice.run("LIST_USERS", 2)
        self.assertEqual(listing[0], "c> LIST_USERS OK")
        self.assertIn("alice", listing[1])
        errors = alice.proc.errlines
        self.assertEqual(len([e for e in errors if "does not answer" in e]), 1, errors)
        self.assertEqual([e for e in errors if "dropped" in e], [])

    def lease_kind(self, user: str) -> int | None:
        import psycopg

        with psycopg.connect(self.postgres_uri) as conn:
            row = conn.execute("SELECT lease_kind FROM users WHERE name = %s", (user,)).fetchone()
        return None if row is None else row[0]
