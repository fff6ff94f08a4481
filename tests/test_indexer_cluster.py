"""The indexer on PostgreSQL: real nodes (``twistd p2p-indexer --db postgresql://...``)
sharing one real, throwaway PostgreSQL server (tests/postgres.py).

Two nodes behave as one indexer: the same REGISTER sent to both at once gets
exactly one 0; a change one node acknowledged is seen by the next request to
the other; a node killed with ``kill -9`` under load loses nothing it
acknowledged. The classic end-to-end suites of tests/test_indexer_e2e.py run
against a PostgreSQL-backed node too (the classes at the end).
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from p2p import wire
from tests import postgres
from tests import test_indexer_e2e as e2e
from tests import test_indexer_names as names
from tests import test_indexer_refusal as refusal
from tests import test_indexer_search_e2e as search_e2e
from tests import test_indexer_tls as tls
from tests import test_liveness_e2e as liveness_e2e
from tests.support import hold_port, poll_until

DT = e2e.DT


@defer.inlineCallbacks
def start_nodes(testcase: TestCase, count: int = 2, *options: str):
    """``count`` indexer nodes on one fresh database; their :class:`e2e.Indexer`s."""
    testcase.on_postgres = True
    nodes = []
    for _ in range(count):
        node = yield e2e.start_indexer(testcase, "--max-per-source", "400", *options)
        nodes.append(node)
    return nodes


class TwoNodes(TestCase):
    """Two nodes, one database: every rule of protocol.md holds across them."""

    @defer.inlineCallbacks
    def test_same_registers_on_both_nodes_at_once(self):
        """200 names, each sent as REGISTER to both nodes at once: exactly 200 zeros,
        and for each name one 0 and one 1."""
        a, b = yield start_nodes(self)
        names = [f"user{i}" for i in range(200)]
        requests = []
        for name in names:
            requests.append(a.request("REGISTER", name))
            requests.append(b.request("REGISTER", name))
        replies = yield defer.gatherResults(requests)
        self.assertEqual(replies.count(b"\0"), 200)
        self.assertEqual(replies.count(b"\1"), 200)
        for i in range(200):
            self.assertEqual(sorted(replies[2 * i : 2 * i + 2]), [b"\0", b"\1"])

    @defer.inlineCallbacks
    def test_a_change_on_one_node_is_seen_by_the_other_at_once(self):
        a, b = yield start_nodes(self)
        codes = yield a.codes(
            ("REGISTER", "alice"),
            ("CONNECT", "alice", 7000),
            ("PUBLISH", "alice", "notes.txt", "my notes"),
        )
        self.assertEqual(codes, [0, 0, 0])
        content = yield b.request("LIST_CONTENT", "alice", "alice")
        self.assertEqual(content, b"\0" + wire.encode_fields(1, "notes.txt", "my notes"))
        users = yield b.request("LIST_USERS", "alice")
        self.assertEqual(users, b"\0" + wire.encode_fields(1, "alice", "127.0.0.1", 7000))
        # And back: each node's answer follows the other's last change.
        codes = yield b.codes(
            ("PUBLISH", "alice", "notes.txt", "again"),
            ("DELETE", "alice", "notes.txt"),
        )
        self.assertEqual(codes, [3, 0])
        codes = yield a.codes(
            ("DELETE", "alice", "notes.txt"),
            ("CONNECT", "alice", 7001),
        )
        self.assertEqual(codes, [3, 0])  # alice's peer at 7000 does not answer: replaced
        users = yield b.request("LIST_USERS", "alice")
        self.assertEqual(users, b"\0" + wire.encode_fields(1, "alice", "127.0.0.1", 7001))
        codes = yield b.codes(("DISCONNECT", "alice"), ("UNREGISTER", "alice"))
        self.assertEqual(codes, [0, 0])
        codes = yield a.codes(("LIST_CONTENT", "alice", "alice"), ("REGISTER", "alice"))
        self.assertEqual(codes, [1, 0])

    @defer.inlineCallbacks
    def test_every_code_on_alternate_nodes(self):
        """The classic table of codes, each request sent to the other node than the last."""
        a, b = yield start_nodes(self)
        peer = e2e.live_port(self)
        table = [
            (("REGISTER", "alice"), 0),
            (("REGISTER", "alice"), 1),
            (("REGISTER", "bob"), 0),
            (("CONNECT", "carol", 5000), 1),
            (("CONNECT", "alice", peer), 0),
            (("CONNECT", "alice", 5001), 2),
            (("PUBLISH", "carol", "f", "d"), 1),
            (("PUBLISH", "bob", "f", "d"), 2),
            (("PUBLISH", "alice", "f", "d"), 0),
            (("PUBLISH", "alice", "f", "d"), 3),
            (("DELETE", "alice", "nope"), 3),
            (("LIST_USERS", "bob"), 2),
            (("LIST_CONTENT", "alice", "carol"), 3),
            (("UNREGISTER", "alice"), 2),
            (("DISCONNECT", "bob"), 2),
            (("DELETE", "alice", "f"), 0),
            (("DISCONNECT", "alice"), 0),
            (("UNREGISTER", "alice"), 0),
        ]
        got = []
        for i, (request, _) in enumerate(table):
            node = (a, b)[i % 2]
            codes = yield node.codes(request)
            got += codes
        self.assertEqual(got, [code for _, code in table])

    @defer.inlineCallbacks
    def test_kill_9_under_load_loses_nothing_acknowledged(self):
        """Node A is killed while 300 REGISTERs and PUBLISHes are in flight to it: every
        one it acknowledged is there, read through node B; none is there half-done."""
        a, b = yield start_nodes(self)
        codes = yield b.codes(("REGISTER", "owner"), ("CONNECT", "owner", 7000))
        self.assertEqual(codes, [0, 0])
        names = [f"u{i}" for i in range(300)]
        replies: dict[str, bytes] = {}

        def note(reply: bytes, key: str) -> None:
            replies[key] = reply

        requests = []
        for name in names:
            for op, args in (("REGISTER", (name,)), ("PUBLISH", ("owner", name, "d"))):
                d = a.request(op, *args)
                d.addCallback(note, f"{op} {name}")
                d.addErrback(lambda _f: None)  # cut by the kill: not acknowledged
                requests.append(d)
        yield poll_until(lambda: len(replies) >= 100, what="100 replies")
        yield a.process.kill()
        yield defer.DeferredList(requests)
        registered = [n for n in names if replies.get(f"REGISTER {n}") == b"\0"]
        published = [n for n in names if replies.get(f"PUBLISH {n}") == b"\0"]
        self.assertTrue(registered and published)
        again = yield b.codes(*(("REGISTER", n) for n in registered))
        self.assertEqual(again, [1] * len(registered))
        content = yield b.request("LIST_CONTENT", "owner", "owner")
        listed = [f.decode() for f in wire.decode_fields(content[1:])[1::2]]
        self.assertEqual(set(published) - set(listed), set())
        # Nothing half-done: every file listed is one of ours, once.
        self.assertEqual(len(listed), len(set(listed)))
        self.assertTrue(set(listed) <= set(names))

    @defer.inlineCallbacks
    def test_extensions_across_nodes(self):
        """PUBLISH_FILE on one node; LIST_FILES, SEARCH and SOURCES on the other see it
        (SOURCES: protocol.md 8.6's example, byte for byte: owner order, the asker left
        out)."""
        a, b = yield start_nodes(self)
        sha = "a948904f2f0f479b8f8197694b30184b0d2ed1c1cd2a1ec0fb85d299a192a447"
        for user, port in (("alice", 5000), ("bob", 5001), ("dave", 5003)):
            codes = yield a.codes(("REGISTER", user), ("CONNECT", user, port))
            self.assertEqual(codes, [0, 0])
        for user, name in (
            ("dave", "cuna.txt"),
            ("alice", "canci\u00f3n_de_cuna.txt"),
            ("bob", "mine.txt"),
        ):
            codes = yield a.codes(("PUBLISH_FILE", user, name, "same bytes", 12, sha, "new"))
            self.assertEqual(codes, [0])
        files = yield b.request("LIST_FILES", "bob", "dave")
        self.assertEqual(files, b"\0" + wire.encode_fields(1, "cuna.txt", "same bytes", 12, sha))
        found = yield b.request("SEARCH", "bob", "CANCION cun", 100)
        self.assertEqual(
            found,
            b"\0"
            + wire.encode_fields(1, "alice", "canci\u00f3n_de_cuna.txt", "same bytes", 12, sha, 3),
        )
        if "SOURCES" in wire.OPS:
            sources = yield b.request("SOURCES", "bob", sha)
            self.assertEqual(
                sources,
                b"\x002\x00alice\x00canci\xc3\xb3n_de_cuna.txt\x00127.0.0.1\x005000\x00"
                b"dave\x00cuna.txt\x00127.0.0.1\x005003\x00",
            )

    @defer.inlineCallbacks
    def test_nodes_share_one_identity(self):
        """Nodes share one identity (kept in the database) and one sender id."""
        a, b = yield start_nodes(self)
        fingerprints = [
            next(line for line in node.process.lines if "TLS key fingerprint" in line)
            for node in (a, b)
        ]
        self.assertEqual(fingerprints[0], fingerprints[1])


class DatabaseAway(TestCase):
    @defer.inlineCallbacks
    def test_error_codes_while_the_server_is_away_then_served_again(self):
        """The server stops under a running node: requests get their "any other error"
        code (nothing half-done, the node keeps running); once it is back they are served,
        with everything acknowledged before."""
        server = postgres.own_server(self)
        self.postgres_uri = server.create_database()
        (node,) = yield start_nodes(self, 1)
        codes = yield node.codes(("REGISTER", "alice"), ("CONNECT", "alice", 7000))
        self.assertEqual(codes, [0, 0])
        yield threads.deferToThread(server.pause)
        codes = yield node.codes(("REGISTER", "bob"), ("LIST_USERS", "alice"))
        self.assertEqual(codes, [wire.REGISTER.error, wire.LIST_USERS.error])
        yield threads.deferToThread(server.resume)
        codes = yield node.codes(("REGISTER", "bob"), ("REGISTER", "alice"))
        self.assertEqual(codes, [0, 1])
        users = yield node.request("LIST_USERS", "alice")
        self.assertEqual(users, b"\0" + wire.encode_fields(1, "alice", "127.0.0.1", 7000))


class StartFailure(TestCase):
    @defer.inlineCallbacks
    def test_a_database_it_cannot_reach_is_one_line(self):
        """One ``s> indexer cannot start`` line naming the database (never its password)
        and what to check, and a non-zero status."""
        cwd = tls.folder(self)
        output = yield tls.failed_start(
            self,
            cwd,
            "--db",
            "postgresql://p2p:secret@/nodb?host=/nonexistent",
            "--listen",
            "tcp:0:interface=127.0.0.1",
        )
        said = [line for line in output.splitlines() if "s> indexer cannot start: " in line]
        self.assertEqual(len(said), 1, output)
        self.assertIn("/nonexistent", said[0])
        self.assertIn("check the URI", said[0])
        self.assertNotIn("secret", output)


class Audit(TestCase):
    """The outbox across nodes: each record delivered to the logger once, in commit
    order, by the leader; when the leader dies, another node takes over."""

    @defer.inlineCallbacks
    def test_records_of_both_nodes_delivered_once_in_order(self):
        logger, audit_file = yield start_logger(self)
        endpoint = f"tcp:host=127.0.0.1:port={logger}"
        a, b = yield start_nodes(self, 2, "--logger", endpoint)
        expected = []
        for i in range(20):
            node = (a, b)[i % 2]
            codes = yield node.codes(("REGISTER", f"n{i}"))
            self.assertEqual(codes, [0])
            expected.append(f"n{i} REGISTER {DT}")

        def records():
            if not audit_file.exists():
                return []
            return [line for line in audit_file.read_text().splitlines() if line]

        yield poll_until(lambda: len(records()) >= 20, what="20 audit records")
        self.assertEqual(records(), expected)

        # The leader dies: the other node delivers the records that follow, once.
        leader = yield poll_until(lambda: leader_of(a, b), what="a leader")
        other = b if leader is a else a
        yield leader.process.kill()
        for i in range(20, 30):
            codes = yield other.codes(("REGISTER", f"n{i}"))
            self.assertEqual(codes, [0])
            expected.append(f"n{i} REGISTER {DT}")
        yield poll_until(lambda: len(records()) >= 30, timeout=30, what="30 audit records")
        self.assertEqual(records(), expected)

    @defer.inlineCallbacks
    def test_concurrent_requests_on_both_nodes_each_record_once_in_order(self):
        """40 users at once, each sending REGISTER, CONNECT, PUBLISH one after another,
        every request to the other node than its last: the audit file holds each record
        exactly once, and each user's in the order of its requests (commit order)."""
        logger, audit_file = yield start_logger(self)
        a, b = yield start_nodes(self, 2, "--logger", f"tcp:host=127.0.0.1:port={logger}")

        @defer.inlineCallbacks
        def life(i: int):
            user = f"w{i}"
            steps = [("REGISTER", user), ("CONNECT", user, 7000 + i), ("PUBLISH", user, "f", "d")]
            for k, request in enumerate(steps):
                codes = yield (a, b)[(i + k) % 2].codes(request)
                self.assertEqual(codes, [0])

        yield defer.gatherResults([life(i) for i in range(40)])

        def records():
            return audit_file.read_text().splitlines() if audit_file.exists() else []

        yield poll_until(lambda: len(records()) >= 120, what="120 audit records")
        got = records()
        self.assertEqual(len(got), 120)
        for i in range(40):
            mine = [r for r in got if r.startswith(f"w{i} ")]
            self.assertEqual(
                mine,
                [f"w{i} REGISTER {DT}", f"w{i} CONNECT {DT}", f"w{i} PUBLISH f {DT}"],
            )


