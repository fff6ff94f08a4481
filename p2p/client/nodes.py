"""The indexer nodes a client may ask, and which one it asks first.

``p2p-client -s host1:9090,host2:9090`` names several nodes of one directory
(stateless indexers sharing a database, docs/operations.md "Several indexer
nodes"). :func:`parse_nodes` reads that list; :class:`Nodes` remembers the node
that answered last, so that every request goes there first, and moves on to
the next node in the list when one does not answer (connection refused, timed
out or reset before a reply, or the kept connection holding the lease lost).
The switch is said once on stderr, when another node has answered: which node
was left, why, and which one is used now (protocol.md 6.6).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from p2p import wire
from p2p.client.home import indexer_key

#: A host name: letters, digits, dots, hyphens and underscores (no option-like ``-``).
_HOST_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")
_BRACKETED = re.compile(r"\[([^\]]*)\](?::(.*))?")


class BadNodeList(ValueError):
    """A ``-s`` value that is not a list of ``HOST[:PORT]``; the text says which entry."""


@dataclass(frozen=True)
class Node:
    """One indexer node: a host name or address, and its TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return indexer_key(self.host, self.port)  # host:port, [v6]:port


def parse_nodes(text: str, default_port: int) -> list[Node]:
    """The nodes of a ``-s`` value: ``HOST``, ``HOST:PORT``, ``[V6]``, ``[V6]:PORT`` or a
    bare IPv6 address (then without a port), separated by commas, in order;
    ``default_port`` (``-p``) for those without one. Raises :class:`BadNodeList`
    naming the entry for an empty entry, a bad host or port, or a node listed twice."""
    nodes: list[Node] = []
    for raw in text.split(","):
        entry = raw.strip()
        node = _parse_node(entry, default_port)
        if str(node) in map(str, nodes):  # names compare without case
            raise BadNodeList(f"{entry}: listed twice")
        nodes.append(node)
    return nodes


def _parse_node(entry: str, default_port: int) -> Node:
    if not entry:
        raise BadNodeList("an empty entry (HOST[:PORT] between the commas)")
    bracketed = _BRACKETED.fullmatch(entry)
    if bracketed:
        host, port = bracketed.group(1), bracketed.group(2)
        if not _is_ipv6(host):
            raise BadNodeList(f"{entry}: only an IPv6 address goes in brackets")
        if port is None:
            return Node(host, default_port)
    elif entry.count(":") > 1:  # a bare IPv6 address: no room for a port
        if not _is_ipv6(entry):
            raise BadNodeList(f"{entry}: not HOST:PORT (an IPv6 address with a port: [ADDR]:PORT)")
        return Node(entry, default_port)
    elif ":" in entry:
        host, port = entry.split(":")
    else:
        host, port = entry, None
    if not bracketed and not _HOST_NAME.fullmatch(host):
        raise BadNodeList(f"{entry}: not a host name or address: {host!r}")
    if port is None:
        return Node(host, default_port)
    if not (wire.is_decimal(port) and 0 < int(port) < 65536):
        raise BadNodeList(f"{entry}: not a TCP port (1-65535): {port!r}")
    return Node(host, int(port))


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


class Nodes:
    """Which node a request tries first, and the one note per switch.

    :meth:`failed` when a node did not answer: the next attempt starts with the
    node after it. :meth:`answered` when one replied: it is tried first from then
    on, and if it is not the node used before, ``note`` says so once.
    """

    def __init__(self, nodes: Sequence[Node], note: Callable[[str], None]) -> None:
        if not nodes:
            raise ValueError("no indexer node")
        self.nodes = list(nodes)
        self.note = note
        self._first = 0
        #: The node whose replies the client uses (the first one, until another answers).
        self.using = self.nodes[0]
        #: Why :attr:`using` was last found not answering, for the note.
        self._why: str | None = None

    @property
    def current(self) -> Node:
        """The node the next attempt goes to."""
        return self.nodes[self._first]

    @property
    def several(self) -> bool:
        return len(self.nodes) > 1

    def failed(self, node: Node, why: str) -> None:
        """``node`` did not answer (``why``): the next attempt goes to the node after it.
        A failure of a node already left (an older attempt's) changes nothing."""
        if node == self.current:
            self._first = (self.nodes.index(node) + 1) % len(self.nodes)
        if node == self.using:
            self._why = why

    def answered(self, node: Node) -> bool:
        """``node`` replied: stick to it, if the node used has failed since it answered
        (a late reply from another node, asked while the node used was being left and
        came back, is no reason to switch). True when that is a switch (the note is said)."""
        if node not in self.nodes or (node != self.using and self._why is None):
            return False
        self._first = self.nodes.index(node)
        if node == self.using:
            self._why = None
            return False
        left, why = self.using, self._why or "it did not answer"
        self.using, self._why = node, None
        self.note(f"the indexer at {left} does not answer ({why}); using the indexer at {node}")
        return True
