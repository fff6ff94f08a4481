"""Portmapper version 2 (RFC 1833) calls: SET, UNSET, GETPORT, over TCP port 111.

rpcbind answers version 2 too, and maps these registrations to its netids, so
``rpcinfo -p`` lists them and ``clnt_create`` finds them.
``PortmapperEndpoint`` is a client endpoint that asks a host's portmapper for
a program's TCP port, then connects there.
"""

from __future__ import annotations

import xdrlib3
from twisted.internet import defer, interfaces
from twisted.internet.endpoints import TCP4ClientEndpoint
from zope.interface import implementer

from p2p.oncrpc import rpc
from p2p.oncrpc.client import RpcClientFactory

PMAP_PORT = 111
PMAP_PROG = 100000
PMAP_VERS = 2
PMAPPROC_SET = 1
PMAPPROC_UNSET = 2
PMAPPROC_GETPORT = 3
IPPROTO_TCP = 6
IPPROTO_UDP = 17


def pack_mapping(prog: int, vers: int, prot: int, port: int) -> bytes:
    p = xdrlib3.Packer()
    for value in (prog, vers, prot, port):
        p.pack_uint(value)
    return p.get_buffer()


def unpack_bool(data: bytes) -> bool:
    return rpc.unpack_int(data) != 0


@defer.inlineCallbacks
def pmap_call(reactor, host: str, proc: int, args: bytes, timeout: float = 5.0):
    """One call to the portmapper at ``host``; fires with the result bytes."""
    endpoint = TCP4ClientEndpoint(reactor, host, PMAP_PORT, timeout=timeout)
    proto = yield endpoint.connect(RpcClientFactory())
    try:
        d = proto.call(PMAP_PROG, PMAP_VERS, proc, args)
        d.addTimeout(timeout, reactor)
        result = yield d
    finally:
        proto.transport.loseConnection()
    return result


def pmap_set(reactor, host: str, prog: int, vers: int, prot: int, port: int) -> defer.Deferred:
    """Register ``prog``/``vers`` on ``port``; fires with True when the portmapper agreed."""
    d = pmap_call(reactor, host, PMAPPROC_SET, pack_mapping(prog, vers, prot, port))
    return d.addCallback(unpack_bool)


def pmap_unset(reactor, host: str, prog: int, vers: int) -> defer.Deferred:
    """Remove every registration of ``prog``/``vers``; fires with True if one was removed."""
    d = pmap_call(reactor, host, PMAPPROC_UNSET, pack_mapping(prog, vers, 0, 0))
    return d.addCallback(unpack_bool)


def pmap_getport(
    reactor, host: str, prog: int, vers: int, prot: int = IPPROTO_TCP
) -> defer.Deferred:
    """The port ``prog``/``vers`` is registered on (0 when it is not registered).

    The answer is an unsigned int; it is returned whole (not cut to 16 bits,
    which turned a bogus 65616 into port 80), and ``PortmapperEndpoint``
    refuses anything over 65535.
    """
    d = pmap_call(reactor, host, PMAPPROC_GETPORT, pack_mapping(prog, vers, prot, 0))
    return d.addCallback(lambda data: rpc.unpack_int(data) & rpc.UINT32_MASK)


class NotRegistered(Exception):
    """The portmapper does not know the program."""


@implementer(interfaces.IStreamClientEndpoint)
class PortmapperEndpoint:
    """Connects to the TCP port a host's portmapper gives for a program, asked anew each time."""

    def __init__(self, reactor, host: str, prog: int, vers: int, timeout: float = 5.0) -> None:
        self.reactor = reactor
        self.host = host
        self.prog = prog
        self.vers = vers
        self.timeout = timeout

    @defer.inlineCallbacks
    def connect(self, factory):
        port = yield pmap_getport(self.reactor, self.host, self.prog, self.vers, IPPROTO_TCP)
        if not port:
            raise NotRegistered(f"program {self.prog:#x} not registered on {self.host}")
        if port > 0xFFFF:
            raise NotRegistered(f"portmapper on {self.host} answered port {port}")
        endpoint = TCP4ClientEndpoint(self.reactor, self.host, port, timeout=self.timeout)
        proto = yield endpoint.connect(factory)
        return proto

    def __repr__(self) -> str:
        return f"<PortmapperEndpoint {self.host} program {self.prog:#x}>"