def leader_of(*nodes):
    """The node that says it leads, if one does."""
    for node in nodes:
        if any(
            "is the cluster's leader" in line for line in node.process.lines + node.process.errlines
        ):
            return node
    return None


@defer.inlineCallbacks
def start_logger(testcase: TestCase):
    """A real ``twistd p2p-logger`` on a loopback port; its TCP port and audit file."""
    from tests.support import logger_ports, spawn_twistd

    cwd = Path(testcase.mktemp()).resolve()
    cwd.mkdir(parents=True)
    audit = cwd / "audit.log"
    logger = spawn_twistd(
        testcase,
        "p2p-logger",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--no-rpcbind",
        "--audit-file",
        str(audit),
        cwd=cwd,
    )
    ports = yield logger_ports(logger)
    return ports["tcp"], audit


# --- The classic end-to-end suites against a PostgreSQL-backed node -----------------


class EveryCodeOnPostgres(e2e.EveryCode):
    on_postgres = True


class PersistenceOnPostgres(e2e.Persistence):
    on_postgres = True


class PersistenceUnderLoadOnPostgres(e2e.PersistenceUnderLoad):
    on_postgres = True


class BadInputOnPostgres(e2e.BadInput):
    on_postgres = True


class LookAlikeAttackOnPostgres(names.LookAlikeAttackTests):
    on_postgres = True


