"""The indexer's SQLite store: write-through persistence and the audit outbox.

The directory answers from memory; this store only records its changes so that
every acknowledged change survives ``kill -9``. Changes of one reactor turn go
into one transaction (group commit): the protocol calls the change methods as it
handles requests, then :meth:`Store.commit` once before sending the replies.

Every table is keyed so each change is one indexed statement, whatever the
number of users. The outbox holds audit records written in the same
transaction as the request they describe; the logger relay reads and deletes
them through :meth:`Store.outbox_pending` and :meth:`Store.outbox_delete_through`.

A user may be *claimed*: its ``identity`` is the key fingerprint of the TLS
certificate that registered it (NULL for a name registered classically).
Databases written before claims existed gain the column when opened.

Content identity and search (protocol.md section 8): ``files`` also holds each
file's size and SHA-256 (NULL for a classic PUBLISH). SEARCH is answered from a
database of its own beside this one, written and read by a process of its own
(:mod:`p2p.indexer.searchindex`): this store records each change SEARCH sees
while it writes it and hands the turn's changes over after its commit; each
changed row carries the number of that commit (``seq``; ``tombstones`` for the
files deleted) so the search database catches up after a ``kill -9``.
:meth:`Store.search_async` answers after every change handed over before it.
Databases written before gain the columns (and lose the search tables they kept
here) when opened.

Everything the directory, the relay and ``p2p-admin`` need goes through the
methods of :class:`Store`, so another database can stand behind the same ones.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from p2p.indexer import searchindex
from p2p.indexer.fulltext import FTS_TABLE, Hit
from p2p.indexer.searchindex import FILE, GONE, USER, Change, IndexWorker, SearchIndex

#: The database that keeps nothing (tests, throw-away runs).
MEMORY = ":memory:"
#: ``--sync`` choices and the PRAGMA synchronous each one sets.
SYNC_MODES = {"normal": "NORMAL", "full": "FULL"}
#: Audit records kept in memory at most while the disk is full (about 100 bytes each).
MAX_HELD = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    ip TEXT,
    port INTEGER,
    identity TEXT,
    seq INTEGER
);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    seq INTEGER,
    size INTEGER,
    sha256 TEXT,
    UNIQUE (user, name)
);
CREATE TABLE IF NOT EXISTS tombstones (id INTEGER NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record TEXT NOT NULL
);
"""


#: What an older version kept in this database for SEARCH: now in the search database.
_OLD_SEARCH = (
    "DROP TRIGGER IF EXISTS online_file_added",
    "DROP TRIGGER IF EXISTS online_file_removed",
    "DROP TRIGGER IF EXISTS online_user",
    "DROP TABLE IF EXISTS online",
    "DROP TABLE IF EXISTS index_queue",
    f"DROP TABLE IF EXISTS {FTS_TABLE}",
    "DELETE FROM meta WHERE key = 'indexed_through'",
)
#: How much of the database SQLite maps into memory (address space, not RAM).
MMAP_SIZE = 1 << 32
#: The bounds of a search's work (protocol.md 8.3 "As implemented"; read by
#: :mod:`p2p.indexer.searchindex` at each search): a word in ``COMMON`` files or
#: more, as a whole word, is first looked for by its first letters among the
#: newest ``PREFIX_SCAN`` files that have them.
COMMON = searchindex.MATCHING_CAP
PREFIX_SCAN = 3000
#: Tombstones (files deleted) kept past the search index's mark before they are
#: forgotten, in the group commit: one DELETE per so many.
TOMBSTONES_KEPT = 1024

#: Each file deleted leaves its tombstone from inside its DELETE (a trigger of the store's
#: own connection, which numbers it and tells SEARCH through :meth:`Store._file_gone`):
#: a ``RETURNING id`` then an INSERT per file cost PUBLISH/DELETE 2-5 us more a DELETE.
_GONE_TRIGGER = """
CREATE TEMP TRIGGER IF NOT EXISTS files_gone AFTER DELETE ON main.files BEGIN
    INSERT INTO tombstones (id, seq) VALUES (old.id, p2p_file_gone(old.id));
END
"""

#: The columns of ``users`` that make a database the indexer's (any version: the
#: other tables and columns are added when missing).
OWN_COLUMNS = frozenset({"name", "ip", "port"})


class DatabaseBusy(Exception):
    """Another process (an indexer, ``p2p-admin``) holds the database's lock."""


