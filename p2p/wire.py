"""The classic wire format shared by every part of p2p.

Everything here is the contract of ``docs/protocol.md``: the NUL-terminated
string framing, the per-operation result codes, the field limits and their
validation, the audit record and the date-time format. Every other module
imports these names instead of restating them.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

# --- Framing ---------------------------------------------------------------

NUL = b"\0"

#: Default ports and addresses of the services.
INDEXER_PORT = 9090
LOGGER_PORT = 9091
TIME_PORT = 8000
#: ONC-RPC program number of the audit logger (user-defined range 0x20000000-0x3FFFFFFF).
LOGGER_PROGRAM = 0x20000155
LOGGER_PROGRAM_MIN = 0x20000000
LOGGER_PROGRAM_MAX = 0x3FFFFFFF
LOGGER_VERSION = 1
LOGGER_PROC_NULL = 0
LOGGER_PROC_LOG = 1


def local_host(bound_host: str, unspecified: str = "127.0.0.1") -> str:
    """Where a client on this host reaches a server bound to ``bound_host``.

    A wildcard address becomes loopback of its family; an empty one (the
    endpoint named no interface) becomes ``unspecified``.
    """
    if not bound_host:
        return unspecified
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bound_host, bound_host)


#: How long a client may stay silent in the middle of a request (seconds).
DEFAULT_TIMEOUT = 10.0
#: After refusing bad input with its error code, how long a server half-closes and
#: drops what the sender still sends before closing (seconds): closing on unread
#: bytes makes the kernel send a reset, which can destroy the code in flight.
REFUSAL_DRAIN = 2.0
#: Default cap on simultaneously open indexer connections.
DEFAULT_MAX_CONNECTIONS = 1024

#: ``dd/mm/YYYY HH:MM:SS``, the DATETIME of every request.
DATETIME_FORMAT = "%d/%m/%Y %H:%M:%S"


def format_datetime(when: float | None = None) -> str:
    """Local time as the time service and the DATETIME field spell it."""
    return time.strftime(DATETIME_FORMAT, time.localtime(when))


def encode_field(value: str | bytes | int) -> bytes:
    """One field as it travels: UTF-8 bytes (numbers in decimal) and a NUL."""
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str):
        value = value.encode("utf-8")
    if NUL in value:
        raise ValueError("a field cannot contain a NUL byte")
    return value + NUL


def encode_fields(*values: str | bytes | int) -> bytes:
    """Several fields back to back, as one request or reply."""
    return b"".join(encode_field(v) for v in values)


def encode_code(code: int) -> bytes:
    """A result code: one unsigned byte."""
    return bytes((code,))


class FieldTooLong(Exception):
    """A field grew past its limit before its NUL arrived."""


class FieldReader:
    """Incremental splitter of NUL-terminated fields.

    Feed it bytes as they arrive; it returns the complete fields (without NUL)
    and keeps the unterminated tail. ``limit`` bounds the tail so a client that
    never sends NUL cannot make it grow: past ``limit`` bytes, ``FieldTooLong``.
    """

    __slots__ = ("_buffer", "limit")

    def __init__(self, limit: int) -> None:
        self._buffer = b""
        self.limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else data
        fields = buffer.split(NUL)
        self._buffer = fields.pop()
        if len(self._buffer) > self.limit:
            raise FieldTooLong(len(self._buffer))
        return fields

    def take_rest(self) -> bytes:
        """The bytes after the last complete field (for switching to raw mode)."""
        rest, self._buffer = self._buffer, b""
        return rest


def take_field(buffer: bytes, limit: int) -> tuple[bytes | None, bytes]:
    """Split one NUL-terminated field off the front of ``buffer``.

    For a header field followed by raw bytes (the FETCH size): returns
    ``(field, rest)``, or ``(None, buffer)`` while the NUL has not arrived.
    ``FieldTooLong`` once more than ``limit`` bytes came without a NUL.
    """
    end = buffer.find(NUL, 0, limit + 1)
    if end < 0:
        if len(buffer) > limit:
            raise FieldTooLong(len(buffer))
        return None, buffer
    return buffer[:end], buffer[end + 1 :]


def decode_fields(data: bytes) -> list[bytes]:
    """Split a complete message into fields; a trailing unterminated part is an error."""
    fields = data.split(NUL)
    if fields.pop() != b"":
        raise ValueError("message does not end with NUL")
    return fields


# --- Limits and validation -------------------------------------------------

MAX_OP = 32
MAX_DATETIME = 64
MAX_NAME = 256
MAX_DESCRIPTION = 256
#: A port travels as a decimal string; anything longer than this is not a port.
MAX_PORT_FIELD = 5
#: A FETCH offset travels as a decimal string (a 64-bit size has 20 digits).
MAX_OFFSET_FIELD = 20
#: A file size travels as a decimal string: 0 .. 2**63-1, at most 20 digits.
MAX_SIZE_FIELD = 20
MAX_FILE_SIZE = 2**63 - 1
#: A content hash: SHA-256 in lowercase hex.
SHA256_LENGTH = 64
#: The longest mode of PUBLISH_FILE (``replace``).
MAX_MODE = 7
#: A SEARCH query: one string, as long as a description may be.
MAX_WORDS = MAX_DESCRIPTION
#: SEARCH's limit: 1 .. MAX_SEARCH_LIMIT hits (decimal, at most 4 digits).
MAX_SEARCH_LIMIT = 1000
MAX_LIMIT_FIELD = 4
#: The limit our client sends when none is given.
DEFAULT_SEARCH_LIMIT = 100
#: The longest field anywhere in the classic protocols.
MAX_FIELD = max(MAX_OP, MAX_DATETIME, MAX_NAME, MAX_DESCRIPTION)


class FieldKind(Enum):
    """What a field holds, which decides its limit and its check."""

    OP = "op"
    DATETIME = "datetime"
    USER = "user"  # user names: as NAME, and no look-alikes (NFC, no format characters)
    NAME = "name"  # an owner named by LIST_CONTENT/LIST_FILES: no whitespace, no control chars
    FILE = "file"  # file names: no control characters (spaces allowed)
    TEXT = "text"  # descriptions: any printable UTF-8, spaces allowed
    PORT = "port"
    OFFSET = "offset"
    SIZE = "size"  # a file size: decimal 0 .. 2**63-1
    SHA256 = "sha256"  # 64 lowercase hex digits
    MODE = "mode"  # PUBLISH_FILE: new or replace
    WORDS = "words"  # a SEARCH query: as TEXT
    LIMIT = "limit"  # SEARCH: decimal 1 .. MAX_SEARCH_LIMIT


LIMITS: dict[FieldKind, int] = {
    FieldKind.OP: MAX_OP,
    FieldKind.DATETIME: MAX_DATETIME,
    FieldKind.USER: MAX_NAME,
    FieldKind.NAME: MAX_NAME,
    FieldKind.FILE: MAX_NAME,
    FieldKind.TEXT: MAX_DESCRIPTION,
    FieldKind.PORT: MAX_PORT_FIELD,
    FieldKind.OFFSET: MAX_OFFSET_FIELD,
    FieldKind.SIZE: MAX_SIZE_FIELD,
    FieldKind.SHA256: SHA256_LENGTH,
    FieldKind.MODE: MAX_MODE,
    FieldKind.WORDS: MAX_WORDS,
    FieldKind.LIMIT: MAX_LIMIT_FIELD,
}

#: PUBLISH_FILE's modes: ``new`` fails on a name already published (as PUBLISH),
#: ``replace`` creates or updates the entry.
PUBLISH_MODES = frozenset({"new", "replace"})
#: Numeric kinds: ASCII digits only, each with its range.
_NUMBERS: dict[FieldKind, tuple[int, int]] = {
    FieldKind.PORT: (1, 65535),
    FieldKind.OFFSET: (0, 10**MAX_OFFSET_FIELD - 1),  # any offset its digits can spell
    FieldKind.SIZE: (0, MAX_FILE_SIZE),
    FieldKind.LIMIT: (1, MAX_SEARCH_LIMIT),
}
_HEX = frozenset(b"0123456789abcdef")


class BadField(ValueError):
    """A field that breaks protocol.md's limits (length, encoding, content)."""


