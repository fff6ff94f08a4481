"""``p2p-admin``: the operator's changes to an indexer's database (SQLite: the indexer
stopped; PostgreSQL: its nodes may run).

``p2p-admin release NAME --db PATH`` releases a claimed name whose identity
(key file) was lost: the user goes, with its files, its claim and its address,
so the name can be registered, and claimed, again. An audit record
``<NAME> RELEASE <DATETIME>`` goes into the outbox in the same transaction, so
the logger hears of it when the indexer next runs with its relay.

The indexer keeps its directory in memory and holds the database's lock while
it runs (:func:`p2p.indexer.store.lock_database`); ``p2p-admin`` takes the same
lock, so it refuses to touch a database an indexer is serving from.

``p2p-admin prune --db PATH`` deletes the ``files`` rows whose user does not
exist (a database edited by hand, or restored in part). The indexer refuses to
start on such rows, naming one and this command: loading them would attach
them to whoever registers that name next.

With ``--db postgresql://...`` the nodes keep running: nothing of a user is kept
in a node's memory, so the database is the whole truth, and a release is one
transaction as a node's request is. It locks the user's row (``FOR UPDATE``:
after any request of that user under way on any node, before any that comes
next, which then finds no such user), deletes it (its files go with it) and
writes the audit record numbered through the outbox counter in the same
transaction, so the leader relays it in commit order among the nodes' records.
A connection holding the released user's lease (``HOLD``) on some node is closed
by that node at its next renewal, which finds the lease gone, as when the user
disconnected elsewhere. It waits for a row lock :data:`LOCK_TIMEOUT` seconds at
most, then refuses (nothing changed). Nothing is created: a database without
the indexer's tables is refused.
"""

from __future__ import annotations

import getopt
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from twisted.python import usage

from p2p import wire
from p2p.console import parse_command_line
from p2p.indexer.pgstore import insert_records, is_postgres, shown, with_timeouts
from p2p.indexer.store import MEMORY, DatabaseBusy, Store, lock_database, unlock_database

#: The default database, as ``twistd p2p-indexer`` has it.
DEFAULT_DB = "p2p-indexer.db"
#: The operation of the audit record a release leaves.
RELEASE = "RELEASE"
#: On PostgreSQL: seconds a command waits for a row lock a node holds, at most.
LOCK_TIMEOUT = 10.0
#: The tables a PostgreSQL database must have to be an indexer's.
PG_TABLES = ("users", "files", "outbox", "outbox_counter")
#: The help of ``--db``.
DB_HELP = "The indexer's SQLite file, or PostgreSQL URI (postgresql://...)."


class AdminError(Exception):
    """An operator request that cannot be done; the message says why."""


class ReleaseOptions(usage.Options):
    synopsis = "NAME [--db PATH|URI]"
    longdesc = (
        "Release a claimed name whose identity was lost: remove the user with its files, "
        "its claim and its address, so the name can be registered again. On SQLite the "
        "indexer must be stopped; on PostgreSQL the nodes may run."
    )
    optParameters = [["db", None, DEFAULT_DB, DB_HELP]]

    def parseOptions(self, options: list[str] | None = None) -> None:
        """As usual, but options may follow NAME (``release NAME --db PATH``)."""
        try:
            found, names = getopt.gnu_getopt(options or [], self.shortOpt, self.longOpt)
        except getopt.GetoptError as exc:
            raise usage.UsageError(str(exc)) from None
        flat = [f"{opt}={value}" if f"{opt[2:]}=" in self.longOpt else opt for opt, value in found]
        super().parseOptions([*flat, "--", *names])

    def parseArgs(self, name: str) -> None:
        self["name"] = name


class PruneOptions(usage.Options):
    synopsis = "[--db PATH|URI]"
    longdesc = (
        "Delete the published files whose user does not exist (the indexer refuses to "
        "start on them). On SQLite the indexer must be stopped; on PostgreSQL the nodes "
        "may run."
    )
    optParameters = [["db", None, DEFAULT_DB, DB_HELP]]


class Options(usage.Options):
    """Command line of ``p2p-admin``."""

    synopsis = "release NAME [--db PATH|URI] | prune [--db PATH|URI]"
    subCommands = [
        ["release", None, ReleaseOptions, "Release a claimed name whose identity was lost."],
        ["prune", None, PruneOptions, "Delete published files whose user does not exist."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("which command? (release, prune)")


def _check_database(db: str) -> None:
    """Refuse a path that is not an existing indexer database, without creating anything."""
    if db == MEMORY:
        raise AdminError(f"{MEMORY} keeps nothing between runs: there is nothing to release")
    if not Path(db).is_file():
        raise AdminError(f"no such database: {db}")
    try:
        probe = sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True)
        try:
            found = probe.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'users'"
            ).fetchone()
        finally:
            probe.close()
    except sqlite3.DatabaseError as exc:
        raise AdminError(f"{db} is not an indexer database ({exc})") from None
    if found is None:
        raise AdminError(f"{db} is not an indexer database (it has no users table)")


