"""The P2P_LOGGER program of ``logger.x``: NULL and ``int LOG(string message<>)``.

LOG answers 0 once the record is in the audit file (or was already stored for
this relay sender and sequence number), -1 when it cannot be stored (the files
cannot be written, or the message is not one line of UTF-8 text), and
GARBAGE_ARGS when the arguments do not decode or the message is longer than
``max_message`` bytes (then nothing is stored).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.address import UNIXAddress
from twisted.logger import Logger

from p2p import wire
from p2p.logcontract import LOG_ERROR, LOG_OK, parse_relay_machinename
from p2p.logger.audit import AuditLog
from p2p.metrics import Metrics
from p2p.oncrpc import rpc
from p2p.oncrpc.server import GarbageArgs, Program, null_procedure

log = Logger()

#: Default longest message LOG accepts (an indexer record is under 1 KiB).
DEFAULT_MAX_MESSAGE = 4096

#: Most relay senders whose failed record the logger remembers (oldest forgotten first).
MAX_FAILED_SENDERS = 1024


#: LOG's results, encoded once.
_RESULTS = {LOG_OK: rpc.pack_int(LOG_OK), LOG_ERROR: rpc.pack_int(LOG_ERROR)}
#: The result label of each encoded result (NULL's empty one is "ok").
_RESULT_LABELS = {b"": "ok", **{encoded: str(value) for value, encoded in _RESULTS.items()}}


def _relay_identity(call: rpc.Call) -> tuple[str, int] | None:
    if call.cred.flavor != rpc.AUTH_SYS:
        return None
    return parse_relay_machinename(rpc.AuthSys.decode(call.cred.body).machinename)


def valid_record(text: str) -> bool:
    """One non-empty line without control characters (tab allowed) or line separators.

    ``wire.LINE_SEPARATORS`` (U+2028/U+2029) end a line for str.splitlines(),
    JavaScript and many editors, so a record holding one would read as two.
    """
    if text.isascii() and text.isprintable():  # the usual record, checked in C
        return bool(text)
    return bool(text) and wire.check_text(text) and wire.LINE_SEPARATORS.isdisjoint(text)


class LoggerProgram:
    """LOG's behaviour over an ``AuditLog``; ``program()`` gives the RPC ``Program``."""

    def __init__(
        self,
        audit: AuditLog,
        number: int = wire.LOGGER_PROGRAM,
        max_message: int = DEFAULT_MAX_MESSAGE,
        durable=None,
    ) -> None:
        self.audit = audit
        self.number = number
        self.max_message = max_message
        #: Optional callable returning a Deferred that fires once writes are on disk.
        self.durable = durable
        #: Optional callable given the peer of each relay record answered 0 (the
        #: service remembers those sources so its connection cap keeps them a slot).
        self.relay_seen: Callable[[object], None] | None = None
        #: Per relay sender, the lowest seq that could not be stored (in memory):
        #: later seqs of that sender are refused until it is stored. Bounded: any
        #: client can invent sender ids, and a failed record costs it no disk.
        self.failed: OrderedDict[str, int] = OrderedDict()
        #: Where the calls are counted (:meth:`count_in`; None: not counted).
        self.metrics: Metrics | None = None

    def count_in(self, metrics: Metrics) -> None:
        """Count the calls of the next :meth:`program` in ``metrics``: by procedure, transport
        and result, and their duration; and the records stored."""
        self.metrics = metrics
        self._calls = metrics.counter(
            "calls",
            "Calls answered, by procedure, transport and result "
            "(0 or -1 for LOG, ok for NULL, garbage_args).",
            ("procedure", "transport", "result"),
        )
        self._durations = metrics.histogram(
            "call_duration_seconds",
            "Seconds from a decoded call to its result (with --fsync: on disk), by procedure.",
            ("procedure",),
        )
        metrics.counted(
            "records_stored", "Audit records appended to the audit file.", lambda: self.audit.stored
        )
        metrics.counted(
            "records_duplicate",
            "Relay records already stored, answered 0 without storing them again.",
            lambda: self.audit.duplicates,
        )

    def program(self) -> Program:
        procedures = {wire.LOGGER_PROC_NULL: null_procedure, wire.LOGGER_PROC_LOG: self.log}
        if self.metrics is not None:
            names = {wire.LOGGER_PROC_NULL: "NULL", wire.LOGGER_PROC_LOG: "LOG"}
            procedures = {n: self._counted(names[n], p) for n, p in procedures.items()}
        return Program(self.number, {wire.LOGGER_VERSION: procedures})

    def _counted(self, name: str, procedure):
        """``procedure``, counting each call and its duration."""
        calls, durations, clock = self._calls, self._durations, time.monotonic

        def counted(call: rpc.Call, args: bytes, peer: object) -> bytes | defer.Deferred:
            began = clock()
            transport = _transport(peer)
            try:
                result = procedure(call, args, peer)
            except GarbageArgs:
                calls.inc((name, transport, "garbage_args"))
                raise

            def done(result: bytes) -> bytes:
                calls.inc((name, transport, _RESULT_LABELS.get(result, "other")))
                durations.observe(clock() - began, (name,))
                return result

            if isinstance(result, defer.Deferred):
                return result.addCallback(done)
            return done(result)

        return counted

    def log(self, call: rpc.Call, args: bytes, peer: object) -> bytes | defer.Deferred:
        """LOG: store the record; its encoded result (a Deferred of it with --fsync)."""
        if call.cred.flavor != rpc.AUTH_SYS:
            # Not a relay (a C client's call): no sender to keep in order or
            # deduplicate, so nothing to look up before or after storing.
            return self._answer(self._log(args, None))
        identity = _relay_identity(call)
        if identity is not None:
            sender, seq = identity
            failed = self.failed.get(sender)
            if failed is not None and seq > failed:
                # An earlier record of this sender was not stored: storing this one
                # first would break the order (and the earlier one would then look
                # like a duplicate). The relay resends from the failed one.
                return _RESULTS[LOG_ERROR]
        try:
            result = self._log(args, identity)
        except GarbageArgs:
            self._failed(identity)
            raise
        if result != LOG_OK:
            self._failed(identity)
        elif identity is not None:
            if self.failed.get(identity[0], -1) >= identity[1]:
                del self.failed[identity[0]]
            if self.relay_seen is not None:
                self.relay_seen(peer)
        return self._answer(result)

    def _answer(self, result: int) -> bytes | defer.Deferred:
        """LOG's encoded result; once the record is on disk with ``durable`` (--fsync)."""
        if result == LOG_OK and self.durable is not None:
            return self.durable().addCallback(lambda _: _RESULTS[LOG_OK])
        return _RESULTS[result]

    def _failed(self, identity: tuple[str, int] | None) -> None:
        if identity is not None:
            sender, seq = identity
            if seq <= self.audit.last_seq.get(sender, -1):
                # Already stored: the relay never sends it again, so remembering it
                # would refuse every later record of the sender (a foreign client
                # resending an old seq with a bad message could wedge the relay).
                return
            self.failed[sender] = min(seq, self.failed.get(sender, seq))
            self.failed.move_to_end(sender)
            while len(self.failed) > MAX_FAILED_SENDERS:
                self.failed.popitem(last=False)

    def _log(self, args: bytes, identity: tuple[str, int] | None) -> int:
        try:
            raw = rpc.unpack_string(args, self.max_message)
        except rpc.MessageError as exc:
            raise GarbageArgs(str(exc)) from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return LOG_ERROR
        if not valid_record(text):
            return LOG_ERROR
        try:
            if identity is None:
                self.audit.store(text)
            else:
                self.audit.store(text, *identity)
        except OSError as exc:
            log.error("cannot store audit record: {exc}", exc=exc)
            return LOG_ERROR
        return LOG_OK


def _transport(peer: object) -> str:
    """The transport a call came over, from its peer: a UDP peer is a (host, port) tuple."""
    if isinstance(peer, tuple):
        return "udp"
    return "unix" if isinstance(peer, UNIXAddress) else "tcp"
