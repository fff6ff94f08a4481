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
file's size and SHA-256 (NULL for a classic PUBLISH), and an FTS5 index over
names and descriptions answers :meth:`Store.search` (see
:mod:`p2p.indexer.fulltext` and ``SEARCH_SCHEMA`` below); databases written
before it gain the columns and the index when opened.

Everything the directory, the relay and ``p2p-admin`` need goes through the
methods of :class:`Store`, so another database can stand behind the same ones.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from twisted.logger import Logger

from p2p.indexer.fulltext import (
    FTS_DELETE,
    FTS_INSERT,
    FTS_SCHEMA,
    FTS_TABLE,
    MAX_QUERY_WORDS,
    PREFIXES,
    Hit,
    bm25,
    fold,
    fts5_match,
    inverse_frequency,
    words_of,
)

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
    identity TEXT
);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    size INTEGER,
    sha256 TEXT,
    UNIQUE (user, name)
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record TEXT NOT NULL
);
"""


#: What SEARCH needs beside ``files`` (protocol.md section 8.3): the full-text index,
#: the index of content hashes (copies), ``online``: the ids of the files whose owner
#: is connected, kept by triggers as users connect and files come and go, so "owner
#: connected" is one integer lookup per candidate, not a join with ``users``; and
#: ``index_queue``: the files changed since the full-text index was last brought up to
#: date (written in the transaction of the change, applied in batches: see
#: :meth:`Store.update_index`); a row that removed an indexed text holds that text.
SEARCH_SCHEMA = (
    FTS_SCHEMA
    + """
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256) WHERE sha256 IS NOT NULL;
CREATE TABLE IF NOT EXISTS index_queue (
    seq INTEGER PRIMARY KEY,
    id INTEGER NOT NULL,
    name TEXT,
    description TEXT
);
CREATE TABLE IF NOT EXISTS online (id INTEGER PRIMARY KEY);
CREATE TRIGGER IF NOT EXISTS online_file_added AFTER INSERT ON files
    WHEN (SELECT ip FROM users WHERE name = new.user) IS NOT NULL
BEGIN
    INSERT OR IGNORE INTO online (id) VALUES (new.id);
END;
CREATE TRIGGER IF NOT EXISTS online_file_removed AFTER DELETE ON files BEGIN
    DELETE FROM online WHERE id = old.id;
END;
CREATE TRIGGER IF NOT EXISTS online_user AFTER UPDATE OF ip ON users
    WHEN (old.ip IS NULL) != (new.ip IS NULL)
BEGIN
    DELETE FROM online WHERE new.ip IS NULL AND id IN (SELECT id FROM files WHERE user = new.name);
    INSERT OR IGNORE INTO online (id)
        SELECT id FROM files WHERE new.ip IS NOT NULL AND user = new.name;
