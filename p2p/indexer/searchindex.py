"""The SQLite store's search side (protocol.md section 8.3): its own database, its own process.

Writing each file's words into the FTS5 index inside the reactor's group commit
cost PUBLISH and DELETE a quarter of their rate. So what only SEARCH needs lives
in a separate database beside the main one (``<db>.search``), written and read
by a process of its own (``python -m p2p.indexer.searchindex``, started and
stopped by the store: :class:`IndexWorker`, its end of two pipes). A thread was
measured first: it took the interpreter's lock from the reactor so often that
PUBLISH/DELETE ran at 57-88 % of their rate before the search index; the
process costs the indexer itself one small pickled message per commit.

- The main store records each change of a file or of a user's connection as a
  :data:`Change` while it writes it, and sends the turn's changes to the process
  after its COMMIT succeeded, in order. The process writes what has arrived
  every :data:`WRITE_DELAY` (or before a search), in one transaction, only the
  last change of each file and user: a burst of changes is one FTS5 segment,
  not one per turn.
- A search is a message on the same pipe: the process answers it after it
  applied every change sent before it, so a SEARCH sees every change
  acknowledged before it (the store sends a SEARCH after the commit of the
  changes of its own turn: see ``Store.search_async``).
- Nothing is lost by a ``kill -9``: every change the main database commits is
  numbered, and the rows it wrote carry the number (``seq`` of a ``files`` or
  ``users`` row, a row of ``tombstones`` for a file deleted): no extra write per
  commit. The search database records the last number it applied
  (``search_meta``), and :func:`catch_up` applies what the main database holds
  past it, at start, or after the process had to drop changes it could not
  write. The main store numbers its commits past the highest number its rows
  and the search database hold (:func:`last_change`), so nothing committed
  after the mark is ever numbered below it. The process ends when the indexer's
  pipe closes (its ``kill -9`` too), after writing what it got.
- A process that cannot write (a full disk) keeps the changes in memory, in
  order (up to :data:`MAX_PENDING`, then it catches up from the main database),
  and tries again before each search; searches get SEARCH's error code
  meanwhile rather than an answer that could miss an acknowledged change.

The search database holds a copy of each file's row (``docs``: owner, name,
description, size, hash, and the folded words of name and description, so
ranking never folds text), the FTS5 index over it (no column sizes: see
:data:`FTS_OPTIONS`), the connected users
(``connected``) and the ids of their files (``online``).

A memory-only store (``:memory:``: tests) attaches a memory database as schema
``search`` to its own connection instead and applies changes on the reactor
thread, before each search and at each commit, in the same transaction: no
process, answers at once.
"""

from __future__ import annotations