#: Unicode line and paragraph separators: not control characters, but many readers
#: end a line there. DATETIME goes verbatim into an audit record (one line), so
#: it may not hold one (the logger refuses such a record).
LINE_SEPARATORS = frozenset("\u2028\u2029")


def _is_control(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or 0x7F <= o < 0xA0


def is_decimal(text: str) -> bool:
    """True for plain ASCII digits: ``str.isdigit`` also takes ``²`` (which ``int``
    refuses: a peer's or an indexer's field must not raise there) and ``٣`` (which it
    reads as 3: not a number our protocols send)."""
    return text.isascii() and text.isdigit()


def check_name(text: str) -> bool:
    """True for a valid user name or owner (non-empty, no whitespace or control chars)."""
    return bool(text) and not any(ch.isspace() or _is_control(ch) for ch in text)


def check_file(text: str) -> bool:
    """True for a valid file name: non-empty, no control characters (spaces allowed)."""
    return bool(text) and not any(_is_control(ch) for ch in text)


def check_user(text: str) -> bool:
    """True for a valid user name: a valid name, in Unicode NFC, without format characters.

    Format characters (category Cf: zero-width space and joiners, bidi controls
    such as U+202E) and unnormalised forms let two names that look the same on
    every screen be different names, so one user could pass for another.
    """
    return (
        check_name(text)
        and unicodedata.is_normalized("NFC", text)
        and not any(unicodedata.category(ch) == "Cf" for ch in text)
    )


def check_text(text: str) -> bool:
    """True for a valid description (non-empty, no control characters but tab)."""
    return bool(text) and not any(_is_control(ch) and ch != "\t" for ch in text)


def decode_field(raw: bytes, kind: FieldKind) -> str | int:
    """Validate one received field and return its value; ``BadField`` if invalid.

    PORT gives an int in 1..65535, OFFSET an int >= 0, SIZE an int in
    0..2**63-1, LIMIT an int in 1..MAX_SEARCH_LIMIT, the others a str.
    """
    if not raw or len(raw) > LIMITS[kind]:
        raise BadField(f"{kind.value}: length {len(raw)}")
    bounds = _NUMBERS.get(kind)
    if bounds is not None:
        if not raw.isdigit():  # bytes.isdigit: ASCII digits only (no sign, no blank)
            raise BadField(f"{kind.value}: not a decimal number")
        number = int(raw)
        if not bounds[0] <= number <= bounds[1]:
            raise BadField(f"{kind.value} out of range: {number}")
        return number
    if kind is FieldKind.SHA256:
        if len(raw) != SHA256_LENGTH or not _HEX.issuperset(raw):
            raise BadField("sha256: not 64 lowercase hex digits")
        return raw.decode("ascii")
    if kind is FieldKind.MODE:
        mode = raw.decode("ascii", "replace")
        if mode not in PUBLISH_MODES:
            raise BadField(f"mode: not one of {sorted(PUBLISH_MODES)}")
        return mode
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadField(f"{kind.value}: not UTF-8") from exc
    if kind is FieldKind.NAME and not check_name(text):
        raise BadField(f"name has whitespace or control characters: {text!r}")
    if kind is FieldKind.FILE and not check_file(text):
        raise BadField(f"file name has control characters: {text!r}")
    if kind is FieldKind.USER and not check_user(text):
        raise BadField(
            f"user name is not NFC, or has whitespace, control or format characters: {text!r}"
        )
    if kind in (FieldKind.TEXT, FieldKind.WORDS) and not check_text(text):
        raise BadField(f"text has control characters: {text!r}")
    if kind in (FieldKind.OP, FieldKind.DATETIME) and any(
        _is_control(c) or c in LINE_SEPARATORS for c in text
    ):
        raise BadField(f"{kind.value} has control characters or line separators")
    return text


# --- Indexer operations and result codes -----------------------------------

OK = 0


@dataclass(frozen=True)
class OpSpec:
    """One indexer operation: its argument fields and its reply codes.

    Codes that an operation does not have are ``None``. Checks run in the order
    of the codes: user exists, then connected, then the operation's own check.
    """

    name: str
    args: tuple[FieldKind, ...]
    error: int  # "any other error"
    no_user: int | None = None  # 1: user does not exist
    not_connected: int | None = None  # 2: user not connected
    own: int | None = None  # the operation's own check (see protocol.md)

    @property
    def fields(self) -> tuple[FieldKind, ...]:
        """Every field of the request after OP: DATETIME, USER, then the arguments."""
        return (FieldKind.DATETIME, FieldKind.USER, *self.args)

    @property
    def codes(self) -> tuple[int, ...]:
        """Every code this operation can answer."""
        known = (OK, self.no_user, self.not_connected, self.own, self.error)
        return tuple(sorted({c for c in known if c is not None}))


REGISTER = OpSpec("REGISTER", (), error=2, own=1)  # own: name already registered
UNREGISTER = OpSpec("UNREGISTER", (), error=2, no_user=1)  # connected -> error
CONNECT = OpSpec("CONNECT", (FieldKind.PORT,), error=3, no_user=1, own=2)  # own: connected
DISCONNECT = OpSpec("DISCONNECT", (), error=3, no_user=1, not_connected=2)
PUBLISH = OpSpec(
    "PUBLISH", (FieldKind.FILE, FieldKind.TEXT), error=4, no_user=1, not_connected=2, own=3
)
DELETE = OpSpec("DELETE", (FieldKind.FILE,), error=4, no_user=1, not_connected=2, own=3)
LIST_USERS = OpSpec("LIST_USERS", (), error=3, no_user=1, not_connected=2)
LIST_CONTENT = OpSpec("LIST_CONTENT", (FieldKind.NAME,), error=4, no_user=1, not_connected=2, own=3)
#: Extension: LIST_USERS with each user's key fingerprint (``-`` when the name is unclaimed).
LIST_PEERS = OpSpec("LIST_PEERS", (), error=3, no_user=1, not_connected=2)

#: The classic operations (protocol.md section 1), frozen.
CLASSIC_OPS: dict[str, OpSpec] = {
    op.name: op
    for op in (REGISTER, UNREGISTER, CONNECT, DISCONNECT, PUBLISH, DELETE, LIST_USERS, LIST_CONTENT)
}
#: Extension: renews the connected user's lease (protocol.md, "Liveness"); after code 0
#: the lease in seconds follows as a decimal string. 2 tells a client its user was dropped.
ALIVE = OpSpec("ALIVE", (), error=3, no_user=1, not_connected=2)
#: Extension (protocol.md section 7.3): ALIVE, and the lease is then held by this kept
#: (TLS) connection for as long as it stays open; code 3 on a connection that is not kept.
HOLD = OpSpec("HOLD", (), error=3, no_user=1, not_connected=2)

#: Extension (protocol.md section 8): PUBLISH with the file's size and SHA-256, and a mode
#: (``new``: code 3 when the name is published, as PUBLISH; ``replace``: create or update).
PUBLISH_FILE = OpSpec(
    "PUBLISH_FILE",
    (FieldKind.FILE, FieldKind.TEXT, FieldKind.SIZE, FieldKind.SHA256, FieldKind.MODE),
    error=4,
    no_user=1,
    not_connected=2,
    own=3,
)
#: Extension: LIST_CONTENT with each file's size and SHA-256 (``-`` when not published).
LIST_FILES = OpSpec("LIST_FILES", (FieldKind.NAME,), error=4, no_user=1, not_connected=2, own=3)
#: Extension: full-text search over every connected owner's files (words, limit).
SEARCH = OpSpec("SEARCH", (FieldKind.WORDS, FieldKind.LIMIT), error=3, no_user=1, not_connected=2)
#: Extension (protocol.md 8.6): the connected owners of a file with this SHA-256, with
#: their addresses (at most MAX_SOURCES, the asking user excluded), to download it from several.
SOURCES = OpSpec("SOURCES", (FieldKind.SHA256,), error=3, no_user=1, not_connected=2)
#: SOURCES lists at most this many owners.
MAX_SOURCES = 64
#: Shown for the size or hash of a file published without them (classic PUBLISH).
UNKNOWN = "-"

#: Every operation the indexer serves: the classic ones and the extensions.
OPS: dict[str, OpSpec] = {
    **CLASSIC_OPS,
    **{op.name: op for op in (LIST_PEERS, ALIVE, HOLD, PUBLISH_FILE, LIST_FILES, SEARCH, SOURCES)},
}
OPS_BY_BYTES: dict[bytes, OpSpec] = {name.encode("ascii"): op for name, op in OPS.items()}

#: Operations that change nothing (what ``--classic read-only`` still serves).
READ_OPS = frozenset(
    {"LIST_USERS", "LIST_CONTENT", "LIST_PEERS", "ALIVE", "HOLD", "LIST_FILES", "SEARCH", "SOURCES"}
)
#: Operations that are not audited: a heartbeat changes nothing and comes every few seconds.
UNAUDITED_OPS = frozenset({"ALIVE", "HOLD"})
#: Default ``--peer-timeout``: seconds after which a connected user whose client is gone is dropped.
DEFAULT_PEER_TIMEOUT = 60.0
#: A held lease (HOLD) whose connection is lost keeps this fraction of the lease: the
#: client reconnects and holds again within it, or is dropped.
HELD_GRACE = 1 / 3
#: Shown in LIST_PEERS for a name that no key has claimed.
UNCLAIMED = "-"

# --- TLS (extension: protocol.md, "TLS and claimed names") -------------------

#: First byte of a TLS handshake record: a connection starting with it speaks TLS.
TLS_HANDSHAKE = 0x16
#: A key fingerprint: SHA-256 of the certificate's SubjectPublicKeyInfo, in lowercase hex.
FINGERPRINT_LENGTH = 64
#: Seconds the indexer keeps an idle TLS connection open between requests.
TLS_IDLE_TIMEOUT = 60.0
#: Seconds our client keeps an idle TLS connection to the indexer (below the indexer's).
CLIENT_IDLE = 20.0

#: Operations whose audit record carries the file name.
AUDIT_FILE_OPS = frozenset({"PUBLISH", "DELETE", "PUBLISH_FILE"})


def audit_record(user: str, op: str, datetime: str, file_name: str | None = None) -> str:
    """The logger record of one request: ``<user> <OP>[ <file name>] <DATETIME>``."""
    if op in AUDIT_FILE_OPS and file_name is not None:
        return f"{user} {op} {file_name} {datetime}"
    return f"{user} {op} {datetime}"


def encode_request(op: str, datetime: str, user: str, *args: str | int) -> bytes:
    """A whole indexer request as a client sends it."""
    return encode_fields(op, datetime, user, *args)


def encode_listing(rows: Iterable[tuple[str | int, ...]]) -> bytes:
    """The body after code 0 of LIST_USERS / LIST_CONTENT: a count, then the rows."""
    rows = list(rows)
    return encode_field(len(rows)) + b"".join(encode_fields(*row) for row in rows)


# --- Peer protocol ---------------------------------------------------------

GET_FILE = "GET_FILE"
FETCH = "FETCH"
PEER_OK = 0
PEER_NO_FILE = 1
PEER_ERROR = 2
PEER_BAD_OFFSET = 3  # FETCH and RANGE: a bad offset (or range)
#: FETCH and RANGE (extensions): the peer serves its maximum of uploads at once; ask again later.
PEER_BUSY = 4
#: Extension (protocol.md 2.4): ``RANGE\0<name>\0<offset>\0<length>\0``: code 0, the total
#: size and NUL, then exactly ``length`` bytes from ``offset``; 3 for a bad range.
RANGE = "RANGE"
#: Extension (protocol.md 2.5): ``PIECES\0<name>\0``: code 0, the total size and NUL, the
#: piece size and NUL, then the raw SHA-256 of each piece (:func:`piece_size`).
PIECES = "PIECES"
#: Fields after the operation of each peer request.
PEER_ARGUMENTS: dict[str, int] = {GET_FILE: 1, FETCH: 2, RANGE: 3, PIECES: 1}
#: Bytes of one piece digest (raw SHA-256).
PIECE_DIGEST = 32
#: The smallest piece, and the most pieces a file is cut into (the piece size doubles past it).
MIN_PIECE = 1024 * 1024
MAX_PIECES = 16384


def piece_size(size: int) -> int:
    """The piece size of a file of ``size`` bytes: 1 MiB, doubled until the file has at
    most :data:`MAX_PIECES` pieces. A pure function of the size, so every source of the
    same content serves the same piece list."""
    piece = MIN_PIECE
    while -(-size // piece) > MAX_PIECES:
        piece *= 2
    return piece


def piece_count(size: int) -> int:
    """How many pieces a file of ``size`` bytes has (0 for an empty file)."""
    return -(-size // piece_size(size))
