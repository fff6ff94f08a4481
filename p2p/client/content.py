"""Content identity of the files this client publishes: size and SHA-256.

PUBLISH sends them with the file (``PUBLISH_FILE``, protocol.md section 8), and
the peer server checks, before serving a file, that it is still what was
published (:class:`Stamp`). Hashing a large file takes seconds, so it never
runs on the reactor: :meth:`ContentCache.identify` runs in the reactor's
thread pool and fires with a :class:`Content`.

Results are kept in ``$P2P_HOME/content_hashes.json`` by path and the file's
stamp (size, mtime, inode and change time): republishing a file that has not
changed is instant, and any write to it (which moves its mtime, or its change
time, which no program can set back) or its replacement by another file (a new
inode) makes it hashed again.

The same read pass computes the SHA-256 of each piece (``wire.piece_size``) that
PIECES serves (protocol.md 2.5); they are kept content-addressed in
``$P2P_HOME/pieces/<sha256>`` (the raw digests, written atomically), and
:meth:`ContentCache.pieces_of` computes them in a thread for a file published
before they were (checked against the published SHA-256 on the way).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from p2p import wire
from p2p.peer.download import in_thread
from p2p.tls import write_private

#: Bytes read per step while hashing.
READ_SIZE = 1024 * 1024
#: Files kept in the cache; past it the oldest entries go.
MAX_ENTRIES = 10_000
#: Times a file that changes while it is hashed is hashed again before giving up.
ATTEMPTS = 3


@dataclass(frozen=True)
class Stamp:
    """What tells a file's version apart without reading it."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    def as_list(self) -> list[int]:
        return [self.size, self.mtime_ns, self.ino, self.ctime_ns]


@dataclass(frozen=True)
class Content:
    """A file's size and SHA-256 (lowercase hex), and the stamp they were computed at."""

    size: int
    sha256: str
    stamp: Stamp
    #: The raw SHA-256 of each piece, when computed with the hash (PIECES).
    pieces: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Claim:
    """What this client told the indexer about one published file (PUBLISH_FILE):
    the description, and the content it was then."""

    description: str
    content: Content

    def to_json(self) -> dict[str, Any]:
        content = self.content
        return {
            "description": self.description,
            "size": content.size,
            "sha256": content.sha256,
            "stamp": content.stamp.as_list(),
        }

    @classmethod
    def from_json(cls, raw: Any) -> Claim | None:
        """The claim recorded as ``raw``, or None if it is not one (a classic PUBLISH)."""
        try:
            stamp = Stamp(*(int(v) for v in raw["stamp"]))
            content = Content(int(raw["size"]), str(raw["sha256"]), stamp)
            return cls(str(raw["description"]), content)
        except (TypeError, KeyError, ValueError):
            return None


class FileChanging(OSError):
    """The file kept changing while it was read: no stable content to publish."""


class Interrupted(OSError):
    """Hashing was stopped (the client is ending)."""


