"""What a cut download keeps, so the next GET_FILE of the same content continues it.

Beside the destination ``<dir>/<name>``:

- ``.<name>.p2p-part``: the bytes received so far, each at its offset in the file;
- ``.<name>.p2p-part.json``: what they are (:class:`Key`: the published SHA-256
  and size, the owner and remote name) and which of them are complete: a prefix
  (``prefix`` bytes from the start, what a streaming ``FETCH`` writes) and whole
  pieces (``pieces``, indices of ``piece_size`` pieces, what a multi-source
  download writes once each piece matched its digest).

Order of writes: bytes first, then the JSON naming them complete (written to a
temporary file and renamed over the old one), so a ``kill -9`` of the downloader
at any moment never makes bytes count that are not in the file: at worst the
JSON names fewer than the file holds, and those are fetched again.

A download of other content at that destination (another SHA-256; without a
hash, another owner, name or size) discards what is there (:func:`open_partial`).
The files are removed when the download completes (the data file renamed into
place, the JSON deleted), when its bytes turn out wrong, and never otherwise:
a cut, a cancel or a killed client leave them for the next attempt.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Suffix of the hidden data file beside the destination (the JSON adds ``.json``).
SUFFIX = ".p2p-part"
_VERSION = 1


class PartialBusy(OSError):
    """Another running download (this process or another) writes to that destination."""


@dataclass(frozen=True)
class Key:
    """What identifies the content being downloaded.

    With ``sha256`` (published): that hash (and the size, where known) is the
    content, whoever serves it. Without: the owner, the remote name and the
    size together, the only identity there is.
    """

    sha256: str | None
    size: int | None
    owner: str | None
    remote: str

    def same_content(self, other: Key) -> bool:
        """Whether partial data of ``other`` is data of this content."""
        if self.sha256 is not None or other.sha256 is not None:
            if self.sha256 != other.sha256:
                return False
            return self.size is None or other.size is None or self.size == other.size
        return (
            self.owner is not None
            and (self.owner, self.remote) == (other.owner, other.remote)
            and (self.size is None or other.size is None or self.size == other.size)
        )


@dataclass
class State:
    """What is known of the bytes in the data file (the JSON's content)."""

    key: Key
    prefix: int = 0
    piece_size: int | None = None
    pieces: set[int] = field(default_factory=set)

    def held(self) -> int:
        """Bytes complete from the start of the file: the prefix, extended by the
        complete pieces that follow it without a gap (at most the size)."""
        held = self.prefix
        if self.piece_size:
            while held // self.piece_size in self.pieces:
                end = _piece_end(held // self.piece_size, self.piece_size, self.key.size)
                if end <= held:
                    break
                held = end
        if self.key.size is not None:
            held = min(held, self.key.size)
        return held

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "sha256": self.key.sha256,
            "size": self.key.size,
            "owner": self.key.owner,
            "remote": self.key.remote,
            "prefix": self.prefix,
            "piece_size": self.piece_size,
            "pieces": sorted(self.pieces),
        }

    @classmethod
    def from_json(cls, data: Any) -> State:
        """The state the JSON holds; ValueError if it is not one of ours."""
        if not isinstance(data, dict) or data.get("version") != _VERSION:
            raise ValueError("not a partial download's state")
        sha, size, owner, remote = (data.get(k) for k in ("sha256", "size", "owner", "remote"))
        prefix, piece_size, pieces = data.get("prefix"), data.get("piece_size"), data.get("pieces")
        ok = (
            (sha is None or isinstance(sha, str))
            and (size is None or _count(size))
            and (owner is None or isinstance(owner, str))
            and isinstance(remote, str)
            and _count(prefix)
            and (piece_size is None or (_count(piece_size) and piece_size > 0))
            and isinstance(pieces, list)
            and all(_count(i) for i in pieces)
        )
        if not ok:
            raise ValueError("a malformed partial download's state")
        return cls(Key(sha, size, owner, remote), prefix, piece_size, set(pieces))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def paths(destination: Path) -> tuple[Path, Path]:
    """The data file and the JSON beside ``destination``."""
    data = destination.with_name(f".{destination.name}{SUFFIX}")
    return data, data.with_name(data.name + ".json")


class Partial:
    """The open data file of one download and its state, saved on request.

    ``fd`` is open read-write and locked (``flock``) while the download runs:
    a second download to the same destination is refused (:class:`PartialBusy`).
    """

    def __init__(self, destination: Path, fd: int, state: State) -> None:
        self.destination = destination
        self.data_path, self.json_path = paths(destination)
        self.fd: int | None = fd
        self.state = state

    def save(self) -> None:
        """Write the state to the JSON (temporary file, then rename over it)."""
        temporary = self.json_path.with_name(self.json_path.name + ".tmp")
        # A fresh file of our own: never through a name planted in a shared directory.
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(temporary, flags, 0o600), "w") as out:
            out.write(json.dumps(self.state.to_json()))
        os.replace(temporary, self.json_path)

    def reset(self, key: Key | None = None) -> None:
        """Forget every byte held (other content, or bytes found wrong): state first."""
        self.state = State(key or self.state.key)
        self.save()
        if self.fd is not None:
            os.ftruncate(self.fd, 0)

    def close(self) -> None:
        """Give the descriptor (and the lock) back; the files stay for the next attempt."""
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def remove(self) -> None:
        """Close and delete both files (the bytes are wrong, or the download is done)."""
        for path in (self.json_path, self.data_path):
            with contextlib.suppress(OSError):
                path.unlink()
        self.close()

    def finish(self, size: int, mode: int) -> None:
        """The bytes are complete and verified: cut the file to ``size``, give it
        ``mode`` and rename it over the destination; the JSON goes."""
        assert self.fd is not None
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)
        os.fchmod(self.fd, mode)
        if not same_file(self.fd, os.lstat(self.data_path)):
            raise OSError(f"{self.data_path} was replaced while the download ran")
        os.replace(self.data_path, self.destination)
        with contextlib.suppress(OSError):
            self.json_path.unlink()
        self.close()