class ForeignDatabase(sqlite3.DatabaseError):
    """An SQLite database with tables, but not the indexer's: it is never written to."""


class OrphanFiles(sqlite3.DatabaseError):
    """``files`` rows whose user does not exist (the database was edited by hand, or damaged).

    Loading them would attach them to a later user of that name, or fail: the
    indexer refuses to start and ``p2p-admin prune`` removes them.
    """

    def __init__(self, path: str, orphans: list[tuple[str, str]]) -> None:
        user, name = orphans[0]
        rows = f"{len(orphans)} such row{'s' if len(orphans) > 1 else ''}"
        super().__init__(
            f"{path}: file {name!r} of user {user!r}, who does not exist ({rows}): "
            f"remove them with p2p-admin prune --db {path}"
        )
        self.orphans = orphans


#: What to do about a database SQLite refuses, by its error name.
_DATABASE_FIXES = {
    "SQLITE_NOTADB": "it is not an SQLite database (another file, or damaged): restore it "
    "from a backup, or move it aside to start with an empty directory",
    "SQLITE_CORRUPT": "it is damaged (truncated or corrupt): restore it from a backup, or move "
    "it aside (with its -wal and -shm files) to start with an empty directory",
    "SQLITE_CANTOPEN": "it cannot be opened: give a path to a file this user can read and "
    "write, in a folder that exists",
    "SQLITE_READONLY": "it cannot be written: give this user write access to it and its folder",
    "SQLITE_PERM": "it cannot be written: give this user write access to it and its folder",
    "SQLITE_FULL": "its disk is full: free some space",
    "SQLITE_IOERR": "reading or writing it failed (a full disk, a file size limit or a "
    "failing device): free some space or check the device",
}


def database_problem(path: str, exc: sqlite3.Error) -> str:
    """``PATH: what is wrong: what to do`` for a database that cannot be used, in one line."""
    if isinstance(exc, (ForeignDatabase, OrphanFiles)):
        return str(exc)
    name = getattr(exc, "sqlite_errorname", "") or ""  # extended: SQLITE_IOERR_WRITE...
    fix = next((f for k, f in _DATABASE_FIXES.items() if f"{name}_".startswith(f"{k}_")), "")
    said = " ".join(str(exc).split())
    return f"{path}: {said}: {fix}" if fix else f"{path}: {said}"


def lock_database(path: str) -> int | None:
    """Take the exclusive lock of the database at ``path`` (``<path>.lock``); its fd.

    The indexer holds it while it runs, ``p2p-admin`` while it changes the
    database, so neither changes rows under the other's feet. The lock goes
    with the process (``kill -9`` too). None for :data:`MEMORY`, which no other
    process can open. Raises :class:`DatabaseBusy` when it is held.
    """
    if path == MEMORY:
        return None
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DatabaseBusy(f"{path} is in use by another process (its lock {path}.lock)") from None
    return fd


def unlock_database(fd: int | None) -> None:
    """Give back what :func:`lock_database` took."""
    if fd is not None:
        os.close(fd)


@dataclass(slots=True)
class UserRow:
    """One user as loaded: the address when connected, the published files in order.

    ``identity`` is the fingerprint that claimed the name (None: unclaimed).
    """

    address: tuple[str, int] | None = None
    files: dict[str, str] = field(default_factory=dict)
    identity: str | None = None