class RefusedWhileSendingOnPostgres(refusal.RefusedWhileSendingTests):
    on_postgres = True


class SenderThatNeverStopsOnPostgres(refusal.SenderThatNeverStopsTests):
    on_postgres = True


class SearchOverTheWireOnPostgres(search_e2e.SearchOverTheWire):
    on_postgres = True


class ClaimsOnPostgres(tls.EndToEnd):
    on_postgres = True

    @defer.inlineCallbacks
    def test_fingerprint_kept_beside_the_database(self):
        """On PostgreSQL the identity is kept in the database, not in a file: a node
        started again (or another node) presents the same key."""
        cwd = tls.folder(self)
        ix, fp = yield tls.start(self, cwd=cwd)
        self.assertEqual(list(cwd.glob("*.pem")), [])
        yield ix.process.stop()
        again, fp_again = yield tls.start(self, cwd=cwd)
        self.assertEqual(fp_again, fp)
        client = yield tls.tls_client(self, again.port, fp, None)
        got = yield tls.codes_over(client, ("REGISTER", "carol"))
        self.assertEqual(got, [0])

    @defer.inlineCallbacks
    def test_memory_database_new_key_each_start(self):
        """SQLite's ``:memory:`` keeps no key, so each start makes one; PostgreSQL has no
        such database. What it stands for here: the key belongs to the database, so a
        new (empty) database, a new cluster, gets a key of its own."""
        self.postgres_uri = postgres.database(self)
        _, fp1 = yield tls.start(self)
        self.postgres_uri = postgres.database(self)  # the next start: another database
        _, fp2 = yield tls.start(self)
        self.assertNotEqual(fp1, fp2)

    @defer.inlineCallbacks
    def test_second_indexer_on_one_database_refused(self):
        """The opposite on PostgreSQL: a second node on the same database starts, and
        both serve the same names and claims."""
        ix, fp = yield tls.start(self)
        other, fp_other = yield tls.start(self)
        self.assertEqual(fp_other, fp)
        alice = yield tls.tls_client(self, ix.port, fp, tls.ALICE)
        got = yield tls.codes_over(alice, ("REGISTER", "alice"))
        self.assertEqual(got, [0])
        mallory = yield tls.tls_client(self, other.port, fp, tls.MALLORY)
        got = yield tls.codes_over(mallory, ("CONNECT", "alice", 7000), ("REGISTER", "alice"))
        self.assertEqual(got, [wire.CONNECT.error, wire.REGISTER.error])
        alice = yield tls.tls_client(self, other.port, fp, tls.ALICE)
        got = yield tls.codes_over(alice, ("CONNECT", "alice", 7000))
        self.assertEqual(got, [0])