import os
import pickle
import re
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p.indexer.fulltext import (
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

#: A change of what SEARCH sees, as the main store records it:
#: ``(FILE, id, owner, name, description, size, sha256)`` (a new file, or a file's new
#: text, size or hash), ``(GONE, id)`` (a file deleted), ``(USER, name, connected)``.
Change = tuple
FILE, GONE, USER = 0, 1, 2

#: The search database of the main database at ``path``.
SUFFIX = ".search"

#: At most this many of the newest matching files of connected owners are ranked
#: (or ``limit``, when more are asked for).
SEARCH_CANDIDATES = 300
#: The longest prefix index (fulltext.PREFIXES), and how many files a search reads by
#: such a prefix of a longer word before it asks FTS5 for the whole word instead.
PREFIX_LETTERS = max(int(n) for n in PREFIXES.split())
#: A word's matches are counted up to this many (more: the same, lowest, weight).
MATCHING_CAP = 5000
#: Changes handed over wait at most this long (seconds) before they are sent and written,
#: unless a search comes first: FTS5 writes a segment at each commit (about 70 us over a
#: million files), so a commit per turn would cost more than the changes themselves.
WRITE_DELAY = 0.05
#: After a failed write, the next try comes with the next job, or after this long.
RETRY_DELAY = 1.0
#: Changes a failing worker keeps in memory at most; beyond, it drops them and
#: catches up from the main database once it can write again.
MAX_PENDING = 200_000
#: How much of the database SQLite maps into memory (address space, not RAM).
MMAP_SIZE = 1 << 32
#: Bytes of messages the indexer holds for a search process that does not read them
#: (busy with a long write or catch-up, or stopped); beyond, the changes among them
#: are dropped and the process catches up from the main database instead.
MAX_QUEUED = 16 << 20


def _schema(s: str) -> str:
    """The search database's tables in schema ``s`` (``main``, or ``search`` attached)."""
    return f"""
CREATE TABLE IF NOT EXISTS {s}.search_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.docs (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    size INTEGER,
    sha256 TEXT,
    folded_name TEXT NOT NULL,
    folded_description TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS {s}.docs_user ON docs (user);
CREATE INDEX IF NOT EXISTS {s}.docs_sha256 ON docs (sha256) WHERE sha256 IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.connected (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS {s}.online (id INTEGER PRIMARY KEY);
CREATE VIRTUAL TABLE IF NOT EXISTS {s}.{FTS_TABLE} USING fts5(
    name, description,
    content='docs', content_rowid='id',
    tokenize='unicode61 remove_diacritics 2',
    {FTS_OPTIONS},
    prefix='{PREFIXES}'
);
INSERT OR IGNORE INTO {s}.search_meta (key, value) VALUES ('version', '{VERSION}');
"""


#: The search database's layout: one written by another version is filled again.
VERSION = "3"
#: No column sizes: they serve FTS5's own bm25(), and SEARCH ranks in Python from
#: ``docs``'s folded words (one row less to write per change). Positions are not kept
#: either (``detail=column``: no phrase is ever asked); ``detail=none`` wrote 0.6 us
#: less per change but made FTS5 merge a longer prefix's words three times slower.
FTS_OPTIONS = "detail=column, columnsize=0"
#: What an older version of the search database may hold.
_OLD_TABLES = (FTS_TABLE, "online", "docs", "connected", "search_meta")


class SearchIndex:
    """The search database on one connection: :meth:`apply` changes, :meth:`search`.

    Used by one thread at a time (the search process's, or the reactor's for a memory store).
    """

    log = Logger()

    def __init__(self, db: sqlite3.Connection, schema: str = "main") -> None:
        self.db = db
        s = self.schema = schema
        if self._version() not in (None, VERSION):
            for table in _OLD_TABLES:
                db.execute(f"DROP TABLE IF EXISTS {s}.{table}")
        db.executescript(_schema(s))
        self._count: int | None = None
        fts = f"{s}.{FTS_TABLE}"
        self._fts_insert = f"INSERT INTO {fts} (rowid, name, description) VALUES (?, ?, ?)"
        self._fts_delete = (
            f"INSERT INTO {fts} ({FTS_TABLE}, rowid, name, description) VALUES ('delete', ?, ?, ?)"
        )
        self._candidates_sql = f"""
SELECT d.user, d.name, d.description, d.size, d.sha256, d.folded_name, d.folded_description
FROM {fts} JOIN {s}.online o ON o.id = {FTS_TABLE}.rowid JOIN {s}.docs d ON d.id = {FTS_TABLE}.rowid
WHERE {FTS_TABLE} MATCH ? ORDER BY {FTS_TABLE}.rowid DESC LIMIT ?
"""
        # How many files hold a query word as a whole word, counted up to a cap: its
        # BM25 weight. (As a prefix, a word longer than the longest prefix index would
        # make FTS5 merge the lists of every word it starts.)
        self._matching_sql = (
            f"SELECT count(*) FROM (SELECT 1 FROM {fts} WHERE {FTS_TABLE} MATCH ? LIMIT ?)"
        )

    def _version(self) -> str | None:
        """The layout of the database as found: None when new (no ``search_meta``)."""
        try:
            row = self.db.execute(
                f"SELECT value FROM {self.schema}.search_meta WHERE key = 'version'"
            ).fetchone()
        except sqlite3.OperationalError:
            return None
        return row[0] if row else "1"

    # --- Where it stands ------------------------------------------------------

    def mark(self) -> tuple[str | None, int | None]:
        """The main database it follows (its ``sender_id``) and the last change number
        applied; (None, None) for an index never filled."""
        return self.read_mark(self.db, self.schema)

    @staticmethod
    def read_mark(db: sqlite3.Connection, schema: str = "main") -> tuple[str | None, int | None]:
        """:meth:`mark` of the search database open on ``db`` (as ``schema``)."""
        try:
            rows = dict(db.execute(f"SELECT key, value FROM {schema}.search_meta"))
        except sqlite3.OperationalError:  # no such table: never filled
            return None, None
        applied = rows.get("applied")
        return rows.get("source"), None if applied is None else int(applied)

    def set_mark(self, source: str, applied: int) -> None:
        self.db.executemany(
            f"INSERT OR REPLACE INTO {self.schema}.search_meta (key, value) VALUES (?, ?)",
            (("source", source), ("applied", str(applied))),
        )

    # --- Changes ----------------------------------------------------------------

    def apply(self, changes: Iterable[Change]) -> None:
        """Apply ``changes``, in the caller's transaction, as if one after another: only
        the last change of each file and of each user is written (the files first: a
        user's change then puts all of its files in ``online``, or takes them out).
        Each may be applied again (a catch-up re-reads what was already there)."""
        db, s = self.db, self.schema
        files: dict[int, Change] = {}
        users: dict[str, bool] = {}
        for change in changes:
            if change[0] == USER:
                users[change[1]] = change[2]
            else:
                files[change[1]] = change
        old = self._rows(list(files))
        gone = [(i, *old[i][1:]) for i, c in files.items() if c[0] == GONE and i in old]
        # New rows, rows updated, texts indexed and unindexed, files (not) online.
        added, updated, texts, retexted, online, offline = [], [], [], [], [], []
        for file_id, change in files.items():
            if change[0] == GONE:
                continue
            user, name, description = change[2:5]
            row = (*change[1:], *_folded(name, description))
            before = old.get(file_id)
            if before is None:
                added.append(row)
                texts.append((file_id, name, description))
                online.append((file_id, user))
                continue
            updated.append((*row[1:], file_id))
            if before[1:] != (name, description):
                retexted.append((file_id, *before[1:]))
                texts.append((file_id, name, description))
            if before[0] != user:
                offline.append((file_id,))
                online.append((file_id, user))
        db.executemany(self._fts_delete, gone + retexted)
        db.executemany(f"DELETE FROM {s}.docs WHERE id = ?", ((g[0],) for g in gone))
        db.executemany(f"DELETE FROM {s}.online WHERE id = ?", [(g[0],) for g in gone] + offline)
        db.executemany(f"INSERT INTO {s}.docs VALUES (?, ?, ?, ?, ?, ?, ?, ?)", added)
        db.executemany(
            f"UPDATE {s}.docs SET user = ?, name = ?, description = ?, size = ?,"
            " sha256 = ?, folded_name = ?, folded_description = ? WHERE id = ?",
            updated,
        )
        db.executemany(self._fts_insert, texts)
        db.executemany(
            f"INSERT OR IGNORE INTO {s}.online (id) SELECT ? FROM {s}.connected WHERE name = ?",
            online,
        )
        if self._count is not None:
            self._count += len(added) - len(gone)
        for user, connected in users.items():
            if connected:
                db.execute(f"INSERT OR IGNORE INTO {s}.connected (name) VALUES (?)", (user,))
                db.execute(
                    f"INSERT OR IGNORE INTO {s}.online (id) SELECT id FROM {s}.docs WHERE user = ?",
                    (user,),
                )
            elif db.execute(f"DELETE FROM {s}.connected WHERE name = ?", (user,)).rowcount:
                db.execute(
                    f"DELETE FROM {s}.online WHERE id IN (SELECT id FROM {s}.docs WHERE user = ?)",
                    (user,),
                )

    def _rows(self, ids: list[int]) -> dict[int, tuple[str, str, str]]:
        """Owner, name and description of each file of ``ids`` the index holds."""
        found: dict[int, tuple[str, str, str]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            found.update(
                (row[0], row[1:])
                for row in self.db.execute(
                    f"SELECT id, user, name, description FROM {self.schema}.docs"
                    f" WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
            )
        return found

    def forget(self) -> None:
        """Drop what the cached count assumed (after a rolled-back transaction)."""
        self._count = None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction of the index's own connection: committed, or rolled back."""
        db = self.db
        db.execute("BEGIN")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self.forget()
            raise

    def fill(self, files: Iterator[tuple], connected: Iterable[str]) -> None:
        """Fill an empty index at once (in the caller's transaction): every file
        ``(id, owner, name, description, size, sha256)`` and the connected users; the
        FTS5 index is then built in one pass and made one segment."""
        db, s = self.db, self.schema
        db.executemany(
            f"INSERT INTO {s}.docs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ((*row, *_folded(row[2], row[3])) for row in files),
        )
        db.executemany(f"INSERT INTO {s}.connected (name) VALUES (?)", ((n,) for n in connected))
        db.execute(
            f"INSERT INTO {s}.online (id) SELECT d.id FROM {s}.docs d"
            f" JOIN {s}.connected c ON c.name = d.user"
        )
        db.execute(f"INSERT INTO {s}.{FTS_TABLE} ({FTS_TABLE}) VALUES ('rebuild')")
        # One segment: otherwise the next writes pay for merging the rebuilt ones
        # (measured over 1,000,000 files: 300-450 us more per commit).
        db.execute(f"INSERT INTO {s}.{FTS_TABLE} ({FTS_TABLE}) VALUES ('optimize')")
        self._count = None

    def clear(self) -> None:
        """Empty the index (in the caller's transaction), to :meth:`fill` it again."""
        db, s = self.db, self.schema
        db.execute(f"INSERT INTO {s}.{FTS_TABLE} ({FTS_TABLE}) VALUES ('delete-all')")
        for table in ("docs", "connected", "online"):
            db.execute(f"DELETE FROM {s}.{table}")
        db.execute(f"DELETE FROM {s}.search_meta WHERE key != 'version'")
        self._count = None

    # --- Search -----------------------------------------------------------------

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
        folded = [fold(word) for word in words]
        counts = {
            w: db.execute(self._matching_sql, (_term(w), MATCHING_CAP)).fetchone()[0]
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
        split = [(_counted(row[5]), _counted(row[6])) for row in candidates]
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
            for owner, name, description, size, sha, _, _ in ranked
        ]

    def _candidates(
        self,
        words: list[str],
        folded: list[str],
        wanted: int,
        counts: dict[str, int],
        enough: int,
    ) -> list[tuple]:
        """The ``wanted`` newest matching files of connected owners, with their folded
        name and description.

        FTS5 answers a prefix longer than its prefix indexes (``"raga"*``) by merging
        the list of every indexed word it starts, whole, before the first match: half a
        million entries for a common word over a million files. So when such a word is
        common (``counts``: its files as a whole word, at least ``store.COMMON``), it is
        first looked for by its first :data:`PREFIX_LETTERS` letters, which a prefix
        index streams newest first (the other words as they are: their merges are
        small), and each file found is checked here against the whole words, until
        ``wanted`` pass or ``store.PREFIX_SCAN`` were read. If that bound is reached
        first with fewer than ``enough`` (the hits asked for), the whole query is
        asked of FTS5: so a search never answers fewer hits than it could.
        """
        from p2p.indexer.store import COMMON, PREFIX_SCAN  # the store's bounds, read now

        db = self.db
        if all(len(w) <= PREFIX_LETTERS or counts.get(w, 0) < COMMON for w in words):
            return db.execute(self._candidates_sql, (fts5_match(words), wanted)).fetchall()
        starts = list(
            dict.fromkeys(w[:PREFIX_LETTERS] if counts.get(w, 0) >= COMMON else w for w in words)
        )
        found: list[tuple] = []
        cursor = db.execute(self._candidates_sql, (fts5_match(starts), PREFIX_SCAN))
        read = 0
        for row in cursor:
            read += 1
            text = row[5] + row[6]
            if all(f" {word}" in text for word in folded):
                found.append(row)
                if len(found) == wanted:
                    cursor.close()
                    return found
        if read < PREFIX_SCAN or len(found) >= enough:
            return found  # every file of the shorter prefixes was checked, or enough
        return db.execute(self._candidates_sql, (fts5_match(words), wanted)).fetchall()

    def _copies(self, hashes: list[str]) -> list[tuple[str, int]]:
        """For each hash, how many connected users published a file with it."""
        marks = ",".join("?" * len(hashes))
        s = self.schema
        return self.db.execute(
            f"SELECT d.sha256, count(DISTINCT d.user) FROM {s}.docs d"
            f" JOIN {s}.online o ON o.id = d.id"
            f" WHERE d.sha256 IS NOT NULL AND d.sha256 IN ({marks}) GROUP BY d.sha256",
            hashes,
        ).fetchall()

    def file_count(self) -> int:
        """How many files the index holds (kept up to date once counted)."""
        if self._count is None:
            self._count = self.db.execute(f"SELECT count(*) FROM {self.schema}.docs").fetchone()[0]
        return self._count


def _folded(name: str, description: str) -> tuple[str, str]:
    """The folded words of a name and a description, as ``docs`` keeps them."""
    return words_of(name)[0], words_of(description)[0]


def _counted(folded: str) -> tuple[str, int]:
    """A folded text (:func:`p2p.indexer.fulltext.words_of`) with its number of words."""
    return folded, folded.count(" ") if len(folded) > 1 else 0


def _term(word: str) -> str:
    """The FTS5 query of ``word`` as a whole word (quoted, so only a word)."""
    return '"{}"'.format(word.replace('"', '""'))


#: Runs of letters and digits only (a last resort for a query word: see ``SearchIndex.search``).
_ALNUM = re.compile(r"[^\W_]+").findall


# --- Catching up from the main database -------------------------------------------


def catch_up(index: SearchIndex, main: sqlite3.Connection, source: str) -> int:
    """Bring ``index`` up to date with the main database (``main``: a connection of
    its own, not in a transaction, whose ``sender_id`` is ``source``); the change
    number it is now up to date with.

    An index that follows another database, or none yet, is filled from scratch;
    otherwise only the rows the main database changed after the index's mark are
    applied: the files deleted (``tombstones``), then the files and the users as
    they are now. Reading in one transaction of ``main``, it sees one commit's state.
    """
    main.execute("BEGIN")
    try:
        followed, applied = index.mark()
        seq = max(last_change(main), applied or 0)
        with index.transaction():
            if followed != source or applied is None:
                index.clear()
                index.fill(
                    main.execute(
                        "SELECT id, user, name, description, size, sha256 FROM files ORDER BY id"
                    ),
                    (r[0] for r in main.execute("SELECT name FROM users WHERE ip IS NOT NULL")),
                )
            elif applied < seq:
                index.apply(
                    (GONE, r[0])
                    for r in main.execute("SELECT id FROM tombstones WHERE seq > ?", (applied,))
                )
                index.apply(
                    (FILE, *r)
                    for r in main.execute(
                        "SELECT id, user, name, description, size, sha256 FROM files"
                        " WHERE seq > ? ORDER BY id",
                        (applied,),
                    )
                )
                index.apply(
                    (USER, r[0], r[1])
                    for r in main.execute(
                        "SELECT name, ip IS NOT NULL FROM users WHERE seq > ?", (applied,)
                    )
                )
            index.set_mark(source, seq)
    finally:
        main.execute("COMMIT")
    return seq


def last_change(main: sqlite3.Connection) -> int:
    """The highest change number the main database's rows carry (at least every change
    committed since the search database's mark: see the module's doc)."""
    return max(
        main.execute(f"SELECT coalesce(max(seq), 0) FROM {table}").fetchone()[0]
        for table in ("files", "users", "tombstones")
    )


def open_search_database(path: str) -> sqlite3.Connection:
    """A connection to the search database at ``path`` (created if missing)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # Losing the last transactions to a power cut costs nothing: the next start
    # catches up from the main database.
    db.execute("PRAGMA synchronous=OFF")
    db.execute(f"PRAGMA mmap_size={MMAP_SIZE}")
    return db


# --- The worker process ------------------------------------------------------------


class SearchUnavailable(Exception):
    """The search process is gone: SEARCH gets its error code."""


#: What a test may make the search process do (see :meth:`IndexWorker.fault`).
FAULTS = ("apply", "search", "max_pending")


@implementer(IWriteDescriptor)
class _Outgoing:
    """The indexer's end of the pipe to the search process, written without ever
    blocking the reactor: messages wait in memory, in order, and the reactor writes
    them as the pipe takes them (its write end is non-blocking).

    A process that stops reading (busy with a long write or a catch-up, or stopped)
    fills the pipe (64 KiB); what follows waits here. Beyond :data:`MAX_QUEUED`
    bytes the changes waiting are dropped: one ``("behind",)`` in the place of the
    first of them has the process catch up from the main database, which holds
    every change dropped (each was committed before it was queued). Searches and
    the other messages are kept, in order.
    """

    def __init__(self, fd: int, reactor: IReactorFDSet, log: Logger) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._reactor = reactor
        self._log = log
        #: Framed messages not written yet (whether each holds changes), and how much
        #: of the first one was written.
        self._queue: deque[tuple[bool, bytes]] = deque()
        self._written = 0
        #: Bytes waiting in :attr:`_queue`.
        self.queued = 0
        self._watching = False
        #: The pipe broke (the process is gone).
        self.broken = False

    def send(self, message: object) -> bool:
        """Queue ``message`` and write what the pipe takes now; False once the pipe broke."""
        if self.broken:
            return False
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        changes = isinstance(message, tuple) and message[0] in ("changes", "behind")
        self._queue.append((changes, struct.pack("!i", len(data)) + data))
        self.queued += 4 + len(data)
        self.doWrite()
        if self.queued > MAX_QUEUED:
            self._drop_changes()
        return not self.broken

    def _drop_changes(self) -> None:
        """Replace the changes waiting (but one partly written) by one ``("behind",)``."""
        kept: deque[tuple[bool, bytes]] = deque()
        dropped = 0
        for i, (changes, data) in enumerate(self._queue):
            if changes and not (i == 0 and self._written):
                if not dropped:
                    behind = pickle.dumps(("behind",), pickle.HIGHEST_PROTOCOL)
                    kept.append((True, struct.pack("!i", len(behind)) + behind))
                    self.queued += len(kept[-1][1])
                dropped += 1
                self.queued -= len(data)
                continue
            kept.append((changes, data))
        self._queue = kept
        if dropped:
            self._log.warn(
                "search index: its process is not reading; the changes waiting for it are"
                " dropped, to be read again from the main database"
            )

    def doWrite(self) -> None:
        """Write what the pipe takes (the reactor calls it when the pipe is writable)."""
        queue = self._queue
        while queue:
            data = queue[0][1]
            try:
                n = os.write(self._fd, memoryview(data)[self._written :])
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the process is gone
                self.broken = True
                queue.clear()
                self.queued = 0
                break
            self._written += n
            self.queued -= n
            if self._written == len(data):
                queue.popleft()
                self._written = 0
        self._watch(bool(queue))

    def _watch(self, wanted: bool) -> None:
        if wanted != self._watching:
            if wanted:
                self._reactor.addWriter(self)
            else:
                self._reactor.removeWriter(self)
            self._watching = wanted

    def flush(self) -> None:
        """Write everything waiting, blocking until it is written (a caller that then
        waits for an answer anyway: :meth:`IndexWorker.flush`, the store's close)."""
        while self._queue:
            select.select([], [self._fd], [])
            self.doWrite()

    def close(self) -> None:
        """Stop writing and close the pipe (the process sees its end)."""
        self._watch(False)
        self._queue.clear()
        self.queued = 0
        os.close(self._fd)

    def fileno(self) -> int:
        return self._fd

    def connectionLost(self, reason: Failure) -> None:
        self.broken = True
        self._watch(False)

    def logPrefix(self) -> str:
        return "search-index-pipe"


class IndexWorker:
    """The indexer's end of the search process (``python -m p2p.indexer.searchindex``).

    A process, not a thread: a thread writing the index took the interpreter's lock
    from the reactor thousands of times a second (PUBLISH/DELETE at 57-68 % of the
    rate before the search index, against 88 % or more without it). Messages go
    over two pipes, pickled (framed as :class:`multiprocessing.connection.Connection`
    frames them): to the process ``("changes", changes, seq)``, ``("behind",)``
    (catch up from the main database: changes were dropped), ``("search", ticket,
    words, limit)``, ``("fault", name, value)`` and None (stop), written by the
    reactor without blocking it (:class:`_Outgoing`); back ``("found", ticket,
    result)``, ``("applied", seq)`` and ``("log", level, text)``, read by a thread of
    ours that sleeps until one comes.
    """

    log = Logger()

    def __init__(
        self, main_path: str, search_path: str, source: str, applied: int, reactor: Any
    ) -> None:
        #: The last change number written to the search database (read by the store
        #: to forget the tombstones no longer needed).
        self.applied = applied
        #: Changes not sent yet, the number of the last commit among them, and the call
        #: that sends them (see :meth:`hand_over`).
        self._changes: list[Change] = []
        self._seq = applied
        self._clock: IReactorTime = reactor
        self._reactor = reactor
        self._sending: IDelayedCall | None = None
        self._args = (main_path, search_path, source, str(applied))
        self._out: _Outgoing | None = None
        self._tickets: dict[int, Callable[[Any], None]] = {}
        self._next = 0
        self._gone = False

    def _start(self) -> None:
        """Start the process, at the first message: after the indexer gave up its
        privileges (twistd ``--uid``), so the process runs as the indexer's user."""
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            fds = (str(child_reads), str(child_writes))
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, *self._args, *fds],
                pass_fds=(child_reads, child_writes),
                env=env,
                start_new_session=True,  # a Ctrl-C is the indexer's: it stops the process
            )
        except BaseException:
            os.close(parent_writes)
            os.close(parent_reads)
            raise
        finally:
            os.close(child_reads)
            os.close(child_writes)
        self._out = _Outgoing(parent_writes, self._reactor, self.log)
        self._in = Connection(parent_reads, writable=False)
        self._reader = threading.Thread(target=self._receive, name="search-results", daemon=True)
        self._reader.start()

    @property
    def gone(self) -> bool:
        """The process ended (or its pipe broke): nothing more is answered."""
        return self._gone

    @property
    def queued(self) -> int:
        """Bytes of messages waiting for the process to read them (at most about
        :data:`MAX_QUEUED`)."""
        return 0 if self._out is None else self._out.queued

    def hand_over(self, changes: list[Change], seq: int) -> None:
        """Changes committed by the main database as number ``seq``: apply them.

        They go in one message every :data:`WRITE_DELAY` (before a search at once):
        a message per commit cost the two processes some 15 us of CPU per request.
        """
        self._changes.extend(changes)
        self._seq = seq
        if self._sending is None:
            self._sending = self._clock.callLater(WRITE_DELAY, self._send_changes)

    def _send_changes(self) -> None:
        """Send the changes handed over and not sent yet."""
        if self._sending is not None:
            if self._sending.active():
                self._sending.cancel()
            self._sending = None
        if self._changes:
            changes, self._changes = self._changes, []
            self._send(("changes", changes, self._seq))

    def search(self, words: list[str], limit: int, deliver: Callable[[Any], None]) -> None:
        """Search once every change handed over before is applied; the hits (or the
        exception that kept them from being found) go to ``deliver``, on a thread of ours."""
        self._send_changes()
        ticket = self._next = self._next + 1
        self._tickets[ticket] = deliver
        if not self._send(("search", ticket, words, limit)):
            # The reader thread may have answered it already (the process died meanwhile):
            # whoever takes the ticket out of the dict answers it, once.
            taken = self._tickets.pop(ticket, None)
            if taken is not None:
                taken(SearchUnavailable("the search process is gone"))

    def flush(self) -> None:
        """Write what waits for the process, blocking until it is written: for a caller
        that waits for an answer without a running reactor (``Store.search``)."""
        if self._out is not None:
            self._out.flush()

    def fault(self, name: str, value: object = True) -> None:
        """Tests: make the process fail its writes (``apply``), its searches (``search``:
        the exception to raise), or hold fewer changes (``max_pending``); None: no more."""
        assert name in FAULTS
        self._send_changes()
        self._send(("fault", name, value))

    def stop(self) -> None:
        """Have what was handed over written and what was asked answered; then end."""
        self._send_changes()
        if self._out is None:
            return  # never started: nothing was sent
        self._send(None)
        self._out.flush()
        self._out.close()
        self._reader.join()
        self._process.wait()

    def _send(self, message: object) -> bool:
        if self._gone:
            return False
        if self._out is None:
            try:
                self._start()
            except OSError as exc:  # the next search tries another (Store._ready_index)
                self.log.warn("search index: cannot start its process: {exc}", exc=exc)
                self._gone = True
                return False
        assert self._out is not None
        if not self._out.send(message):
            self._gone = True
            return False
        return True

    def _receive(self) -> None:
        while True:
            try:
                message = self._in.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "found":
                deliver = self._tickets.pop(message[1], None)
                if deliver is not None:
                    deliver(message[2])
            elif kind == "applied":
                self.applied = message[1]
            else:
                getattr(self.log, message[1])("search index: {text}", text=message[2])
        self._in.close()
        if not self._gone:
            self._gone = True
            self.log.warn("search index: its process ended ({code})", code=self._process.poll())
        for ticket in list(self._tickets):
            deliver = self._tickets.pop(ticket, None)
            if deliver is not None:
                deliver(SearchUnavailable("the search process is gone"))


class _Server:
    """The search process: changes applied, then questions answered, in the order they
    came (see the module's doc)."""

    def __init__(
        self,
        index: SearchIndex,
        main_path: str,
        source: str,
        applied: int,
        incoming: Connection,
        outgoing: Connection,
    ) -> None:
        self.index = index
        self.main_path = main_path
        self.source = source
        self.applied = applied
        self._in = incoming
        self._out = outgoing
        #: Changes handed over and not yet written, with their number.
        self._pending: list[tuple[list[Change], int]] = []
        self._pending_count = 0
        self._max_pending = MAX_PENDING
        #: Changes were dropped (too many held while failing): catch up from the main db.
        self._behind = False
        self._failing = False
        #: When the changes held are written (see :data:`WRITE_DELAY`).
        self._due = 0.0
        self._search_fault: Exception | None = None

    def run(self) -> None:
        incoming = self._in
        while True:
            wait = None
            if self._pending or self._behind:
                wait = max(0.0, self._due - time.monotonic())
            try:
                message = incoming.recv() if incoming.poll(wait) else ()
            except (EOFError, OSError):
                message = None  # the indexer is gone: write what came, and end
            if message == ():
                self._write()
                continue
            if message is None:
                self._write()
                self.index.db.close()
                return
            kind = message[0]
            if kind == "changes":  # they waited in the indexer: written at once
                self._hold(message[1], message[2])
                if not self._failing:  # (failing: at the next search, or the retry)
                    self._write()
            elif kind == "behind":  # the indexer dropped changes: read them from the main db
                self._fall_behind()
                if not self._failing:
                    self._write()
            elif kind == "search":
                self._answer(message[1], message[2], message[3])
            else:
                self._fault(message[1], message[2])

    def _answer(self, ticket: int, words: list[str], limit: int) -> None:
        failure = self._write()
        try:
            if failure is not None:
                raise failure
            if self._search_fault is not None:
                raise self._search_fault
            result: object = self.index.search(words, limit)
        except Exception as exc:  # handed to the asker
            result = exc
        self._out.send(("found", ticket, result))

    def _fault(self, name: str, value: object) -> None:
        if name == "apply":
            if value:
                self.index.apply = _full  # type: ignore[method-assign]
            else:
                del self.index.apply
        elif name == "search":
            self._search_fault = value  # type: ignore[assignment]
        else:
            self._max_pending = value if value else MAX_PENDING  # type: ignore[assignment]

    def _hold(self, changes: list[Change], seq: int) -> None:
        if self._behind or seq <= self.applied:
            return  # the catch-up reads (or read) them from the main database
        self._pending.append((changes, seq))
        self._pending_count += len(changes)
        if self._pending_count > self._max_pending:
            self._fall_behind()

    def _fall_behind(self) -> None:
        """Drop the changes held: the next write catches up from the main database."""
        self._pending.clear()
        self._pending_count = 0
        self._behind = True

    def _write(self) -> Exception | None:
        """Write the changes held, in one transaction; the error that prevented it."""
        if not (self._pending or self._behind):
            return None
        try:
            if self._behind:
                self._catch_up()
            else:
                self._apply_pending()
        except sqlite3.Error as exc:
            self._due = time.monotonic() + RETRY_DELAY
            if not self._failing:
                self._say("warn", f"cannot write ({exc}); searches are refused until it can")
            self._failing = True
            return exc
        if self._failing:
            self._say("info", "writing again")
            self._failing = False
        self._out.send(("applied", self.applied))
        return None

    def _say(self, level: str, text: str) -> None:
        self._out.send(("log", level, text))

    def _apply_pending(self) -> None:
        index, seq = self.index, self._pending[-1][1]
        with index.transaction():
            index.apply(change for changes, _ in self._pending for change in changes)
            index.set_mark(self.source, seq)
        self._pending.clear()
        self._pending_count = 0
        self.applied = seq

    def _catch_up(self) -> None:
        main = sqlite3.connect(self.main_path, isolation_level=None)
        try:
            seq = catch_up(self.index, main, self.source)
        finally:
            main.close()
        self._behind = False
        self.applied = seq  # changes handed over up to it were read: skipped (``_hold``)


def _full(changes: Iterable[Change]) -> None:
    """A test's stand-in for :meth:`SearchIndex.apply`: the disk is full."""
    raise sqlite3.OperationalError("database or disk is full")


def serve(argv: list[str]) -> None:
    """The search process: ``MAIN_DB SEARCH_DB SOURCE APPLIED READ_FD WRITE_FD``."""
    main_path, search_path, source, applied, read_fd, write_fd = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the indexer says when to stop
    index = SearchIndex(open_search_database(search_path))
    incoming = Connection(int(read_fd), writable=False)
    outgoing = Connection(int(write_fd), readable=False)
    _Server(index, main_path, source, int(applied), incoming, outgoing).run()


if __name__ == "__main__":
    serve(sys.argv[1:])