@contextmanager
def _locked_store(db: str) -> Iterator[Store]:
    """The open store of the stopped indexer's database ``db``, under its lock."""
    _check_database(db)
    try:
        lock = lock_database(db)
    except DatabaseBusy:
        raise AdminError(f"{db} is in use by a running indexer: stop the indexer first") from None
    store = Store(db)
    try:
        store.open()
        yield store
    finally:
        store.close()
        unlock_database(lock)


def prune(db: str) -> str:
    """Delete the ``files`` rows of ``db`` whose user does not exist; what was done, in a line."""
    if is_postgres(db):
        count = _pg_transaction(db, _pg_prune)
        return f"pruned {count} published file(s) whose user does not exist from {shown(db)}"
    with _locked_store(db) as store:
        count = store.prune_orphans()
        store.commit()
    return f"pruned {count} published file(s) whose user does not exist from {db}"


def release(db: str, name: str, datetime: str | None = None) -> str:
    """Release the claimed user ``name`` in the database ``db``; what was done, in a line.

    Raises :class:`AdminError` when the database is missing or in use, or the
    name does not exist or is not claimed (nothing is changed then).
    """
    record = wire.audit_record(
        name, RELEASE, datetime if datetime is not None else wire.format_datetime()
    )
    if is_postgres(db):
        identity, files = _pg_transaction(db, _pg_release, name, record)
    else:
        with _locked_store(db) as store:
            row = store.user(name)
            _check_claimed(db, name, row and (row.identity,))
            identity, files = row.identity, len(row.files)
            store.remove_user(name)
            store.add_outbox(record)
            store.commit()
    return (
        f"released {name} (claimed by key {identity}; {files} published "
        f"file(s) removed): the name can be registered again"
    )


def _check_claimed(db: str, name: str, found: tuple | None) -> None:
    """Refuse to release ``name`` unless ``found`` (its ``(identity,)``) says it is claimed."""
    if found is None:
        raise AdminError(f"no such name in {shown(db) if is_postgres(db) else db}: {name}")
    if found[0] is None:
        raise AdminError(f"{name} is not claimed: any client may already use it")


# --- PostgreSQL: the nodes run meanwhile --------------------------------------------


def _pg_transaction(db: str, work, *args):
    """``work(db, cursor, *args)`` in one transaction on the indexer database ``db`` (a
    URI), again after a deadlock; every database error becomes an :class:`AdminError`
    naming the database without its password. Nothing is created: the indexer's
    tables must be there."""
    import psycopg
    import psycopg.errors

    where = shown(db)
    try:
        with psycopg.connect(with_timeouts(db), autocommit=True) as conn:
            conn.execute(f"SET lock_timeout = {int(LOCK_TIMEOUT * 1000)}")
            for table in PG_TABLES:
                if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
                    raise AdminError(f"{where} is not an indexer database (no {table} table)")
            for attempt in range(3):
                try:
                    with conn.transaction(), conn.cursor() as cursor:
                        return work(db, cursor, *args)
                except psycopg.errors.DeadlockDetected:
                    if attempt == 2:
                        raise
    except psycopg.errors.LockNotAvailable:
        raise AdminError(
            f"{where}: a node held the user's row for {LOCK_TIMEOUT:g} s: nothing changed, "
            "try again"
        ) from None
    except psycopg.Error as exc:
        raise AdminError(f"{where}: {' '.join(str(exc).split())}") from None
    raise AssertionError("unreachable")


def _pg_release(db: str, cursor, name: str, record: str) -> tuple[str, int]:
    """The release in the transaction of ``cursor``: the claim and the files' count."""
    found = cursor.execute(
        "SELECT identity FROM users WHERE name = %s FOR UPDATE", (name,)
    ).fetchone()
    _check_claimed(db, name, found)
    files = cursor.execute("SELECT count(*) FROM files WHERE owner = %s", (name,)).fetchone()[0]
    cursor.execute("DELETE FROM users WHERE name = %s", (name,))  # its files go with it
    insert_records(cursor, [record])
    return found[0], files


def _pg_prune(db: str, cursor) -> int:
    """The prune in the transaction of ``cursor``: how many rows went. (The schema's
    foreign key makes such rows impossible unless it was dropped by hand.)"""
    cursor.execute(
        "DELETE FROM files f WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.name = f.owner)"
    )
    return cursor.rowcount


def main(argv: list[str] | None = None) -> None:
    """Run one ``p2p-admin`` command; exit 0 when done, 1 when refused, 2 on bad usage."""
    options = Options()
    parse_command_line(options, argv, "p2p-admin")
    command = options.subOptions
    try:
        if options.subCommand == "prune":
            done = prune(command["db"])
        else:
            done = release(command["db"], command["name"])
    except (AdminError, sqlite3.Error) as exc:
        sys.stderr.write(f"p2p-admin: {exc}\n")
        sys.exit(1)
    sys.stdout.write(f"p2p-admin: {done}\n")


if __name__ == "__main__":
    main()
