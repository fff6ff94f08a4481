"""The PostgreSQL store's own machinery, on a real throwaway server (tests/postgres.py):
batches of waiting works, a failing work failing alone, and the leader moving to
another node when the leader's session ends."""

from __future__ import annotations

import threading

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from p2p.indexer.pgstore import TIMEOUT_DEFAULTS, Leadership, PgStore, with_timeouts
from tests import postgres
from tests.support import poll_until


def open_store(testcase: TestCase, uri: str, count: int = 1) -> PgStore:
    store = PgStore(uri, threads=count, reactor=reactor)
    store.open()
    testcase.addCleanup(store.close)
    return store


def insert(cursor, key: str) -> str:
    cursor.execute("INSERT INTO meta (key, value) VALUES (%s, 'x') ON CONFLICT DO NOTHING", (key,))
    return key


def fail(cursor, key: str) -> None:
    cursor.execute("INSERT INTO meta (key, value) VALUES (%s, 'x')", (key,))
    raise ValueError(key)


def keys(uri: str) -> set[str]:
    import psycopg

    with psycopg.connect(uri) as conn:
        return {k for (k,) in conn.execute("SELECT key FROM meta WHERE value = 'x'")}


class Batches(TestCase):
    @defer.inlineCallbacks
    def test_waiting_works_run_together_and_a_failing_one_fails_alone(self):
        uri = postgres.database(self)
        store = open_store(self, uri)
        batches: list[int] = []
        execute = store._execute

        def counted(batch):
            batches.append(len(batch))
            return execute(batch)

        store._execute = counted
        release = threading.Event()
        self.addCleanup(release.set)

        def blocked(cursor):
            release.wait(10)
            return "first"

        first = store.transact(blocked, key="a")
        waiting = [
            store.transact(insert, "ok1", key="b"),
            store.transact(fail, "bad", key="c"),
            store.transact(insert, "ok2", key="d"),
        ]
        release.set()
        self.assertEqual((yield first), "first")
        results = yield defer.DeferredList(waiting, consumeErrors=True)
        self.assertEqual(results[0], (True, "ok1"))
        self.assertFalse(results[1][0])
        self.assertTrue(results[1][1].check(ValueError))
        self.assertEqual(results[2], (True, "ok2"))
        self.assertEqual(batches[:2], [1, 3])  # the three waiting ones: one batch
        self.assertEqual(keys(uri), {"ok1", "ok2"})  # nothing of the failing one


class Leader(TestCase):
    @defer.inlineCallbacks
    def test_another_node_leads_when_the_leaders_session_ends(self):
        uri = postgres.database(self)
        nodes = []
        for _ in range(2):
            leadership = Leadership(open_store(self, uri), reactor, tick=0.05, poll=0.05)
            leadership.start()
            self.addCleanup(leadership.stop)
            nodes.append(leadership)
        first = yield poll_until(
            lambda: next((n for n in nodes if n.leading), None), what="a leader"
        )
        other = nodes[1] if first is nodes[0] else nodes[0]
        self.assertFalse(other.leading)
        # The leader's session dies (its connection cut under it, as when killed).
        import psycopg

        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'p2p-indexer leader' AND pid IN ("
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)"
            )
        yield poll_until(lambda: other.leading, what="the other node leading")
        yield poll_until(lambda: not first.leading, what="the old leader stepping down")
        yield threads.deferToThread(lambda: None)  # let the leader threads settle


class Timeouts(TestCase):
    """A node's connections give up on a vanished database host instead of hanging."""

    def test_defaults_added_and_the_uri_wins(self):
        from psycopg.conninfo import conninfo_to_dict

        got = conninfo_to_dict(
            with_timeouts("postgresql://p2p:pw@db.example:5433/p2p?connect_timeout=3")
        )
        self.assertEqual(got["connect_timeout"], "3")  # set by the operator: kept
        for key in ("keepalives", "keepalives_idle", "tcp_user_timeout"):
            self.assertEqual(got[key], TIMEOUT_DEFAULTS[key])
        self.assertEqual(
            (got["host"], got["port"], got["dbname"], got["user"], got["password"]),
            ("db.example", "5433", "p2p", "p2p", "pw"),
        )

    def test_the_store_connects_with_them(self):
        from psycopg.conninfo import conninfo_to_dict

        store = PgStore("postgresql:///p2p?host=/run/postgresql")
        self.assertEqual(conninfo_to_dict(store.uri)["connect_timeout"], "10")
        self.assertNotIn("connect_timeout", store.path)  # messages name the URI as given
