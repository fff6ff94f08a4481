"""TCP keepalive tuned to a lease: the kernel finds a vanished peer, at no cost to us.

A connection that holds a lease (protocol.md section 7.3) carries nothing
while the user is idle, so a peer whose host vanished (power cut, cable, a
closed laptop) would never be noticed by reading. TCP keepalive makes the
kernel probe it instead: after ``idle`` seconds without traffic, a probe every
``interval`` seconds, and after ``count`` unanswered ones the connection
fails. With the lease ``T``: idle T/3, interval T/9, 3 probes, so a host gone
silent is found within 2/3 T of its last answer; the lease's grace
(``wire.HELD_GRACE``, T/3) then ends within T of it. Probes are empty segments
the other side's kernel answers: the peer program sees nothing.
"""

from __future__ import annotations

import socket

from twisted.internet.interfaces import ITransport

from p2p import wire

#: Unanswered keepalive probes before the kernel gives up on the connection.
PROBES = 3


def keepalive_timing(lease: float) -> tuple[int, int, int]:
    """``(idle, interval, count)`` in whole seconds for a lease of ``lease`` seconds."""
    idle = max(1, int(lease * wire.HELD_GRACE))
    interval = max(1, int((lease - idle) / (2 * PROBES)))
    return idle, interval, PROBES


def tcp_socket(transport: ITransport) -> socket.socket | None:
    """The TCP socket under ``transport`` (through TLS and wrapping protocols), or None.

    ``ISystemHandle.getHandle`` is public; a TLS transport answers it with its
    OpenSSL connection, so the walk goes down ``.transport`` to the TCP one.
    """
    current = transport
    for _ in range(8):
        get_handle = getattr(current, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if isinstance(handle, socket.socket):
            return handle
        current = getattr(current, "transport", None)
        if current is None:
            return None
    return None


def keep_alive(transport: ITransport, lease: float) -> bool:
    """Turn on TCP keepalive tuned to ``lease`` on the connection; False where it cannot
    (not TCP, or a platform without the per-socket settings: then the system's)."""
    sock = tcp_socket(transport)
    if sock is None:
        return False
    idle, interval, count = keepalive_timing(lease)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", idle),
            ("TCP_KEEPINTVL", interval),
            ("TCP_KEEPCNT", count),
            # Keepalive probes only an idle connection: data sent to a host that
            # vanished would be retransmitted for many minutes. The same bound for it.
            ("TCP_USER_TIMEOUT", (idle + interval * count) * 1000),
        ):
            option = getattr(socket, name, None)
            if option is None:
                return False
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:
        return False
    return True