class Store:
    """SQLite persistence of the directory, with group commit and the audit outbox.

    Not thread-safe: every call happens on the reactor thread.
    """

    log = Logger()

    def __init__(self, path: str = MEMORY, sync: str = "normal", max_held: int = MAX_HELD) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {sorted(SYNC_MODES)}, not {sync!r}")
        self.path = path
        self.sync = sync
        self._db: sqlite3.Connection | None = None
        self._in_transaction = False
        self._outbox_added = False
        #: Highest outbox seq that is committed (the relay never sees uncommitted rows).
        self._committed_seq = 0
        self._last_seq = 0
        self._listeners: list[Callable[[], None]] = []
        self._sender_id = ""
        #: Audit records of the open transaction (held back if it fails).
        self._records: list[str] = []
        #: Audit records waiting for the store to take writes again (disk full), oldest first.
        self.held: deque[str] = deque()
        #: How many records may be held; beyond, requests are refused (Directory).
        self.max_held = max_held
        #: The last commit failed and no write succeeded since: changes are refused.
        self.failing = False
        #: How many files there are (None: not counted since the last rollback).
        self._file_count: int | None = None
        #: The open transaction changes the directory (see :attr:`changes`).
        self._changes = False
        #: What SEARCH must see of the open transaction's changes, in order (handed to
        #: the search side after the commit), and the number that commit gets.
        self._log: list[Change] = []
        self._change_seq = 0
        #: How much of ``_log`` a memory store's index holds already (see :meth:`search`).
        self._inline = 0
        #: The search side: None until opened (:meth:`open_index`); a memory store's
        #: is a :class:`SearchIndex` on its own connection, a file's an :class:`IndexWorker`.
        self._index: SearchIndex | IndexWorker | None = None
        #: Searches asked while the open transaction holds changes: handed over after it.
        self._waiting: list[tuple[list[str], int, Deferred]] = []
        #: Tombstones written since they were last forgotten.
        self._tombstones = 0
        #: Where :meth:`search_async` delivers its results (None: the global reactor).
        self.reactor = None

    # --- Life cycle --------------------------------------------------------

    def open(self) -> None:
        """Open (creating if needed) the database; idempotent."""
        if self._db is not None:
            return
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._prepare(db)
        except BaseException:
            db.close()
            raise
        self._db = db

    def _prepare(self, db: sqlite3.Connection) -> None:
        """Check that ``db`` is empty or the indexer's, then bring its tables up to date."""
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        columns = {row[1] for row in db.execute("PRAGMA table_info(users)")}
        if tables and not columns >= OWN_COLUMNS:  # before anything is written into it
            shown = ", ".join(sorted(tables)[:5])
            raise ForeignDatabase(
                f"{self.path} is an SQLite database, but not an indexer's (its tables: "
                f"{shown}): give --db the indexer's database, or a new path"
            )
        if self.path != MEMORY:
            db.execute("PRAGMA journal_mode=WAL")
            # SEARCH reads rows all over the files and the index: mapped, a page read
            # is a memory access, not a system call.
            db.execute(f"PRAGMA mmap_size={MMAP_SIZE}")
        db.execute(f"PRAGMA synchronous={SYNC_MODES[self.sync]}")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(users)")}
        for column, kind in (("identity", "TEXT"), ("seq", "INTEGER")):
            if column not in columns:  # a database of a version without claims, or search
                db.execute(f"ALTER TABLE users ADD COLUMN {column} {kind}")
        columns = {row[1] for row in db.execute("PRAGMA table_info(files)")}
        for column, kind in (("seq", "INTEGER"), ("size", "INTEGER"), ("sha256", "TEXT")):
            if column not in columns:  # a database of a version without search
                db.execute(f"ALTER TABLE files ADD COLUMN {column} {kind}")
        db.execute(
            "CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256) WHERE sha256 IS NOT NULL"
        )
        db.create_function("p2p_file_gone", 1, self._file_gone)
        db.execute(_GONE_TRIGGER)
        if "online" in tables or FTS_TABLE in tables:  # a version that searched in here
            for statement in _OLD_SEARCH:
                db.execute(statement)
        row = db.execute("SELECT value FROM meta WHERE key = 'sender_id'").fetchone()
        if row is None:
            self._sender_id = uuid.uuid4().hex
            db.execute("INSERT INTO meta (key, value) VALUES ('sender_id', ?)", (self._sender_id,))
        else:
            self._sender_id = row[0]
        self._change_seq = max(searchindex.last_change(db), self._index_mark())
        if self.path == MEMORY:  # its search side: a memory database beside, same connection
            db.execute("ATTACH DATABASE ':memory:' AS search")
            self._index = SearchIndex(db, "search")
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        self._committed_seq = self._last_seq = row[0] if row else 0

    def close(self) -> None:
        """Commit what is pending, write the held audit records if it can, and close."""
        if self._db is None:
            return
        if self._in_transaction:
            self.commit()
        if self.held and not self.writable():
            self.log.warn(
                "{path}: {n} audit records could not be written (disk full?) and are lost",
                path=self.path,
                n=len(self.held),
            )
        self._release_waiting()
        index, self._index = self._index, None
        if isinstance(index, IndexWorker):
            index.stop()  # what was handed over is written, what was asked answered
        self._db.close()
        self._db = None

    def open_index(self) -> None:
        """Open the search side, bringing it up to date first: a file database's search
        database (``<path>.search``, created and filled if missing), then its process
        (:class:`IndexWorker`). The indexer opens it at start; otherwise the first
        search does.

        Until it is open, committed changes are not handed over (``p2p-admin``):
        they are read from this database when it opens.
        """
        if self._index is not None:
            return
        if self._db is None:
            self.open()
        # (In a transaction, its changes are sent at its commit: the catch-up reads
        # only what is committed, on a connection of its own.)
        search_path = self.path + searchindex.SUFFIX
        search = searchindex.open_search_database(search_path)
        try:
            reader = sqlite3.connect(self.path, isolation_level=None)
            try:
                applied = searchindex.catch_up(SearchIndex(search), reader, self.sender_id)
            finally:
                reader.close()
        finally:
            search.close()
        self._change_seq = max(self._change_seq, applied)
        self._index = IndexWorker(self.path, search_path, self.sender_id, applied, self._clock())

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self.open()
        assert self._db is not None
        return self._db

    def load(self) -> dict[str, UserRow]:
        """Every user with address and files, as the directory keeps them in memory."""
        users: dict[str, UserRow] = {}
        for name, ip, port, identity in self.db.execute(
            "SELECT name, ip, port, identity FROM users ORDER BY rowid"
        ):
            users[name] = _row(ip, port, identity)
        orphans: list[tuple[str, str]] = []
        for user, name, description in self.db.execute(
            "SELECT user, name, description FROM files ORDER BY id"
        ):
            row = users.get(user)
            if row is None:
                orphans.append((user, name))
            else:
                row.files[name] = description
        if orphans:
            raise OrphanFiles(self.path, orphans)
        return users

    def prune_orphans(self) -> int:
        """Delete the ``files`` rows whose user does not exist (``p2p-admin prune``); how many."""
        db = self._begin()
        gone = db.execute("DELETE FROM files WHERE user NOT IN (SELECT name FROM users)").rowcount
        self._file_count = None
        return gone

    def user(self, name: str) -> UserRow | None:
        """One user with address, claim and files (None if there is no such user)."""
        found = self.db.execute(
            "SELECT ip, port, identity FROM users WHERE name = ?", (name,)
        ).fetchone()
        if found is None:
            return None
        row = _row(*found)
        for file_name, description in self.db.execute(
            "SELECT name, description FROM files WHERE user = ? ORDER BY id", (name,)
        ):
            row.files[file_name] = description
        return row

    # --- Changes (inside the current group transaction) -----------------------

    def _begin(self, change: bool = True) -> sqlite3.Connection:
        """The connection, in the group transaction; ``change``: what is written is a
        change of the directory (not an audit record, a probe or the index's upkeep)."""
        db = self._db if self._db is not None else self.db
        if not self._in_transaction:
            db.execute("BEGIN")
            self._in_transaction = True
            self._changes = False
        if change:
            self._changes = True
        return db

    @property
    def changes(self) -> bool:
        """Whether the open transaction changes the directory: when its commit fails,
        only the replies of a transaction without changes may stand (reads, whose
        audit records are then held)."""
        return self._in_transaction and self._changes

    @property
    def in_transaction(self) -> bool:
        """True while changes wait for :meth:`commit`."""
        return self._in_transaction

    def add_user(self, name: str, identity: str | None = None) -> None:
        """A new user, offline, claimed by ``identity`` (a fingerprint) or unclaimed."""
        self._begin().execute("INSERT INTO users (name, identity) VALUES (?, ?)", (name, identity))

    def remove_user(self, name: str) -> None:
        """The user, its files and its claim."""
        db = self._begin()
        db.execute("DELETE FROM files WHERE user = ?", (name,))
        db.execute("DELETE FROM users WHERE name = ?", (name,))
        self._file_count = None

    def set_address(self, name: str, address: tuple[str, int] | None) -> None:
        ip, port = address if address is not None else (None, None)
        seq = self._change_seq + 1
        self._begin().execute(
            "UPDATE users SET ip = ?, port = ?, seq = ? WHERE name = ?", (ip, port, seq, name)
        )
        self._log.append((USER, name, address is not None))

    def add_file(
        self,
        user: str,
        name: str,
        description: str,
        size: int | None = None,
        sha256: str | None = None,
    ) -> None:
        """A new entry of ``user`` (PUBLISH: no size, no hash), searchable at once."""
        db = self._begin()
        cursor = db.execute(
            "INSERT INTO files (user, name, description, size, sha256, seq)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (user, name, description, size, sha256, self._change_seq + 1),
        )
        self._log.append((FILE, cursor.lastrowid, user, name, description, size, sha256))
        if self._file_count is not None:
            self._file_count += 1

    def publish_file(
        self, user: str, name: str, description: str, size: int | None, sha256: str | None
    ) -> None:
        """Create ``user``'s entry ``name``, or update its description, size and hash in
        place (it keeps its id, hence its place in the owner's listing)."""
        db = self._begin()
        old = db.execute(
            "UPDATE files SET description = ?, size = ?, sha256 = ?, seq = ?"
            " WHERE user = ? AND name = ? RETURNING id",
            (description, size, sha256, self._change_seq + 1, user, name),
        ).fetchone()
        if old is None:
            self.add_file(user, name, description, size, sha256)
            return
        self._log.append((FILE, old[0], user, name, description, size, sha256))

    def remove_file(self, user: str, name: str) -> None:
        deleted = (
            self._begin()
            .execute("DELETE FROM files WHERE user = ? AND name = ?", (user, name))
            .rowcount
        )
        if deleted and self._file_count is not None:
            self._file_count -= 1

    def _file_gone(self, file_id: int) -> int:
        """File ``file_id`` is being deleted (called by :data:`_GONE_TRIGGER`, in the open
        transaction): SEARCH is told; the number of its tombstone (read by a catch-up)."""
        self._log.append((GONE, file_id))
        self._tombstones += 1
        return self._change_seq + 1

    # --- Reads of content identity and search (protocol.md section 8) -----------

    def list_files(self, owner: str) -> list[tuple[str, str, int | None, str | None]]:
        """``owner``'s files as LIST_FILES lists them: name, description, size, sha256
        (None when published without), in the order LIST_CONTENT lists them."""
        return self.db.execute(
            "SELECT name, description, size, sha256 FROM files WHERE user = ? ORDER BY id",
            (owner,),
        ).fetchall()

    def search(self, words: list[str], limit: int) -> list[Hit]:
        """The best ``limit`` files of connected owners matching every word, best first
        (:meth:`p2p.indexer.searchindex.SearchIndex.search`), after every committed
        change; waits for the worker (tests, benchmarks, tools: the indexer asks
        :meth:`search_async`). A memory store's sees the open transaction's too."""
        if isinstance(self._ready_index(), SearchIndex):
            return self._search_now(words, limit)
        answer: Future = Future()
        worker = self._worker()
        worker.search(words, limit, answer.set_result)
        worker.flush()  # no reactor may run to write it: written here, then waited for
        result = answer.result()
        if isinstance(result, Exception):
            raise result
        return result

    def search_async(self, words: list[str], limit: int) -> Deferred:
        """:meth:`search` without waiting: a Deferred of the hits, fired on the reactor
        thread, that sees every change made before it, committed or in the open
        transaction (SEARCH: every acknowledged change). A memory store's has fired
        already; a file store's search process searches after it applied every change
        sent before, and the changes of the open transaction are sent by its commit,
        the search right after. Errbacks with what kept the search from being
        answered (the process could not write the changes before it, say).
        """
        if isinstance(self._ready_index(), SearchIndex):
            return succeed(self._search_now(words, limit))
        found: Deferred = Deferred()
        if self._log:
            self._waiting.append((words, limit, found))
        else:
            self._ask(words, limit, found)
        return found

    def _ready_index(self) -> SearchIndex | IndexWorker:
        index = self._index
        if isinstance(index, IndexWorker) and index.gone:
            # The search process died (killed, say): a new one, caught up from this
            # database, which holds every change the old one may have missed.
            self.log.warn("{path}: the search process is gone; starting another", path=self.path)
            self._index = None
            index.stop()
        if self._index is None:
            self.open_index()
        assert self._index is not None
        return self._index

    def _worker(self) -> IndexWorker:
        index = self._ready_index()
        assert isinstance(index, IndexWorker)
        return index

    def _search_now(self, words: list[str], limit: int) -> list[Hit]:
        """A memory store's search: its index brought up to date in the open transaction."""
        index = self._index
        assert isinstance(index, SearchIndex)
        if len(self._log) > self._inline and not (self.failing or self.held):
            # (on a full disk the index is searched as it is: the changes of a
            # transaction that cannot commit are never seen)
            index.apply(self._log[self._inline :])
            self._inline = len(self._log)
        return index.search(words, limit)

    def _clock(self):
        """The reactor: :attr:`reactor`, or the global one."""
        if self.reactor is not None:
            return self.reactor
        from twisted.internet import reactor

        return reactor

    def _ask(self, words: list[str], limit: int, found: Deferred) -> None:
        """Hand a search to the worker; its result fires ``found`` on the reactor thread."""
        reactor = self._clock()

        def deliver(result: object) -> None:
            fire = found.errback if isinstance(result, Exception) else found.callback
            reactor.callFromThread(fire, result)

        self._worker().search(words, limit, deliver)

    def _release_waiting(self) -> None:
        """Hand over the searches that waited for the open transaction's changes."""
        waiting, self._waiting = self._waiting, []
        for words, limit, found in waiting:
            self._ask(words, limit, found)

    def sources(self, sha256: str, limit: int, exclude: str | None = None) -> list[tuple[str, str]]:
        """``(owner, file name)`` of the files with this SHA-256 whose owner is connected
        (and is not ``exclude``), by owner then name (code point order), at most
        ``limit`` (SOURCES, protocol.md 8.6)."""
        return self.db.execute(
            "SELECT f.user, f.name FROM files f JOIN users u ON u.name = f.user"
            " WHERE f.sha256 = ? AND u.ip IS NOT NULL AND f.user IS NOT ?"
            " ORDER BY f.user, f.name LIMIT ?",
            (sha256, exclude, limit),
        ).fetchall()

    def file_count(self) -> int:
        """How many files are published (kept up to date once counted)."""
        if self._file_count is None:
            self._file_count = self.db.execute("SELECT count(*) FROM files").fetchone()[0]
        return self._file_count

    def add_outbox(self, record: str) -> None:
        """Queue one audit record in the current transaction, or hold it in memory while
        the store refuses writes (:meth:`writable`; beyond ``max_held`` it is dropped:
        the Directory refuses such requests first)."""
        if self.failing or self.held:
            if len(self.held) < self.max_held:
                self.held.append(record)
            return
        self._insert_record(record)

    def _insert_record(self, record: str) -> None:
        cursor = self._begin(change=False).execute(
            "INSERT INTO outbox (record) VALUES (?)", (record,)
        )
        self._last_seq = cursor.lastrowid
        self._outbox_added = True
        self._records.append(record)

    # --- A full disk ------------------------------------------------------------

    def writable(self) -> bool:
        """Whether the store takes writes: after a failed commit (a full disk), tries a
        one-page commit, then writes the held audit records; True once both succeed.

        While it is False the Directory answers reads from memory, holding their
        audit records here, and refuses changes: so reads go on, and every
        record is written once, in order, when space returns.
        """
        if not (self.failing or self.held):
            return True
        if self._in_transaction:
            return False  # the turn's own commit decides
        try:
            self._begin(change=False).execute(
                "UPDATE meta SET value = value WHERE key = 'sender_id'"
            )
            self.commit()  # the cheap probe: one page
            held, self.held = self.held, deque()
            for record in held:
                self._insert_record(record)
            self.commit()
        except sqlite3.Error:
            return False
        self.failing = False
        self.log.info("{path} takes writes again", path=self.path)
        return True

    def serves(self, change: bool, audited: bool) -> bool:
        """Whether a request can be served now: always while the store takes writes;
        otherwise a read while its audit record can be held, a change never."""
        if self.writable():
            return True
        return not change and (not audited or len(self.held) < self.max_held)

    def commit(self) -> None:
        """Make the pending changes durable, then tell outbox listeners about new rows.

        On failure the transaction is rolled back and the exception propagates:
        the caller must reload its memory from :meth:`load`.
        """
        if not self._in_transaction:
            return
        added, self._outbox_added = self._outbox_added, False
        log, seq = self._log, self._change_seq + 1
        try:
            if log:
                self._note_changes(seq)
            self._in_transaction = False
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            # The requests were answered with their error code; each keeps its one
            # audit record, held until the store takes writes (the held ones are older).
            records = self._records[: max(0, self.max_held - len(self.held))]
            self._last_seq = self._committed_seq
            self.rollback()
            self.held.extend(records)
            if not self.failing:
                self.log.warn(
                    "{path}: commit failed ({exc}); refusing changes", path=self.path, exc=exc
                )
            self.failing = True
            raise
        self._records.clear()
        if log:
            self._log, self._inline = [], 0
            self._change_seq = seq
            if isinstance(self._index, IndexWorker):
                self._index.hand_over(log, seq)
        self._release_waiting()
        if added:
            self._committed_seq = self._last_seq
            for listener in list(self._listeners):
                try:
                    listener()
                except Exception:
                    self.log.failure("outbox listener failed")

    def rollback(self) -> None:
        """Drop the pending changes (after a failure)."""
        self._in_transaction = False
        self._file_count = None
        self._outbox_added = False
        self._records.clear()
        self._last_seq = self._committed_seq
        self._log, self._inline = [], 0
        if self._db is not None and self._db.in_transaction:
            self._db.execute("ROLLBACK")
        if isinstance(self._index, SearchIndex):
            self._index.forget()  # its writes were in the transaction
        self._release_waiting()

    def _index_mark(self) -> int:
        """The last change number the search database (if any) holds: the next changes are
        numbered past it, whatever rows of this database were deleted since."""
        path = self.path + searchindex.SUFFIX
        if self.path == MEMORY or not os.path.exists(path):
            return 0
        try:
            search = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                return SearchIndex.read_mark(search)[1] or 0
            finally:
                search.close()
        except sqlite3.Error:
            return 0  # unreadable: it will be filled again from scratch

    def _note_changes(self, seq: int) -> None:
        """In the transaction about to commit as change number ``seq`` (the number its rows
        carry): a memory store writes its search index now (in the same transaction); the
        tombstones the search side no longer needs are forgotten, now and then."""
        db = self.db
        index = self._index
        if isinstance(index, SearchIndex):
            index.apply(self._log[self._inline :])
            self._inline = len(self._log)
        if self._tombstones >= TOMBSTONES_KEPT and index is not None:
            applied = index.applied if isinstance(index, IndexWorker) else seq
            db.execute("DELETE FROM tombstones WHERE seq <= ?", (applied,))
            self._tombstones = 0

    # --- Outbox API of the logger relay ----------------------------------------

    @property
    def sender_id(self) -> str:
        """A stable random id of this database, so the logger can deduplicate per sender."""
        if self._db is None:
            self.open()
        return self._sender_id

    def outbox_pending(self, after_seq: int, limit: int) -> list[tuple[int, str]]:
        """Committed outbox rows with ``seq > after_seq``, ascending, at most ``limit``."""
        return self.db.execute(
            "SELECT seq, record FROM outbox WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            (after_seq, self._committed_seq, limit),
        ).fetchall()

    def outbox_delete_through(self, seq: int) -> None:
        """Delete every outbox row with ``seq`` at most ``seq``.

        Outside a group transaction the delete commits at once; inside one it
        commits with that transaction, before this reactor turn ends. On a full
        disk the rows stay (a later delete takes them; a resend after a restart
        is deduplicated by the logger).
        """
        try:
            self.db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))
        except sqlite3.Error as exc:
            self.log.warn(
                "{path}: cannot delete relayed audit rows yet: {exc}", path=self.path, exc=exc
            )

    def add_outbox_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the reactor thread after each commit that added outbox rows."""
        self._listeners.append(callback)

    def outbox_count(self) -> int:
        """How many outbox rows exist (tests, diagnostics, the metrics' backlog gauge).

        Rows are only ever deleted from the front (:meth:`outbox_delete_through`),
        so the backlog is one contiguous run of ``seq``: two index lookups, not a
        scan of a table that grows while the logger is away.
        """
        low, high = self.db.execute("SELECT min(seq), max(seq) FROM outbox").fetchone()
        return 0 if low is None else high - low + 1

    def iter_users(self) -> Iterator[tuple[str, str | None, int | None]]:
        """Raw user rows (tests and diagnostics)."""
        yield from self.db.execute("SELECT name, ip, port FROM users ORDER BY rowid")


def _row(ip: str | None, port: int | None, identity: str | None) -> UserRow:
    """A user row from its columns (no files yet)."""
    return UserRow(address=(ip, port) if ip is not None else None, identity=identity)