END;
"""
)
#: Files of connected owners matching a query, newest first: the candidates SEARCH ranks.
_CANDIDATES = f"""
SELECT f.user, f.name, f.description, f.size, f.sha256
FROM {FTS_TABLE} JOIN online o ON o.id = {FTS_TABLE}.rowid JOIN files f ON f.id = {FTS_TABLE}.rowid
WHERE {FTS_TABLE} MATCH ? ORDER BY {FTS_TABLE}.rowid DESC LIMIT ?
"""
#: How many files hold a query word as a whole word, counted up to a cap: its BM25
#: weight. (As a prefix, a word of more letters than the longest prefix index would
#: make FTS5 merge the lists of every word it starts, a million files' worth for a
#: common one; the whole word is read as far as the cap, no further.)
_MATCHING = f"SELECT count(*) FROM (SELECT 1 FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? LIMIT ?)"
#: At most this many of the newest matching files of connected owners are ranked
#: (or ``limit``, when more are asked for).
SEARCH_CANDIDATES = 300
#: The longest prefix index (fulltext.PREFIXES), and how many files a search reads by
#: such a prefix of a longer word before it asks FTS5 for the whole word instead.
PREFIX_LETTERS = max(int(n) for n in PREFIXES.split())
PREFIX_SCAN = 3000
#: How much of the database SQLite maps into memory (address space, not RAM).
MMAP_SIZE = 1 << 32
#: Queued index changes applied together: FTS5 writes a segment at every commit that
#: changed it (about 70 us over a million files), so a change per commit would cost
#: PUBLISH and DELETE that much each; applied by the hundred it is a few us a change.
INDEX_BATCH = 256
#: A word's matches are counted up to this many (more: the same, lowest, weight).
MATCHING_CAP = 5000
#: A word in that many files (as a whole word) is common: see ``Store._candidates``.
COMMON = MATCHING_CAP

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
        #: How many index changes are queued (``index_queue``).
        self._queued = 0
        #: The highest file id in the index, and how many files were added past it.
        self._through = 0
        self._fresh = 0
        #: The open transaction changes the directory (see :attr:`changes`).
        self._changes = False

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
        if "identity" not in columns:  # a database of a version without claims
            db.execute("ALTER TABLE users ADD COLUMN identity TEXT")
        columns = {row[1] for row in db.execute("PRAGMA table_info(files)")}
        for column, kind in (("size", "INTEGER"), ("sha256", "TEXT")):
            if column not in columns:  # a database of a version without content identity
                db.execute(f"ALTER TABLE files ADD COLUMN {column} {kind}")
        db.executescript(SEARCH_SCHEMA)
        if FTS_TABLE not in tables:  # a database of a version without search: index it, once
            db.execute(f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}) VALUES ('rebuild')")
            # One segment: otherwise the next writes pay for merging the rebuilt ones
            # (measured over 1,000,000 files: 300-450 us more per commit, 57 after this).
            db.execute(f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}) VALUES ('optimize')")
        if "online" not in tables:
            db.execute(
                "INSERT INTO online (id) SELECT f.id FROM files f JOIN users u ON u.name = f.user"
                " WHERE u.ip IS NOT NULL"
            )
        row = db.execute("SELECT value FROM meta WHERE key = 'sender_id'").fetchone()
        if row is None:
            self._sender_id = uuid.uuid4().hex
            db.execute("INSERT INTO meta (key, value) VALUES ('sender_id', ?)", (self._sender_id,))
        else:
            self._sender_id = row[0]
        if db.execute("SELECT 1 FROM meta WHERE key = 'indexed_through'").fetchone() is None:
            # A new database, or one whose index was just built: every file is in it.
            db.execute(
                "INSERT INTO meta (key, value)"
                " SELECT 'indexed_through', coalesce(max(id), 0) FROM files"
            )
        self._count_unindexed(db)
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
        self._db.close()
        self._db = None

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
        orphans = "FROM files WHERE user NOT IN (SELECT name FROM users)"
        for row in db.execute(f"SELECT id, name, description {orphans}").fetchall():
            if row[0] <= self._through:
                self._queue(*row)
        self._file_count = None
        return db.execute(f"DELETE {orphans}").rowcount

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
        files = db.execute("SELECT id, name, description FROM files WHERE user = ?", (name,))
        for row in files.fetchall():
            if row[0] <= self._through:
                self._queue(*row)
        db.execute("DELETE FROM files WHERE user = ?", (name,))
        db.execute("DELETE FROM users WHERE name = ?", (name,))
        self._file_count = None

    def set_address(self, name: str, address: tuple[str, int] | None) -> None:
        ip, port = address if address is not None else (None, None)
        self._begin().execute("UPDATE users SET ip = ?, port = ? WHERE name = ?", (ip, port, name))

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
            "INSERT INTO files (user, name, description, size, sha256) VALUES (?, ?, ?, ?, ?)",
            (user, name, description, size, sha256),
        )
        if cursor.lastrowid > self._through:
            self._fresh += 1  # indexed with every file past the mark
        else:  # SQLite gave it the id of a deleted file, below the mark
            self._queue(cursor.lastrowid)
        if self._file_count is not None:
            self._file_count += 1

    def publish_file(
        self, user: str, name: str, description: str, size: int | None, sha256: str | None
    ) -> None:
        """Create ``user``'s entry ``name``, or update its description, size and hash in
        place (it keeps its id, hence its place in the owner's listing)."""
        db = self._begin()
        old = db.execute(
            "SELECT id, name, description FROM files WHERE user = ? AND name = ?", (user, name)
        ).fetchone()
        if old is None:
            self.add_file(user, name, description, size, sha256)
            return
        db.execute(
            "UPDATE files SET description = ?, size = ?, sha256 = ? WHERE id = ?",
            (description, size, sha256, old[0]),
        )
        if description != old[2] and old[0] <= self._through:
            self._queue(*old)

    def remove_file(self, user: str, name: str) -> None:
        old = (
            self._begin()
            .execute(
                "DELETE FROM files WHERE user = ? AND name = ? RETURNING id, name, description",
                (user, name),
            )
            .fetchone()
        )
        if old is None:
            return
        if old[0] <= self._through:
            self._queue(*old)
        if self._file_count is not None:
            self._file_count -= 1

    def _count_unindexed(self, db: sqlite3.Connection) -> None:
        """Read the mark and count what waits for the index (at open, after a rollback)."""
        mark = db.execute("SELECT value FROM meta WHERE key = 'indexed_through'").fetchone()
        self._through = int(mark[0]) if mark else 0
        self._queued = db.execute("SELECT count(*) FROM index_queue").fetchone()[0]
        self._fresh = db.execute(
            "SELECT count(*) FROM files WHERE id > ?", (self._through,)
        ).fetchone()[0]

    def _queue(self, file_id: int, name: str | None = None, description: str | None = None) -> None:
        """Note that file ``file_id`` changed, with the text it had (None: a new file)."""
        self._begin().execute(
            "INSERT INTO index_queue (id, name, description) VALUES (?, ?, ?)",
            (file_id, name, description),
        )
        self._queued += 1

    def update_index(self) -> None:
        """Bring the full-text index up to date with ``files``, in the current transaction:
        at a commit once :data:`INDEX_BATCH` files changed, and before any search, so a
        search always sees every change before it.

        New files are the ones past the mark (``meta.indexed_through``, the highest id
        indexed): they cost no queue row. A file at or below it that changed is in
        ``index_queue``; per file only the net change is written: the first queued row
        says what the index holds (the text it had, or nothing for a file new since),
        ``files`` what it must hold now.
        """
        db = self._begin(change=False)
        rows = db.execute(
            "SELECT seq, id, name, description FROM index_queue ORDER BY seq"
        ).fetchall()
        if rows:
            self._apply_queue(db, rows)
        last = self._through
        for file_id, name, description in db.execute(
            "SELECT id, name, description FROM files WHERE id > ? ORDER BY id", (self._through,)
        ).fetchall():
            db.execute(FTS_INSERT, (file_id, name, description))
            last = file_id
        if last != self._through:
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('indexed_through', ?)", (last,)
            )
            self._through = last
        self._queued = self._fresh = 0

    def _apply_queue(self, db: sqlite3.Connection, rows: list[tuple]) -> None:
        """Write the net change of each queued file into the index; empty the queue."""
        indexed: dict[int, tuple[str, str] | None] = {}
        for _seq, file_id, name, description in rows:
            if file_id not in indexed:
                indexed[file_id] = None if name is None else (name, description)
        for file_id, held in indexed.items():
            now = db.execute(
                "SELECT name, description FROM files WHERE id = ?", (file_id,)
            ).fetchone()
            if held == now:
                continue
            if held is not None:
                db.execute(FTS_DELETE, (file_id, *held))
            if now is not None:
                db.execute(FTS_INSERT, (file_id, *now))
        db.execute("DELETE FROM index_queue WHERE seq <= ?", (rows[-1][0],))

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
        (see :meth:`_search`).

        A word the tokenizer would cut in two (a mark it counts as a separator, say)
        would be a phrase, which this index cannot answer: it is searched as its parts.
        """
        try:
            return self._search(words, limit)
        except sqlite3.OperationalError as exc:
            if "phrase" not in str(exc):
                raise
        parts = list(dict.fromkeys(part for word in words for part in _ALNUM(word)))
        if len(parts) > MAX_QUERY_WORDS:
            # One "word" of marks the tokenizer splits at may hide any number of words:
            # the cap on the work of a search holds for its parts too (no hit).
            return []
        return self._search(parts, limit)

    def _search(self, words: list[str], limit: int) -> list[Hit]:
        """The best ``limit`` files of connected owners matching every word (as
        :func:`p2p.indexer.fulltext.query_words` gives them), best first.

        Bounded work, however common the words: the newest
        :data:`SEARCH_CANDIDATES` (at least ``limit``) matching files of
        connected owners are ranked by BM25, each word weighted by how many files
        it matches, counted up to :data:`MATCHING_CAP`. When fewer match, the
        ranking covers all of them. Ties: owner, then name. Then the copies of
        the hits' hashes, in one grouped query.
        """
        if not words:
            return []
        db = self.db
        if (self._queued or self._fresh) and not (self.failing or self.held):
            # (on a full disk the index is searched as it is: a file whose row is gone
            # is never a hit, one added meanwhile is not found yet)
            self.update_index()
        folded = [fold(word) for word in words]
        counts = {
            w: db.execute(_MATCHING, (_term(w), MATCHING_CAP)).fetchone()[0]
            for w in words
            if len(words) > 1 or len(w) > PREFIX_LETTERS
        }
        wanted = max(SEARCH_CANDIDATES, limit)
        candidates = self._candidates(words, folded, wanted, counts, limit)
        if not candidates:
            return []
        if len(words) == 1:
            weights = [1.0]  # one word: its weight orders nothing
        else:
            total = self.file_count()
            weights = [inverse_frequency(total, counts[w]) for w in words]
        split = [split for _, split in candidates]
        candidates = [row for row, _ in candidates]
        average = max(sum(n[1] + d[1] for n, d in split) / len(split), 1.0)
        scores = [bm25(folded, weights, n, d, average) for n, d in split]
        order = sorted(
            range(len(candidates)),
            key=lambda i: (-scores[i], candidates[i][0], candidates[i][1]),
        )
        ranked = [candidates[i] for i in order[:limit]]
        hashes = list({c[4] for c in ranked if c[4] is not None})
        copies = dict(self._copies(hashes)) if hashes else {}
        return [
            Hit(owner, name, description, size, sha, copies.get(sha, 1) if sha else 1)
            for owner, name, description, size, sha in ranked
        ]

    def _candidates(
        self,
        words: list[str],
        folded: list[str],
        wanted: int,
        counts: dict[str, int],
        enough: int,
    ) -> list[tuple]:
        """The ``wanted`` newest matching files of connected owners, each with its folded
        name and description (:func:`p2p.indexer.fulltext.words_of`).

        FTS5 answers a prefix longer than its prefix indexes (``"raga"*``) by merging
        the list of every indexed word it starts, whole, before the first match: half a
        million entries for a common word over a million files. So when such a word is
        common (``counts``: its files as a whole word, at least :data:`COMMON`), it is
        first looked for by its first :data:`PREFIX_LETTERS` letters, which a prefix
        index streams newest first (the other words as they are: their merges are
        small), and each file found is checked here against the whole words, until
        ``wanted`` pass or :data:`PREFIX_SCAN` were read. If that bound is reached
        first with fewer than ``enough`` (the hits asked for), the whole query is
        asked of FTS5: so a search never answers fewer hits than it could.
        """
        db = self.db
        if all(len(w) <= PREFIX_LETTERS or counts.get(w, 0) < COMMON for w in words):
            rows = db.execute(_CANDIDATES, (fts5_match(words), wanted)).fetchall()
            return [(row, (words_of(row[1]), words_of(row[2]))) for row in rows]
        starts = list(
            dict.fromkeys(w[:PREFIX_LETTERS] if counts.get(w, 0) >= COMMON else w for w in words)
        )
        found: list[tuple] = []
        cursor = db.execute(_CANDIDATES, (fts5_match(starts), PREFIX_SCAN))
        read = 0
        for row in cursor:
            read += 1
            name, description = words_of(row[1]), words_of(row[2])
            text = name[0] + description[0]
            if all(f" {word}" in text for word in folded):
                found.append((row, (name, description)))
                if len(found) == wanted:
                    cursor.close()
                    return found
        if read < PREFIX_SCAN or len(found) >= enough:
            return found  # every file of the shorter prefixes was checked, or enough
        rows = db.execute(_CANDIDATES, (fts5_match(words), wanted)).fetchall()
        return [(row, (words_of(row[1]), words_of(row[2]))) for row in rows]

    def _copies(self, hashes: list[str]) -> list[tuple[str, int]]:
        """For each hash, how many connected users published a file with it."""
        marks = ",".join("?" * len(hashes))
        return self.db.execute(
            "SELECT f.sha256, count(DISTINCT f.user) FROM files f JOIN online o ON o.id = f.id"
            f" WHERE f.sha256 IS NOT NULL AND f.sha256 IN ({marks}) GROUP BY f.sha256",
            hashes,
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
        try:
            if self._queued + self._fresh >= INDEX_BATCH:
                self.update_index()
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
        if self._db is not None and self._db.in_transaction:
            self._db.execute("ROLLBACK")
        if self._db is not None:
            self._count_unindexed(self._db)

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


def _term(word: str) -> str:
    """The FTS5 query of ``word`` as a whole word (quoted, so only a word)."""
    return '"{}"'.format(word.replace('"', '""'))


#: Runs of letters and digits only (a last resort for a query word: see ``Store.search``).
_ALNUM = re.compile(r"[^\W_]+").findall
