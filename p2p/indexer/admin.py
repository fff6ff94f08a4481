"""``p2p-admin``: the operator's changes to a stopped indexer's database.

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
from p2p.indexer.store import MEMORY, DatabaseBusy, Store, lock_database, unlock_database

#: The default database, as ``twistd p2p-indexer`` has it.
DEFAULT_DB = "p2p-indexer.db"
#: The operation of the audit record a release leaves.
RELEASE = "RELEASE"


class AdminError(Exception):
    """An operator request that cannot be done; the message says why."""


class ReleaseOptions(usage.Options):
    synopsis = "NAME [--db PATH]"
    longdesc = (
        "Release a claimed name whose identity was lost: remove the user with its files, "
        "its claim and its address, so the name can be registered again. The indexer "
        "must be stopped."
    )
    optParameters = [["db", None, DEFAULT_DB, "SQLite database of the indexer."]]

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
    synopsis = "[--db PATH]"
    longdesc = (
        "Delete the published files whose user does not exist (the indexer refuses to "
        "start on them). The indexer must be stopped."
    )
    optParameters = [["db", None, DEFAULT_DB, "SQLite database of the indexer."]]


class Options(usage.Options):
    """Command line of ``p2p-admin``."""

    synopsis = "release NAME [--db PATH] | prune [--db PATH]"
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
    with _locked_store(db) as store:
        count = store.prune_orphans()
        store.commit()
    return f"pruned {count} published file(s) whose user does not exist from {db}"


def release(db: str, name: str, datetime: str | None = None) -> str:
    """Release the claimed user ``name`` in the database ``db``; what was done, in a line.

    Raises :class:`AdminError` when the database is missing or in use, or the
    name does not exist or is not claimed (nothing is changed then).
    """
    with _locked_store(db) as store:
        row = store.user(name)
        if row is None:
            raise AdminError(f"no such name in {db}: {name}")
        if row.identity is None:
            raise AdminError(f"{name} is not claimed: any client may already use it")
        store.remove_user(name)
        stamp = datetime if datetime is not None else wire.format_datetime()
        store.add_outbox(wire.audit_record(name, RELEASE, stamp))
        store.commit()
    return (
        f"released {name} (claimed by key {row.identity}; {len(row.files)} published "
        f"file(s) removed): the name can be registered again"
    )


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