class _PieceHasher:
    """The SHA-256 of each piece of a file of ``size`` bytes, fed in order."""

    def __init__(self, size: int) -> None:
        self.piece = wire.piece_size(size)
        self.current = hashlib.sha256()
        self.filled = 0
        self.digests = bytearray()

    def update(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            take = min(len(view), self.piece - self.filled)
            self.current.update(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == self.piece:
                self.digests += self.current.digest()
                self.current = hashlib.sha256()
                self.filled = 0

    def pieces(self) -> bytes:
        """The digests of every piece, the last (short) one included."""
        if self.filled:
            self.digests += self.current.digest()
            self.current, self.filled = hashlib.sha256(), 0
        return bytes(self.digests)


def digest_fd(
    fd: int,
    where: object,
    stop: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
) -> Content | None:
    """One pass over the open file ``fd``: its
    :class:`Content` with the piece digests, or None if it changed meanwhile (its
    stamp moved). ``progress(bytes read)`` after each step (in this thread). Reads
    from byte 0 and moves ``fd``'s offset (the peer server reads by ``pread``)."""
    before = Stamp.of(os.fstat(fd))
    whole, pieces = hashlib.sha256(), _PieceHasher(before.size)
    size = 0
    os.lseek(fd, 0, os.SEEK_SET)
    # hashlib lets go of the GIL while it hashes: the pieces are hashed in a second
    # thread beside the whole (one chunk behind at most), so this pass takes about
    # the time of one hash, not two.
    with ThreadPoolExecutor(1) as beside:
        pending = None
        while chunk := os.read(fd, READ_SIZE):
            if stop is not None and stop.is_set():
                raise Interrupted(f"stopped reading {where}")
            if pending is not None:
                pending.result()
            pending = beside.submit(pieces.update, chunk)
            whole.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress(size)
        if pending is not None:
            pending.result()
    after = Stamp.of(os.fstat(fd))
    if before != after or size != after.size:
        return None
    return Content(size, whole.hexdigest(), after, pieces.pieces())


def digest_file(
    path: Path | str,
    stop: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
) -> Content:
    """Read ``path`` once and return its :class:`Content`, piece digests included
    (blocking: call it in a thread).

    The stamp is taken from the open file before and after reading; if it moved
    the file changed meanwhile and it is read again (``FileChanging`` after
    :data:`ATTEMPTS` tries). OSError if it cannot be read; :class:`Interrupted`
    once ``stop`` is set (checked at every step, so a program ending does not
    wait for a large file to be read to its end). ``progress(bytes read)`` is
    called from this thread after each step.
    """
    for _attempt in range(ATTEMPTS):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            found = digest_fd(fd, path, stop, progress)
        finally:
            os.close(fd)
        if found is not None:
            return found
    raise FileChanging(f"{path} kept changing while it was read")


class ContentCache:
    """Sizes and hashes of files by path and stamp, on disk at ``path``.

    ``run_in_thread(f, *args)`` runs blocking work and fires with its result
    (:func:`for_reactor`: in the reactor's thread pool). The file is read on
    first use and written after each new hash, both in that thread; ``hashed``
    counts the files actually read (tests: a hit reads nothing).
    """

    def __init__(
        self,
        path: Path | str,
        run_in_thread: Callable[..., Deferred],
        digest: Callable[[Path | str], Content] | None = None,
        pieces_dir: Path | str | None = None,
    ) -> None:
        self.path = Path(path)
        #: Where piece digests are kept by SHA-256 (None: not kept).
        self.pieces_dir = Path(pieces_dir) if pieces_dir is not None else None
        #: Piece lists being computed, by SHA-256: who waits for each (one computation
        #: for many requests).
        self._computing: dict[str, list[Deferred]] = {}
        self.run_in_thread = run_in_thread
        #: Set by :meth:`stop`: hashing under way gives up.
        self.stopping = threading.Event()
        self._reading = partial(digest_file, stop=self.stopping)
        #: Reads a file into its Content; another one (tests) is called with the path only.
        self.digest = digest or self._reading
        self.hashed = 0
        self._lock = threading.Lock()
        self._entries: dict[str, list[Any]] | None = None

    def stop(self) -> None:
        """Make any hashing under way give up (:class:`Interrupted`): the client is ending,
        and the reactor's thread pool is joined before it exits."""
        self.stopping.set()

    def identify(
        self, path: Path | str, progress: Callable[[int], None] | None = None
    ) -> Deferred[Content]:
        """Fires with the size and SHA-256 of the file at ``path``; fails with OSError
        if it cannot be read (missing, not a regular file, no permission).
        ``progress(bytes read)`` is called from the hashing thread as it reads."""
        if progress is None:
            return self.run_in_thread(self.identify_blocking, str(path))
        return self.run_in_thread(self.identify_blocking, str(path), progress)

    def identify_blocking(
        self, path: str, progress: Callable[[int], None] | None = None
    ) -> Content:
        """:meth:`identify` in the calling thread; the piece digests are kept too."""
        st = os.stat(path)
        if not _is_regular(st):
            raise OSError(f"{path} is not a regular file")
        stamp = Stamp.of(st)
        with self._lock:
            known = self._load().get(path)
        if known is not None and known[:4] == stamp.as_list():
            return Content(stamp.size, known[4], stamp)
        if progress is not None and self.digest is self._reading:
            content = self._reading(path, progress=progress)
        else:
            content = self.digest(path)
        self._keep_pieces(content)
        with self._lock:
            self.hashed += 1
            entries = self._load()
            entries.pop(path, None)
            entries[path] = [*content.stamp.as_list(), content.sha256]
            while len(entries) > MAX_ENTRIES:
                del entries[next(iter(entries))]
            self._save(entries)
        return content

    def pieces_of(self, sha256: str, fd: int, size: int) -> Deferred[bytes]:
        """Fires with the piece digests of the content ``sha256`` (``size`` bytes),
        read from the cache or computed from the open file ``fd`` in a thread (and
        kept); fails with :class:`FileChanging` if ``fd`` does not hold that content.
        Requests for the same content while it is computed share the computation."""
        mine: Deferred[bytes] = Deferred()
        waiting = self._computing.get(sha256)
        if waiting is not None:
            waiting.append(mine)
            return mine
        waiting = self._computing[sha256] = [mine]

        def done(result: Any) -> None:
            for waiter in self._computing.pop(sha256, waiting):
                waiter.callback(result)  # a Failure fails each waiter

        self.run_in_thread(self._pieces_blocking, sha256, fd, size).addBoth(done)
        return mine

    def has_pieces(self, sha256: str) -> bool:
        """Whether piece digests of the content ``sha256`` are kept (one ``stat``)."""
        return self.pieces_dir is not None and (self.pieces_dir / sha256).is_file()

    def _pieces_blocking(self, sha256: str, fd: int, size: int) -> bytes:
        wanted = wire.PIECE_DIGEST * wire.piece_count(size)
        if self.pieces_dir is not None:
            with contextlib.suppress(OSError):
                kept = (self.pieces_dir / sha256).read_bytes()
                if len(kept) == wanted:
                    return kept
        found = digest_fd(fd, f"file of {sha256}", self.stopping)
        if found is None or found.sha256 != sha256 or found.size != size:
            raise FileChanging(f"the file is not the content {sha256} published")
        self._keep_pieces(found)
        return found.pieces or b""

    def _keep_pieces(self, content: Content) -> None:
        """Keep ``content``'s piece digests under its SHA-256 (a cache: errors pass)."""
        if self.pieces_dir is None or content.pieces is None:
            return
        with contextlib.suppress(OSError):
            write_private(self.pieces_dir / content.sha256, content.pieces)

    def _load(self) -> dict[str, list[Any]]:
        """The entries (read from the file the first time; a damaged file is started over)."""
        if self._entries is None:
            try:
                raw = json.loads(self.path.read_bytes())
                entries = {str(p): list(v) for p, v in raw.items() if _well_formed(v)}
            except (OSError, ValueError, AttributeError):
                entries = {}
            self._entries = entries
        return self._entries

    def _save(self, entries: dict[str, list[Any]]) -> None:
        with contextlib.suppress(OSError):  # a cache: the next publish hashes again
            write_private(self.path, json.dumps(entries, separators=(",", ":")).encode())


def for_reactor(
    path: Path | str, reactor: Any, pieces_dir: Path | str | None = None
) -> ContentCache:
    """A cache at ``path`` that hashes in ``reactor``'s thread pool (inline without one),
    keeping piece digests in ``pieces_dir``."""
    return ContentCache(path, partial(in_thread, reactor), pieces_dir=pieces_dir)


def _is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def _well_formed(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 5
        and all(isinstance(v, int) for v in value[:4])
        and isinstance(value[4], str)
        and len(value[4]) == 64
    )
