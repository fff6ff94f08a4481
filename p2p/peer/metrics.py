"""What a peer server counts for ``/metrics`` (``p2p_peer_*``, see docs/operations.md).

Requests by operation and reply code (``none``: closed without a reply byte),
uploads by how they ended with the file bytes served and their duration, and
the connections open, read when scraped.
"""

from __future__ import annotations

from collections.abc import Callable

from p2p.metrics import Metrics

#: The code label of a request closed without a reply byte.
NO_REPLY = "none"
#: The operation label of a request whose operation is not one.
UNKNOWN_OP = "unknown"


class PeerMetrics:
    """A peer server's counts; ``metrics`` is the collector ``/metrics`` renders."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else Metrics("p2p_peer")
        self.requests = self.metrics.counter(
            "requests",
            "Requests answered, by operation (GET_FILE, FETCH, RANGE, PIECES) and reply code "
            "(none: closed without a reply).",
            ("op", "code"),
        )
        self.uploads = self.metrics.counter(
            "uploads", "Files sent after a reply 0, by how they ended (complete, cut).", ("result",)
        )
        self.bytes_served = self.metrics.counter(
            "bytes_served", "File bytes sent to other peers (complete and cut uploads)."
        )
        self.durations = self.metrics.histogram(
            "upload_duration_seconds",
            "Seconds from a connection's start to the end of its upload, by how it ended.",
            ("result",),
        )
        self._open_connections: Callable[[], int | None] = lambda: None
        self.metrics.gauge(
            "open_connections", "Peer connections open.", lambda: self._open_connections()
        )

    def answered(self, op: str | None, code: int | None) -> None:
        """A request got ``code`` (None: closed without a reply byte)."""
        self.requests.inc(
            (op or UNKNOWN_OP, NO_REPLY if code is None else str(code)),
        )

    def uploaded(self, complete: bool, sent: int, seconds: float) -> None:
        """An upload ended, ``complete`` or cut, after ``sent`` file bytes."""
        result = "complete" if complete else "cut"
        self.uploads.inc((result,))
        self.bytes_served.inc(amount=sent)
        self.durations.observe(seconds, (result,))

    def watch(self, open_connections: Callable[[], int | None]) -> None:
        """Read this server's open connections when scraped (the latest server's, when the
        client starts a new one)."""
        self._open_connections = open_connections
