"""Issue 9 item 6: every start-up failure is one line on the terminal, never a traceback.

Each case starts a real ``twistd`` that must not start, twice: logging to the
terminal, and with ``--logfile`` (when twistd points its stderr into the log,
so a traceback used to leave the terminal silent). Each time: exactly one
``s> ... cannot ...`` line naming the file or port, on the real stdout; no
``Traceback`` on stdout or stderr (nor in the log file); a non-zero status.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from p2p.indexer.store import Store
from tests.support import TWISTD, deadline, run_command, spawn
from tests.test_harden_diskfull import LIMITED

ROOT = os.geteuid() == 0
#: A logger address for a stack whose own logger's port is left to the kernel.
NOWHERE = "--logger=tcp:host=127.0.0.1:port=1"


def folder(testcase: TestCase) -> Path:
    path = Path(testcase.mktemp()).resolve()
    path.mkdir(parents=True)
    return path


def real_database(path: Path, users: int = 0) -> None:
    """An indexer database with ``users`` users, each with a published file."""
    store = Store(str(path))
    store.open()
    for n in range(users):
        store.add_user(f"u{n}")
        store.add_file(f"u{n}", "f", "d" * 200)
    store.commit()
    store.close()


def taken_port(testcase: TestCase) -> int:
    """A port something else listens on, until the test ends."""
    from twisted.internet.protocol import ServerFactory

    port = reactor.listenTCP(0, ServerFactory(), interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


class StartFailures(TestCase):
    @defer.inlineCallbacks
    def assert_one_line(
        self, cwd: Path, plugin: str, options: list[str], names: str, limit: int | None = None
    ):
        """Run ``twistd plugin options`` in ``cwd`` with and without --logfile; both must
        end non-zero with one ``s> ... cannot ...`` line holding ``names``, no traceback."""
        said = []
        for logfile in ([], ["--logfile=twistd.log"]):
            args = [*TWISTD, "-n", "--pidfile=", *logfile, plugin, *options]
            if limit is not None:
                args = [sys.executable, "-c", LIMITED, str(limit), *args]
            proc = spawn(self, args, cwd=cwd, name=plugin)
            code = yield deadline(proc.ended)
            out = proc.lines + proc.errlines
            where = f"{logfile} {options}:\n{proc.output()}"
            self.assertNotEqual(code, 0, where)
            self.assertIsNotNone(code, where)  # an exit, not a signal
            self.assertFalse([line for line in out if "Traceback" in line], where)
            lines = [line for line in out if line.startswith("s> ") and " cannot " in line]
            self.assertEqual(len(lines), 1, where)
            self.assertIn(names, lines[0], where)
            if logfile:
                others = [line for line in out if line and line not in lines]
                # the terminal holds operator lines only (a stack's parts may have listened)
                self.assertFalse([o for o in others if not o.startswith(("p2p-", "s> "))], where)
                log = (cwd / "twistd.log").read_text()
                self.assertNotIn("Traceback", log)
                (cwd / "twistd.log").unlink()
            said.append(lines[0])
        self.assertEqual(said[0], said[1])
        return said[0]

    def indexer(self, cwd: Path, *options: str, names: str, db: str = "ix.db"):
        options = ["--db", db, "--listen", "tcp:0:interface=127.0.0.1", *options]
        return self.assert_one_line(cwd, "p2p-indexer", options, names)

    # --- The indexer's database ---------------------------------------------------

    @defer.inlineCallbacks
    def test_not_a_database(self):
        cwd = folder(self)
        (cwd / "ix.db").write_bytes(b"these are not the pages of an SQLite database\n" * 100)
        line = yield self.indexer(cwd, names="ix.db")
        self.assertIn("not an SQLite database", line)
        self.assertIn("restore it from a backup, or move it aside", line)

    @defer.inlineCallbacks
    def test_truncated_database(self):
        cwd = folder(self)
        real_database(cwd / "whole.db", users=2000)
        data = (cwd / "whole.db").read_bytes()
        for size in (len(data) // 2, 50):  # cut mid-table, and inside the header
            (cwd / "ix.db").write_bytes(data[:size])
            line = yield self.indexer(cwd, names="ix.db")
            self.assertIn("damaged", line)

    @defer.inlineCallbacks
    def test_foreign_database_is_refused_untouched(self):
        cwd = folder(self)
        db = sqlite3.connect(cwd / "ix.db")
        db.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT)")
        db.commit()
        db.close()
        before = (cwd / "ix.db").read_bytes()
        line = yield self.indexer(cwd, names="ix.db")
        self.assertIn("not an indexer's (its tables: photos)", line)
        self.assertEqual((cwd / "ix.db").read_bytes(), before)  # no table of ours added

    @defer.inlineCallbacks
    def test_unreadable_database(self):
        cwd = folder(self)
        (cwd / "ix.db").mkdir()  # unreadable as a database, for root too
        line = yield self.indexer(cwd, names="ix.db")
        self.assertIn("cannot be opened", line)
        if not ROOT:  # root reads any file whatever its mode
            real_database(cwd / "locked.db")
            (cwd / "locked.db").chmod(0)
            self.addCleanup((cwd / "locked.db").chmod, 0o600)
            yield self.indexer(cwd, names="locked.db", db="locked.db")

    @defer.inlineCallbacks
    def test_orphan_files_row_refused_then_pruned(self):
        cwd = folder(self)
        real_database(cwd / "ix.db", users=1)
        db = sqlite3.connect(cwd / "ix.db")
        db.execute("INSERT INTO files (user, name, description) VALUES ('ghost', 'g.txt', 'x')")
        db.commit()
        db.close()
        line = yield self.indexer(cwd, names="ix.db")
        self.assertIn("file 'g.txt' of user 'ghost', who does not exist", line)
        self.assertIn("p2p-admin prune --db ix.db", line)
        admin = [sys.executable, "-m", "p2p.indexer.admin", "prune", "--db", "ix.db"]
        out, err, code = yield run_command(admin, cwd=cwd)
        self.assertEqual((code, err), (0, b""))
        self.assertIn(b"pruned 1 published file(s)", out)
        store = Store(str(cwd / "ix.db"))
        self.addCleanup(store.close)
        self.assertEqual(
            {n: dict(u.files) for n, u in store.load().items()}, {"u0": {"f": "d" * 200}}
        )

    # --- The indexer's key and port ---------------------------------------------

    @defer.inlineCallbacks
    def test_unusable_key_files(self):
        cwd = folder(self)
        (cwd / "ix.db.tls.pem").write_bytes(b"junk")
        line = yield self.indexer(cwd, names="ix.db.tls.pem")
        self.assertIn("move it aside to make a new key", line)
        (cwd / "key.pem").write_bytes(b"junk")
        options = ["--tls-key", "key.pem", "--tls-cert", "key.pem"]
        yield self.indexer(cwd, *options, names="key.pem", db=":memory:")
        options = ["--tls-key", "key.pem", "--tls-cert", "missing.pem"]
        yield self.indexer(cwd, *options, names="missing.pem", db=":memory:")

    @defer.inlineCallbacks
    def test_indexer_port_taken(self):
        port = taken_port(self)
        options = ["--db", ":memory:", "--listen", f"tcp:{port}:interface=127.0.0.1"]
        line = yield self.assert_one_line(folder(self), "p2p-indexer", options, str(port))
        self.assertIn("choose another --listen", line)

    # --- The logger -------------------------------------------------------------

    def logger(self, cwd: Path, *options: str, names: str, limit: int | None = None):
        options = ["--no-rpcbind", "--listen", "tcp:0:interface=127.0.0.1", *options]
        return self.assert_one_line(cwd, "p2p-logger", options, names, limit)

    @defer.inlineCallbacks
    def test_audit_file_unusable(self):
        cwd = folder(self)
        (cwd / "audit.log").mkdir()
        line = yield self.logger(cwd, "--audit-file", "audit.log", names="audit.log")
        self.assertIn("it is a folder", line)
        if not ROOT:
            (cwd / "ro").mkdir(mode=0o500)
            self.addCleanup((cwd / "ro").chmod, 0o700)
            yield self.logger(cwd, "--audit-file", "ro/audit.log", names="ro/audit.log")

    @defer.inlineCallbacks
    def test_audit_disk_full_at_start(self):
        """The journal is compacted at start: under a file size limit below its size
        (a full disk), that write fails."""
        cwd = folder(self)
        lines = [json.dumps({"s": f"sender{n:05d}", "q": n}) for n in range(2000)]
        (cwd / "audit.log.state").write_text("\n".join(lines) + "\n")
        line = yield self.logger(
            cwd, "--audit-file", "audit.log", names="audit.log.state", limit=16 * 1024
        )
        self.assertIn("free some space", line)

    @defer.inlineCallbacks
    def test_logger_port_taken(self):
        port = taken_port(self)
        options = ["--no-rpcbind", "--listen", f"tcp:{port}:interface=127.0.0.1"]
        options += ["--audit-file", "audit.log"]
        yield self.assert_one_line(folder(self), "p2p-logger", options, str(port))

    # --- The time service and the stack -------------------------------------------

    @defer.inlineCallbacks
    def test_time_port_taken(self):
        port = taken_port(self)
        options = ["--listen", f"tcp:{port}:interface=127.0.0.1"]
        yield self.assert_one_line(folder(self), "p2p-time", options, str(port))

    @defer.inlineCallbacks
    def test_stack_says_which_part_once(self):
        cwd = folder(self)
        (cwd / "ix.db").write_bytes(b"not a database\n" * 100)
        common = [
            "--indexer-listen=tcp:0:interface=127.0.0.1",
            "--time-listen=tcp:0:interface=127.0.0.1",
            "--no-rpcbind",
        ]
        line = yield self.assert_one_line(
            cwd,
            "p2p-stack",
            [*common, "--logger-listen=tcp:0:interface=127.0.0.1", NOWHERE, "--db=ix.db"],
            "cannot start the stack: indexer cannot start: ix.db: file is not a database",
        )
        port = taken_port(self)
        logger = f"--logger-listen=tcp:{port}:interface=127.0.0.1"
        line = yield self.assert_one_line(
            cwd, "p2p-stack", [*common, logger, "--db=:memory:"], "stack: logger cannot listen"
        )
        self.assertIn(str(port), line)
        self.assertIn("choose another --logger-listen", line)  # the stack's option

    # --- Descriptions that are not endpoints ------------------------------------

    @defer.inlineCallbacks
    def test_listen_description_not_an_endpoint(self):
        line = yield self.assert_one_line(
            folder(self), "p2p-time", ["--listen", "nonsense:1"], "nonsense:1"
        )
        self.assertIn("give --listen a server endpoint", line)

    @defer.inlineCallbacks
    def test_logger_description_not_an_endpoint(self):
        """A bad --logger is a usage error (twistd's help and the error), not a traceback."""
        args = [*TWISTD, "-n", "--pidfile=", "p2p-indexer", "--db", ":memory:"]
        proc = spawn(self, [*args, "--logger", "nonsense:1"], cwd=folder(self))
        code = yield deadline(proc.ended)
        self.assertNotIn(code, (0, None), proc.output())
        self.assertNotIn("Traceback", proc.output())
        self.assertIn("--logger nonsense:1: Unknown endpoint type: 'nonsense'", proc.output())