class LivenessOnPostgres(liveness_e2e.Liveness):
    on_postgres = True

    @defer.inlineCallbacks
    def test_expiry_is_audited(self):
        """As on SQLite, read from the PostgreSQL outbox."""
        dead = f"tcp:host=127.0.0.1:port={hold_port(self)}"  # the logger is down: rows stay
        ix = yield self.start("--logger", dead)
        yield liveness_e2e.join(ix, "gone", hold_port(self))
        yield liveness_e2e.until_listed(ix, set(), {"gone"}, "the gone peer dropped")
        rows = yield poll_until(
            lambda: [r for r in outbox(self) if r.startswith("gone DISCONNECT ")],
            what="the record",
        )
        self.assertEqual(len(rows), 1, rows)
        self.assertRegex(rows[0], r"^gone DISCONNECT \d\d/\d\d/\d{4} \d\d:\d\d:\d\d$")
        self.assertFalse([r for r in outbox(self) if " ALIVE " in r])

    @defer.inlineCallbacks
    def test_leases_start_afresh_when_a_node_takes_the_lead(self):
        """The only node is down longer than a lease (its clients cannot renew): when
        one starts and leads, every connected user has a full lease again, as a
        restarted SQLite indexer gives, and a renewing client stays. A user whose
        client stopped renewing meanwhile is probed first, as there: its peer answers,
        so it stays too."""
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        ix = yield self.start(cwd=cwd)
        yield liveness_e2e.join(ix, "ours", hold_port(self))
        renewer = liveness_e2e.Renewer(self, ix, "ours")
        peer = liveness_e2e.PeerListener(self)
        yield liveness_e2e.join(ix, "quiet", peer.number)
        quiet = liveness_e2e.Renewer(self, ix, "quiet")
        yield poll_until(lambda: quiet.replies, what="quiet renewing")
        quiet.stop()
        yield ix.process.stop()
        probed = peer.accepted
        yield poll_until(
            lambda: database_now(self) > lease_until(self, "ours") + 1,
            what="ours's lease run out while no node runs",
        )
        restarted = yield e2e.start_indexer(
            self, "--peer-timeout", str(liveness_e2e.TIMEOUT), cwd=cwd
        )
        ix.port, ix.process = restarted.port, restarted.process
        before = len(renewer.replies)
        yield poll_until(lambda: len(renewer.replies) >= before + 3, what="three renewals")
        self.assertEqual(renewer.replies[-1], b"\x00%d\x00" % liveness_e2e.TIMEOUT)
        yield poll_until(
            lambda: peer.accepted > probed, timeout=liveness_e2e.GONE_WITHIN, what="quiet probed"
        )
        users = yield liveness_e2e.listed(ix)
        self.assertTrue({"ours", "quiet"} <= users, users)


