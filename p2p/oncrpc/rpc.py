"""ONC-RPC version 2 messages (RFC 5531) in XDR (RFC 4506, through ``xdrlib3``).

Pure functions and small value classes, no I/O: a call or a reply becomes bytes
and back. What a server does for every call (split the call header, read a
string argument, encode a successful reply, pack an int) reads and writes the
XDR words with ``struct`` directly: a few times cheaper than ``xdrlib3``'s
Unpacker and Packer, which the rest uses. The transports (record marking on
TCP, datagrams on UDP) live in ``record`` and ``server``/``client``; the
logger's procedures in ``program``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

import xdrlib3

RPC_VERSION = 2

# msg_type
CALL = 0
REPLY = 1

# reply_stat
MSG_ACCEPTED = 0
MSG_DENIED = 1

# accept_stat
SUCCESS = 0
PROG_UNAVAIL = 1
PROG_MISMATCH = 2
PROC_UNAVAIL = 3
GARBAGE_ARGS = 4
SYSTEM_ERR = 5

# reject_stat
RPC_MISMATCH = 0
AUTH_ERROR = 1

# auth_stat
AUTH_OK = 0
AUTH_BADCRED = 1
AUTH_REJECTEDCRED = 2
AUTH_BADVERF = 3
AUTH_REJECTEDVERF = 4
AUTH_TOOWEAK = 5

# auth_flavor
AUTH_NONE = 0
AUTH_SYS = 1

#: The body of an opaque_auth is at most 400 bytes.
MAX_AUTH_BYTES = 400
#: AUTH_SYS: machinename<255>, gids<16>.
MAX_MACHINE_NAME = 255
MAX_GIDS = 16
#: The longest call header: 10 words plus two full opaque_auth bodies.
MAX_CALL_HEADER = 40 + 2 * MAX_AUTH_BYTES

UINT32_MASK = 0xFFFFFFFF


class MessageError(ValueError):
    """Bytes that are not a decodable RPC message (truncated, wrong type, bad lengths)."""


@dataclass(frozen=True)
class OpaqueAuth:
    """An ``opaque_auth``: a flavor and up to 400 bytes of body."""

    flavor: int = AUTH_NONE
    body: bytes = b""


NULL_AUTH = OpaqueAuth()


@dataclass(frozen=True)
class AuthSys:
    """The body of an AUTH_SYS credential (RFC 5531 appendix A)."""

    machinename: str
    uid: int = 0
    gid: int = 0
    gids: tuple[int, ...] = ()
    stamp: int = 0

    def encode(self) -> OpaqueAuth:
        name = self.machinename.encode("utf-8")
        if len(name) > MAX_MACHINE_NAME or len(self.gids) > MAX_GIDS:
            raise ValueError("AUTH_SYS machinename or gids too long")
        p = xdrlib3.Packer()
        p.pack_uint(self.stamp & UINT32_MASK)
        p.pack_string(name)
        p.pack_uint(self.uid & UINT32_MASK)
        p.pack_uint(self.gid & UINT32_MASK)
        p.pack_array(list(self.gids), lambda g: p.pack_uint(g & UINT32_MASK))
        return OpaqueAuth(AUTH_SYS, p.get_buffer())

    @classmethod
    def decode(cls, body: bytes) -> AuthSys:
        """Parse an AUTH_SYS body; ``MessageError`` if malformed."""
        u = xdrlib3.Unpacker(body)
        try:
            stamp = u.unpack_uint()
            name_len = u.unpack_uint()
            if name_len > MAX_MACHINE_NAME:
                raise MessageError("AUTH_SYS machinename too long")
            u.set_position(u.get_position() - 4)
            name = u.unpack_string()
            uid = u.unpack_uint()
            gid = u.unpack_uint()
            count = u.unpack_uint()
            if count > MAX_GIDS:
                raise MessageError("AUTH_SYS too many gids")
            gids = tuple(u.unpack_uint() for _ in range(count))
            u.done()
        except (EOFError, xdrlib3.Error) as exc:
            raise MessageError(f"bad AUTH_SYS body: {exc}") from exc
        return cls(name.decode("utf-8", "replace"), uid, gid, gids, stamp)


class Call(NamedTuple):
    """The header of a CALL message (the procedure's arguments travel apart).

    A named tuple: a server builds one per call, and that costs a third of
    what a frozen dataclass does."""

    xid: int
    prog: int
    vers: int
    proc: int
    cred: OpaqueAuth = NULL_AUTH
    verf: OpaqueAuth = NULL_AUTH
    rpcvers: int = RPC_VERSION


@dataclass(frozen=True)
class Reply:
    """A REPLY message, accepted or denied, with the fields its status uses."""

    xid: int
    stat: int = MSG_ACCEPTED
    accept_stat: int = SUCCESS  # MSG_ACCEPTED
    reject_stat: int = RPC_MISMATCH  # MSG_DENIED
    auth_stat: int = AUTH_OK  # MSG_DENIED / AUTH_ERROR
    low: int = 0  # PROG_MISMATCH and RPC_MISMATCH
    high: int = 0
    verf: OpaqueAuth = NULL_AUTH
    body: bytes = field(default=b"", repr=False)  # results after SUCCESS

    @property
    def ok(self) -> bool:
        return self.stat == MSG_ACCEPTED and self.accept_stat == SUCCESS


# --- Packing ----------------------------------------------------------------


def _pack_auth(p: xdrlib3.Packer, auth: OpaqueAuth) -> None:
    if len(auth.body) > MAX_AUTH_BYTES:
        raise ValueError("opaque_auth body over 400 bytes")
    p.pack_uint(auth.flavor)
    p.pack_opaque(auth.body)


def _unpack_auth(u: xdrlib3.Unpacker) -> OpaqueAuth:
    flavor = u.unpack_uint()
    length = u.unpack_uint()
    if length > MAX_AUTH_BYTES:
        raise MessageError("opaque_auth body over 400 bytes")
    u.set_position(u.get_position() - 4)
    return OpaqueAuth(flavor, u.unpack_opaque())


def encode_call(call: Call, args: bytes = b"") -> bytes:
    """A whole CALL message: header then the already-encoded arguments."""
    p = xdrlib3.Packer()
    p.pack_uint(call.xid & UINT32_MASK)
    p.pack_enum(CALL)
    p.pack_uint(call.rpcvers)
    p.pack_uint(call.prog)
    p.pack_uint(call.vers)
    p.pack_uint(call.proc)
    _pack_auth(p, call.cred)
    _pack_auth(p, call.verf)
    return p.get_buffer() + args


def peek_xid(data: bytes) -> int | None:
    """The XID of a message, or None when even that is missing."""
    if len(data) < 4:
        return None
    return int.from_bytes(data[:4], "big")


#: xid, msg_type, rpcvers, prog, vers, proc: the fixed words before the credentials.
_CALL_WORDS = struct.Struct(">IiIIII")
_AUTH_WORDS = struct.Struct(">II")  # flavor, body length
_WORD = struct.Struct(">I")
_INT = struct.Struct(">i")


def _auth_at(data: bytes, pos: int) -> tuple[OpaqueAuth, int]:
    """The ``opaque_auth`` at ``pos`` and the position after it (padding included)."""
    if len(data) < pos + 8:
        raise MessageError("truncated call header")
    flavor, length = _AUTH_WORDS.unpack_from(data, pos)
    if length > MAX_AUTH_BYTES:
        raise MessageError("opaque_auth body over 400 bytes")
    start = pos + 8
    end = start + (length + 3) // 4 * 4
    if end > len(data):
        raise MessageError("truncated call header")
    if flavor == AUTH_NONE and not length:
        return NULL_AUTH, end
    return OpaqueAuth(flavor, bytes(data[start : start + length])), end


def decode_call(data: bytes) -> tuple[Call, bytes]:
    """Split a CALL into its header and the raw argument bytes.

    ``MessageError`` when the header is truncated or the message is not a CALL.
    A call with ``rpcvers != 2`` decodes as far as its program fields; its
    credentials are left empty, and the caller answers RPC_MISMATCH.
    """
    if len(data) < _CALL_WORDS.size:
        return _short_call(data)
    xid, msg_type, rpcvers, prog, vers, proc = _CALL_WORDS.unpack_from(data)
    if msg_type != CALL:
        raise MessageError("not a CALL")
    if rpcvers != RPC_VERSION:
        return Call(xid, 0, 0, 0, rpcvers=rpcvers), b""
    cred, pos = _auth_at(data, 24)
    verf, pos = _auth_at(data, pos)
    return Call(xid, prog, vers, proc, cred, verf, rpcvers), data[pos:]


#: Bytes of a call header with null credentials and verifier (AUTH_NONE, empty).
PLAIN_HEADER = 40
_PLAIN_WORDS = struct.Struct(">iIIIIIIII")


def plain_call_key(prog: int, vers: int, proc: int) -> bytes:
    """The 36 bytes after the XID of every call to ``proc`` with null credentials
    and verifier, which is what clients without authentication (those rpcgen
    makes, by default) send: ``data[4:PLAIN_HEADER]`` equal to this key says
    the whole header at once."""
    return _PLAIN_WORDS.pack(CALL, RPC_VERSION, prog, vers, proc, AUTH_NONE, 0, AUTH_NONE, 0)


def _short_call(data: bytes) -> tuple[Call, bytes]:
    """A message ending within the fixed words: not a CALL, another RPC version, or truncated."""
    count = len(data) // 4
    words = struct.unpack(f">{count}I", data[: count * 4])
    if count >= 2 and words[1] != CALL:
        raise MessageError("not a CALL")
    if count >= 3 and words[2] != RPC_VERSION:
        return Call(words[0], 0, 0, 0, rpcvers=words[2]), b""
    raise MessageError("truncated call header")


#: xid, REPLY, MSG_ACCEPTED, AUTH_NONE verifier (flavor, empty body), SUCCESS.
_SUCCESS_HEAD = struct.Struct(">IIIIII")


def encode_success(xid: int, body: bytes) -> bytes:
    """A SUCCESS reply with the null verifier and the encoded results ``body``."""
    return _SUCCESS_HEAD.pack(xid & UINT32_MASK, REPLY, MSG_ACCEPTED, AUTH_NONE, 0, SUCCESS) + body


def encode_reply(reply: Reply) -> bytes:
    """A whole REPLY message."""
    if reply.stat == MSG_ACCEPTED and reply.accept_stat == SUCCESS and reply.verf == NULL_AUTH:
        return encode_success(reply.xid, reply.body)
    p = xdrlib3.Packer()
    p.pack_uint(reply.xid & UINT32_MASK)
    p.pack_enum(REPLY)
    p.pack_enum(reply.stat)
    if reply.stat == MSG_ACCEPTED:
        _pack_auth(p, reply.verf)
        p.pack_enum(reply.accept_stat)
        if reply.accept_stat == PROG_MISMATCH:
            p.pack_uint(reply.low)
            p.pack_uint(reply.high)
        elif reply.accept_stat == SUCCESS:
            return p.get_buffer() + reply.body
    else:
        p.pack_enum(reply.reject_stat)
        if reply.reject_stat == RPC_MISMATCH:
            p.pack_uint(reply.low)
            p.pack_uint(reply.high)
        else:
            p.pack_enum(reply.auth_stat)
    return p.get_buffer()


def decode_reply(data: bytes) -> Reply:
    """Parse a REPLY; ``MessageError`` if it is truncated or not a reply."""
    u = xdrlib3.Unpacker(data)
    try:
        xid = u.unpack_uint()
        if u.unpack_enum() != REPLY:
            raise MessageError("not a REPLY")
        stat = u.unpack_enum()
        if stat == MSG_ACCEPTED:
            verf = _unpack_auth(u)
            accept_stat = u.unpack_enum()
            if accept_stat == PROG_MISMATCH:
                low, high = u.unpack_uint(), u.unpack_uint()
                return Reply(xid, stat, accept_stat, low=low, high=high, verf=verf)
            body = data[u.get_position() :] if accept_stat == SUCCESS else b""
            return Reply(xid, stat, accept_stat, verf=verf, body=body)
        if stat == MSG_DENIED:
            reject_stat = u.unpack_enum()
            if reject_stat == RPC_MISMATCH:
                low, high = u.unpack_uint(), u.unpack_uint()
                return Reply(xid, stat, reject_stat=reject_stat, low=low, high=high)
            if reject_stat == AUTH_ERROR:
                return Reply(xid, stat, reject_stat=reject_stat, auth_stat=u.unpack_enum())
        raise MessageError("unknown reply status")
    except (EOFError, xdrlib3.Error) as exc:
        raise MessageError(f"truncated reply: {exc}") from exc


# --- Replies a server sends -------------------------------------------------


def success(xid: int, body: bytes) -> Reply:
    return Reply(xid, MSG_ACCEPTED, SUCCESS, body=body)


def accept_error(xid: int, accept_stat: int, low: int = 0, high: int = 0) -> Reply:
    """PROG_UNAVAIL, PROG_MISMATCH (with low/high), PROC_UNAVAIL, GARBAGE_ARGS, SYSTEM_ERR."""
    return Reply(xid, MSG_ACCEPTED, accept_stat, low=low, high=high)


def rpc_mismatch(xid: int) -> Reply:
    return Reply(xid, MSG_DENIED, reject_stat=RPC_MISMATCH, low=RPC_VERSION, high=RPC_VERSION)


def auth_error(xid: int, auth_stat: int) -> Reply:
    return Reply(xid, MSG_DENIED, reject_stat=AUTH_ERROR, auth_stat=auth_stat)


def check_auth(call: Call) -> int:
    """AUTH_OK for AUTH_NONE and well-formed AUTH_SYS credentials, else the auth_stat."""
    if call.cred.flavor == AUTH_NONE:
        return AUTH_OK
    if call.cred.flavor == AUTH_SYS:
        try:
            AuthSys.decode(call.cred.body)
        except MessageError:
            return AUTH_BADCRED
        return AUTH_OK
    return AUTH_REJECTEDCRED


# --- XDR helpers for arguments and results ---------------------------------


def pack_int(value: int) -> bytes:
    try:
        return _INT.pack(value)
    except struct.error as exc:
        raise xdrlib3.ConversionError(str(exc)) from None


def unpack_int(data: bytes) -> int:
    """One XDR int and nothing more; ``MessageError`` otherwise."""
    u = xdrlib3.Unpacker(data)
    try:
        value = u.unpack_int()
        u.done()
    except (EOFError, xdrlib3.Error) as exc:
        raise MessageError(f"not one XDR int: {exc}") from exc
    return value


def pack_string(value: bytes | str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8")
    p = xdrlib3.Packer()
    p.pack_string(value)
    return p.get_buffer()


class TooLong(MessageError):
    """A variable-length item announced more bytes than allowed."""


def unpack_string(data: bytes, limit: int) -> bytes:
    """One XDR ``string<>`` of at most ``limit`` bytes, nothing after it.

    The length is checked before anything is copied (``TooLong``); truncation,
    non-zero padding or trailing bytes are ``MessageError``.
    """
    if len(data) < 4:
        raise MessageError("bad XDR string: no length")
    (length,) = _WORD.unpack_from(data)
    if length > limit:
        raise TooLong(f"string of {length} bytes, limit {limit}")
    end = 4 + length
    padded = 4 + (length + 3) // 4 * 4
    if len(data) != padded:
        raise MessageError("bad XDR string: truncated" if len(data) < padded else "bytes after it")
    if end < padded and data[end:padded].strip(b"\0"):
        raise MessageError("non-zero XDR padding")
    return data[4:end]
