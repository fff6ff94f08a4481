"""``p2p-client --metrics ENDPOINT``: what the user's peer server served, at ``/metrics``.

The client is no twistd service: it starts the endpoint itself before its
reactor runs, and stops it at shutdown. The counts are the peer server's
(:class:`p2p.peer.metrics.PeerMetrics`: requests, uploads, bytes served), kept
across the peer servers one session after another starts.
"""

from __future__ import annotations

import sys

from p2p.metrics import MetricsService
from p2p.peer.metrics import PeerMetrics


def serve_peer_metrics(endpoint: str, reactor) -> PeerMetrics:
    """Serve a new :class:`PeerMetrics` at ``/metrics`` on ``endpoint``; it says
    ``s> metrics URL`` on stderr (stdout holds only result lines);
    :class:`p2p.startup.StartFailure` when the port cannot be opened."""
    counts = PeerMetrics()
    service = MetricsService(endpoint, [counts.metrics], reactor, say=_stderr)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    return counts


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
