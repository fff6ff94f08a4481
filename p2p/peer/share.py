"""Which file a peer request names, and whether it may be served.

protocol.md section 2: only published files inside the share directory are
served; an absolute path, ``..``, or a symbolic link that leaves the share
directory is answered 1 and nothing is read. This module turns a requested
name into an open, regular, read-only file descriptor or refuses it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class NotShared(Exception):
    """The name does not denote a regular file inside the share directory (reply 1)."""


def _proc_path(fd: int) -> str | None:
    """The kernel's idea of where ``fd`` lives (Linux ``/proc``), or None elsewhere."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _inside(root: str, path: str) -> bool:
    return path != root and os.path.commonpath([root, path]) == root


def resolve(share_dir: Path | str, name: str) -> str:
    """The real path of ``name`` inside ``share_dir``; ``NotShared`` if it escapes.

    Refused before touching the file system: empty names, NUL bytes, absolute
    paths and any ``..`` component. Then symbolic links are resolved and the
    result must still lie strictly inside the real share directory.
    """
    if not name or "\0" in name or os.path.isabs(name) or name.startswith("/"):
        raise NotShared(name)
    if any(part == ".." for part in name.split("/")):
        raise NotShared(name)
    root = os.path.realpath(share_dir)
    target = os.path.realpath(os.path.join(root, name))
    if not _inside(root, target):
        raise NotShared(name)
    return target


def open_shared(share_dir: Path | str, name: str) -> tuple[int, int]:
    """Open ``name`` for serving: ``(fd, size)`` of a regular file inside the share.

    ``NotShared`` for anything that must be answered 1 (missing, outside the
    share, a directory, a FIFO, a device, a link swapped in after resolving);
    other ``OSError`` (permissions, I/O) propagates and is answered 2. The
    final component is opened with ``O_NOFOLLOW`` and ``O_NONBLOCK`` (a FIFO
    must not block the reactor), and on Linux the opened file's real location
    is checked again, which closes the gap between resolving and opening.
    """
    target = resolve(share_dir, name)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        raise NotShared(name) from exc
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # a link swapped in after resolving
            raise NotShared(name) from exc
        if exc.errno == errno.ENAMETOOLONG:  # a valid 256-byte name no file can have
            raise NotShared(name) from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotShared(name)
        where = _proc_path(fd)
        if where is not None and not _inside(os.path.realpath(share_dir), where):
            raise NotShared(name)
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size
