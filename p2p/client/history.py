"""The prompt's history, kept in a file (``$P2P_HOME/history``) so it survives restarts.

One entered line per line of the file, UTF-8 (bytes that are not stay as they
were typed). Each line is appended as it is entered; the file is cut back to the
last ``limit`` lines when it holds twice that many. A file that cannot be read
or written costs the history, never the shell: one note says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

LIMIT = 1000


class History:
    """Lines entered at the prompt, in ``path``."""

    def __init__(
        self, path: Path, note: Callable[[str], None] = lambda _text: None, limit: int = LIMIT
    ) -> None:
        self.path = Path(path)
        self.note = note
        self.limit = limit
        self._count = 0
        self._broken = False

    def load(self) -> list[bytes]:
        """The last ``limit`` lines entered, oldest first ([] if there is no file)."""
        try:
            lines = [line for line in self.path.read_bytes().split(b"\n") if line]
        except FileNotFoundError:
            return []
        except OSError as exc:
            self._failed(exc)
            return []
        self._count = len(lines)
        return lines[-self.limit :]

    def add(self, line: bytes) -> None:
        """Append one entered line (blank lines are not kept)."""
        if self._broken or not line.strip() or b"\n" in line:
            return
        try:
            if not self.path.parent.is_dir():
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "ab") as out:
                out.write(line + b"\n")
            self._count += 1
            if self._count >= 2 * self.limit:
                self._trim()
        except OSError as exc:
            self._failed(exc)

    def _trim(self) -> None:
        kept = self.load()
        part = self.path.with_name(self.path.name + ".new")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(b"".join(line + b"\n" for line in kept))
        os.replace(part, self.path)
        self._count = len(kept)

    def _failed(self, exc: OSError) -> None:
        if not self._broken:
            self._broken = True
            self.note(f"history not kept in {self.path}: {exc.strerror or exc}")
