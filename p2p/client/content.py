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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

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


def digest_file(path: Path | str, stop: threading.Event | None = None) -> Content:
    """Read ``path`` once and return its :class:`Content` (blocking: call it in a thread).

    The stamp is taken from the open file before and after reading; if it moved
    the file changed meanwhile and it is read again (``FileChanging`` after
    :data:`ATTEMPTS` tries). OSError if it cannot be read; :class:`Interrupted`
    once ``stop`` is set (checked at every step, so a program ending does not
    wait for a large file to be read to its end).
    """
    for _attempt in range(ATTEMPTS):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            before = Stamp.of(os.fstat(fd))
            digest = hashlib.sha256()
            size = 0
            while chunk := os.read(fd, READ_SIZE):
                if stop is not None and stop.is_set():
                    raise Interrupted(f"stopped reading {path}")
                digest.update(chunk)
                size += len(chunk)
            after = Stamp.of(os.fstat(fd))
        finally:
            os.close(fd)
        if before == after and size == after.size:
            return Content(size, digest.hexdigest(), after)
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
    ) -> None:
        self.path = Path(path)
        self.run_in_thread = run_in_thread
        #: Set by :meth:`stop`: hashing under way gives up.
        self.stopping = threading.Event()
        self.digest = digest or partial(digest_file, stop=self.stopping)
        self.hashed = 0
        self._lock = threading.Lock()
        self._entries: dict[str, list[Any]] | None = None

    def stop(self) -> None:
        """Make any hashing under way give up (:class:`Interrupted`): the client is ending,
        and the reactor's thread pool is joined before it exits."""
        self.stopping.set()

    def identify(self, path: Path | str) -> Deferred[Content]:
        """Fires with the size and SHA-256 of the file at ``path``; fails with OSError
        if it cannot be read (missing, not a regular file, no permission)."""
        return self.run_in_thread(self.identify_blocking, str(path))

    def identify_blocking(self, path: str) -> Content:
        """:meth:`identify` in the calling thread."""
        st = os.stat(path)
        if not _is_regular(st):
            raise OSError(f"{path} is not a regular file")
        stamp = Stamp.of(st)
        with self._lock:
            known = self._load().get(path)
        if known is not None and known[:4] == stamp.as_list():
            return Content(stamp.size, known[4], stamp)
        content = self.digest(path)
        with self._lock:
            self.hashed += 1
            entries = self._load()
            entries.pop(path, None)
            entries[path] = [*content.stamp.as_list(), content.sha256]
            while len(entries) > MAX_ENTRIES:
                del entries[next(iter(entries))]
            self._save(entries)
        return content

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


def for_reactor(path: Path | str, reactor: Any) -> ContentCache:
    """A cache at ``path`` that hashes in ``reactor``'s thread pool (inline without one)."""
    return ContentCache(path, partial(in_thread, reactor))


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
