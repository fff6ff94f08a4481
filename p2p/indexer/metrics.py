"""What the indexer counts for ``/metrics`` (``p2p_indexer_*``, see docs/operations.md).

Each request is counted when its reply is handed to the connection (or when
it is refused): by operation and reply code, and the seconds from its first
byte to its reply. Open connections, connected users, the audit outbox's
backlog and the relay's lag are read when scraped.
"""

from __future__ import annotations

from collections.abc import Callable

from p2p.metrics import Metrics

#: The code label of a request closed without a reply byte (an unknown OP).
NO_REPLY = "none"
#: The operation label of a request whose OP is not one.
UNKNOWN_OP = "unknown"
#: The code label of each reply code byte, made once.
_CODE_LABELS = [str(code) for code in range(256)]


class IndexerMetrics:
    """The indexer's counts; ``metrics`` is the collector ``/metrics`` renders."""

    def __init__(self) -> None:
        self.metrics = Metrics("p2p_indexer")
        self.requests = self.metrics.counter(
            "requests",
            "Requests answered (or refused), by operation and reply code "
            "(code none: closed without a reply).",
            ("op", "code"),
        )
        self.latency = self.metrics.histogram(
            "request_duration_seconds",
            "Seconds from a request's first byte to its reply, by operation "
            "(the group commit included).",
            ("op",),
        )

    def answered(self, proto, code: bytes) -> None:
        """``proto``'s request gets the reply ``code`` now."""
        op = proto.op
        name = op.name if op is not None else UNKNOWN_OP
        self.requests.inc((name, _CODE_LABELS[code[0]]))
        began = proto.began
        if began:
            self.latency.observe(proto.factory.reactor.seconds() - began, (name,))

    def refused(self, proto) -> None:
        """``proto``'s request is refused for a bad field (its error code) or OP (no reply)."""
        op = proto.op
        if op is None:
            self.requests.inc((UNKNOWN_OP, NO_REPLY))
        else:
            self.requests.inc((op.name, str(op.error)))

    def watch(
        self,
        open_connections: Callable[[], int | None],
        connected_users: Callable[[], int | None],
    ) -> None:
        """Read the listening factory's open connections and the connected users when scraped."""
        self.metrics.gauge(
            "open_connections", "Connections open (TLS and classic).", open_connections
        )
        self.metrics.gauge(
            "connected_users", "Users connected (CONNECT without DISCONNECT).", connected_users
        )

    def watch_relay(self, relay, backlog: Callable[[], int | None]) -> None:
        """Read the audit outbox's backlog and ``relay``'s lag when scraped."""
        self.metrics.gauge(
            "outbox_backlog",
            "Audit records in the outbox: committed, not yet acknowledged by the logger.",
            backlog,
        )

        def lag() -> float | None:
            waiting = backlog()
            if waiting is None:
                return None
            return relay.lag() if waiting else 0.0

        self.metrics.gauge(
            "relay_lag_seconds",
            "Seconds the audit relay has been behind the outbox (0: caught up).",
            lag,
        )
        self.metrics.counted(
            "relay_delivered_records",
            "Audit records the logger acknowledged since the start.",
            lambda: relay.delivered,
        )