def database_now(testcase: TestCase) -> float:
    """The PostgreSQL server's clock, epoch seconds (leases run on it)."""
    import psycopg

    with psycopg.connect(testcase.postgres_uri) as conn:
        return float(conn.execute("SELECT extract(epoch from now())").fetchone()[0])


def lease_until(testcase: TestCase, user: str) -> float:
    """When ``user``'s lease runs out (the database's clock, epoch seconds)."""
    import psycopg

    with psycopg.connect(testcase.postgres_uri) as conn:
        return conn.execute("SELECT lease_until FROM users WHERE name = %s", (user,)).fetchone()[0]


def outbox(testcase: TestCase) -> list[str]:
    """The records in the outbox of the test's PostgreSQL database, in order."""
    import psycopg

    with psycopg.connect(testcase.postgres_uri) as conn:
        return [r for (r,) in conn.execute("SELECT record FROM outbox ORDER BY seq")]


class ClusterLiveness(TestCase):
    """Leases across nodes: expiry once in the cluster; a held lease outlives no node."""

    @defer.inlineCallbacks
    def test_expiry_happens_once_in_the_cluster(self):
        dead = f"tcp:host=127.0.0.1:port={hold_port(self)}"  # records stay in the outbox
        nodes = yield start_nodes(
            self, 3, "--peer-timeout", str(liveness_e2e.TIMEOUT), "--logger", dead
        )
        watcher = liveness_e2e.PeerListener(self)
        yield liveness_e2e.join(nodes[0], "watcher", watcher.number)
        liveness_e2e.Renewer(self, nodes[0], "watcher")
        for i in range(5):
            yield liveness_e2e.join(nodes[i % 3], f"gone{i}", hold_port(self))
        for i in range(5):
            yield liveness_e2e.until_listed(nodes[0], set(), {f"gone{i}"}, f"gone{i} dropped")
        drops = [r for r in outbox(self) if " DISCONNECT " in r]
        self.assertEqual(sorted(r.split()[0] for r in drops), [f"gone{i}" for i in range(5)])

    @defer.inlineCallbacks
    def test_a_lease_held_on_a_killed_node_runs_out(self):
        """alice holds her lease on node A (HOLD over TLS); while A runs she stays, however
        long; A is killed: node B drops her once the lease runs out."""
        timeout = liveness_e2e.TIMEOUT
        a, b = yield start_nodes(self, 2, "--peer-timeout", str(timeout))
        match = yield a.process.wait_for_line(tls.FINGERPRINT)
        alice = yield tls.tls_client(self, a.port, match.group(1), tls.ALICE)
        got = yield tls.codes_over(
            alice, ("REGISTER", "alice"), ("CONNECT", "alice", hold_port(self)), ("HOLD", "alice")
        )
        self.assertEqual(got, [0, 0, 0])
        watcher = liveness_e2e.PeerListener(self)
        yield liveness_e2e.join(b, "watcher", watcher.number)
        liveness_e2e.Renewer(self, b, "watcher")
        # A whole lease after the HOLD, renewed by node A: alice is still listed.
        first = lease_until(self, "alice")
        yield poll_until(
            lambda: lease_until(self, "alice") > first + timeout, what="a lease renewed by A"
        )
        users = yield liveness_e2e.listed(b)
        self.assertIn("alice", users)
        yield a.process.kill()
        yield liveness_e2e.until_listed(b, {"watcher"}, {"alice"}, "alice dropped")
