"""Notices of what peers download from this client, for the person at the terminal.

The peer server tells an :class:`UploadNotices` when a transfer starts and ends
(:class:`p2p.peer.server.UploadWatcher`); each becomes one line on stderr: who
(the downloader's address), which file, how much and how long.
"""

from __future__ import annotations

from collections.abc import Callable

from p2p.client.progress import human_bytes, human_duration
from p2p.client.words import quote


class UploadNotices:
    """One stderr line when a peer starts downloading a file from here, one when it ends."""

    def __init__(self, note: Callable[[str], None]) -> None:
        self.note = note

    def started(self, who: str, name: str, size: int, offset: int, end: int | None = None) -> None:
        if end is not None:  # a RANGE: part of the file
            part = f" bytes {offset}-{end - 1}"
        else:
            part = f" from byte {offset}" if offset else ""
        self.note(f"upload: {who} is downloading {quote(name)} ({human_bytes(size)}){part}")

    def ended(self, who: str, name: str, sent: int, complete: bool, seconds: float) -> None:
        how = "downloaded" if complete else "stopped downloading"
        self.note(
            f"upload: {who} {how} {quote(name)}: {human_bytes(sent)} in {human_duration(seconds)}"
        )
