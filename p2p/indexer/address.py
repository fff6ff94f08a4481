"""Which address CONNECT records for a peer.

A peer that reaches the indexer over loopback is only reachable by other hosts
through the host's primary address, so when the indexer also serves other
interfaces that address is recorded instead of ``127.0.0.1``.
"""

from __future__ import annotations

import ipaddress
import socket

#: Never routed, so "connecting" a UDP socket to it sends nothing but makes the
#: kernel choose the source address it would use for the default route.
_PROBE_V4 = ("10.255.255.255", 1)
_PROBE_V6 = ("fd00:ffff::1", 1)


def primary_address(family: int = socket.AF_INET) -> str:
    """The host's primary address (the default route's source), or loopback.

    No packet is sent: a UDP ``connect()`` only selects a route.
    """
    probe, fallback = (_PROBE_V6, "::1") if family == socket.AF_INET6 else (_PROBE_V4, "127.0.0.1")
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(probe)
            return s.getsockname()[0]
    except OSError:
        return fallback


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and their IPv4-mapped forms."""
    if host.startswith("127."):
        return True
    if ":" not in host:
        return False  # an IPv4 address outside 127/8, or not an IP at all
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def serves_other_interfaces(bound_host: str) -> bool:
    """True when a socket bound to ``bound_host`` is reachable from other hosts."""
    return not is_loopback(bound_host)


class AddressPolicy:
    """Turns a request's source IP into the IP that CONNECT records.

    ``bound_host`` is the listening socket's own address (``0.0.0.0`` for all
    interfaces). The primary address is looked up once, at first need.
    """

    def __init__(self, bound_host: str) -> None:
        self.rewrite_loopback = serves_other_interfaces(bound_host)
        self._primary: dict[int, str] = {}

    def record_ip(self, source_ip: str) -> str:
        """The IP to record for a peer whose request came from ``source_ip``."""
        if not self.rewrite_loopback or not is_loopback(source_ip):
            return source_ip
        family = socket.AF_INET6 if ":" in source_ip and "." not in source_ip else socket.AF_INET
        if family not in self._primary:
            self._primary[family] = primary_address(family)
        return self._primary[family]
