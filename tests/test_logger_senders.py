"""The logger's memory of relay senders is bounded, and its journal compacts off the reactor.

Any client can make up relay sender ids (the AUTH_SYS machine name
``p2p-outbox:<sender>:<seq>``); each one used to cost the logger memory and
journal space forever. Unit tests drive ``AuditLog`` directly; the end-to-end
test floods a real ``twistd p2p-logger`` with made-up senders.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.logcontract import LOG_OK, relay_machinename
from p2p.logger.audit import AuditLog
from p2p.oncrpc import client as rpc_client
from p2p.oncrpc import rpc
from tests.support import deadline, logger_ports, spawn_twistd


class BoundedSendersTests(TestCase):
    def test_the_sender_that_stored_least_recently_is_forgotten(self):
        audit = AuditLog(self.mktemp(), echo=False, max_senders=3)
        audit.open()
        for sender in ("a", "b", "c"):
            audit.store(f"r {sender}", sender, 1)
        audit.store("r a 2", "a", 2)  # a is now the most recent
        audit.store("r d", "d", 1)  # over the bound: b goes, not a
        self.assertEqual(list(audit.last_seq), ["c", "a", "d"])
        self.assertEqual(audit.forgotten, 1)
        # A remembered sender's resend is still recognised.
        self.assertFalse(audit.store("r a 2", "a", 2))
        audit.close()
        again = AuditLog(audit.path, echo=False, max_senders=3)
        again.open()
        self.addCleanup(again.close)
        self.assertEqual(dict(again.last_seq), {"c": 1, "a": 2, "d": 1})
        # The compacted journal holds the bound, not every sender ever seen.
        self.assertEqual(len(again.state_path.read_bytes().splitlines()), 3)

    def test_a_long_journal_replays_into_the_bound(self):
        path = self.mktemp()
        audit = AuditLog(path, echo=False, compact_at=1 << 30)  # never compacts while running
        audit.open()
        for i in range(2000):
            audit.store(f"r{i}", f"made-up-{i}", 1)
        audit.close()
        again = AuditLog(path, echo=False, max_senders=10)
        again.open()
        self.addCleanup(again.close)
        self.assertEqual(list(again.last_seq), [f"made-up-{i}" for i in range(1990, 2000)])


class ThreadedCompactionTests(TestCase):
    """Compaction's file write runs where ``run_in_thread`` says; records go on meanwhile."""

    def setUp(self) -> None:
        self.jobs: list[tuple[defer.Deferred, object, tuple]] = []
        self.audit = AuditLog(self.mktemp(), echo=False, compact_at=400, run_in_thread=self.later)
        self.audit.open()
        self.addCleanup(self.audit.close)

    def later(self, function, *args) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.jobs.append((d, function, args))
        return d

    def run_jobs(self) -> None:
        jobs, self.jobs = self.jobs, []
        for d, function, args in jobs:
            try:
                result = function(*args)
            except Exception:
                d.errback()
            else:
                d.callback(result)

    def test_records_stored_during_compaction_are_kept(self):
        seq = 0
        while not self.jobs:  # until the journal passes compact_at
            seq += 1
            self.audit.store(f"r{seq}", f"s{seq % 5}", seq)
        journal_before = self.audit.state_path.read_bytes()
        # The compaction's write has not run: the journal is untouched, and
        # records keep being stored and journaled.
        for extra in range(seq + 1, seq + 4):
            self.audit.store(f"r{extra}", "late", extra)
        self.assertTrue(self.audit.state_path.read_bytes().startswith(journal_before))
        self.run_jobs()
        self.audit.store("after", "s0", seq + 10)
        self.audit.close()
        again = AuditLog(self.audit.path, echo=False)
        again.open()
        self.addCleanup(again.close)
        expected = dict(self.audit.last_seq)
        self.assertEqual(dict(again.last_seq), expected)
        self.assertEqual(again.last_seq["late"], seq + 3)
        self.assertEqual(again.last_seq["s0"], seq + 10)

    def test_a_failed_write_leaves_the_journal_in_use(self):
        seq = 0
        while not self.jobs:
            seq += 1
            self.audit.store(f"r{seq}", "s", seq)
        d, _function, _args = self.jobs.pop()
        d.errback(OSError(28, "No space left on device"))
        self.audit.store("next", "s", seq + 1)
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        self.audit.close()
        again = AuditLog(self.audit.path, echo=False)
        again.open()
        self.addCleanup(again.close)
        self.assertEqual(again.last_seq["s"], seq + 1)


class MadeUpSendersTests(TestCase):
    """A real logger flooded with made-up senders stays bounded and keeps the live one."""

    @defer.inlineCallbacks
    def start(self, cwd: Path):
        proc = spawn_twistd(
            self,
            "p2p-logger",
            "--listen=tcp:0:interface=127.0.0.1",
            "--no-rpcbind",
            "--max-senders=20",
            "--audit-file=audit.log",
            cwd=cwd,
        )
        ports = yield logger_ports(proc)
        proto = yield rpc_client.connect(
            reactor,
            f"tcp:host=127.0.0.1:port={ports['tcp']}",
        )
        return proc, proto

    def log(self, proto, sender: str, seq: int, text: str) -> defer.Deferred:
        d = proto.call(
            wire.LOGGER_PROGRAM,
            wire.LOGGER_VERSION,
            wire.LOGGER_PROC_LOG,
            rpc.pack_string(text),
            cred=rpc.AuthSys(relay_machinename(sender, seq)).encode(),
        )
        return deadline(d).addCallback(rpc.unpack_int)

    @defer.inlineCallbacks
    def test_flood_of_made_up_senders(self):
        cwd = Path(self.mktemp())
        cwd.mkdir()
        proc, proto = yield self.start(cwd)
        self.assertEqual((yield self.log(proto, "indexer", 1, "alice REGISTER 1")), LOG_OK)
        for i in range(300):
            result = yield self.log(proto, f"made-up-{i}", 1, f"x{i} REGISTER 1")
            self.assertEqual(result, LOG_OK)
            if i % 15 == 0:  # the live indexer keeps relaying meanwhile
                result = yield self.log(proto, "indexer", 2 + i, f"alice PUBLISH f{i} 1")
                self.assertEqual(result, LOG_OK)
        last = 2 + 285
        proto.transport.loseConnection()
        yield proc.stop()
        # Restarted: the journal holds at most --max-senders senders, the live
        # indexer among them, so its resend of its last record is not stored twice.
        audit_before = (cwd / "audit.log").read_text()
        proc, proto = yield self.start(cwd)
        journal = (cwd / "audit.log.state").read_bytes().splitlines()
        self.assertLessEqual(len(journal), 20)
        self.assertIn(b'"s":"indexer"', b"\n".join(journal))
        self.assertEqual((yield self.log(proto, "indexer", last, "alice PUBLISH f285 1")), LOG_OK)
        self.assertEqual((cwd / "audit.log").read_text(), audit_before)
        proto.transport.loseConnection()