def open_partial(destination: Path, key: Key) -> Partial:
    """Open (or create) the partial data of ``key`` at ``destination``.

    What is there of other content, or what cannot be read as ours, is discarded.
    Raises :class:`PartialBusy` when another download holds that destination,
    OSError (or ValueError, a name the system cannot take) when the files cannot
    be made.
    """
    data_path, json_path = paths(destination)
    fd = _open_data(data_path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PartialBusy(f"another download is writing to {destination}") from None
        state = _read_state(json_path)
        partial = Partial(destination, fd, state or State(key))
        if state is None or not key.same_content(state.key):
            partial.reset(key)
        else:
            # Keep what is held; learn what this request knows better (a size, a hash).
            known = state.key
            state.key = Key(
                key.sha256 or known.sha256,
                key.size if key.size is not None else known.size,
                key.owner,
                key.remote,
            )
            # Bytes the JSON names that the file does not hold (it was cut) are not held.
            length = os.fstat(fd).st_size
            state.prefix = min(state.prefix, length)
            if state.piece_size:
                state.pieces = {
                    i
                    for i in state.pieces
                    if _piece_end(i, state.piece_size, state.key.size) <= length
                }
        return partial
    except BaseException:
        os.close(fd)
        raise


#: The largest state JSON read (a few hundred thousand piece indices); past it, not ours.
MAX_STATE = 1 << 20


def _read_state(path: Path) -> State | None:
    """The state the JSON at ``path`` holds, or None if there is none we can read
    as ours: it is read only if a plain file (never through a symbolic link, never
    a FIFO that would block), at most :data:`MAX_STATE` bytes, and anything in it
    that does not parse (however deep or odd) makes it not ours."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = b""
        while len(text) <= MAX_STATE:
            chunk = os.read(fd, MAX_STATE + 1 - len(text))
            if not chunk:
                break
            text += chunk
        if len(text) > MAX_STATE:
            return None
        return State.from_json(json.loads(text))
    except Exception:
        return None
    finally:
        os.close(fd)


def same_file(fd: int, st: os.stat_result) -> bool:
    """Whether ``st`` (an ``lstat`` of a name) is the file open at ``fd``."""
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


_DATA_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _open_data(path: Path) -> int:
    """The data file, open read-write: never through a symbolic link, and only a
    regular file with no other name (what is planted at that name in a shared
    directory, a link to someone's file, is unlinked and a fresh file made)."""
    try:
        fd = os.open(path, _DATA_FLAGS | os.O_CREAT, 0o600)
    except OSError:
        if not path.is_symlink():
            raise
    else:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            return fd
        os.close(fd)
    path.unlink()
    return os.open(path, _DATA_FLAGS | os.O_CREAT | os.O_EXCL, 0o600)


def _piece_end(index: int, piece_size: int, size: int | None) -> int:
    end = (index + 1) * piece_size
    return end if size is None else min(end, size)
