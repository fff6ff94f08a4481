"""The services' own log: repeated lines rate-limited, log files bounded in size and count.

A client can make a service log a line per request (a bad SOAP call, an
undecodable datagram); a flood of them would fill the disk. Two pieces, shared
by every twistd service of the package:

- ``RateLimitedObserver``, a twisted.logger observer that passes at most
  ``burst`` events of one kind (namespace, level, format) per ``period``
  seconds and, at the end of a period that suppressed some, writes one
  "suppressed N lines" summary per kind;
- ``LogOptions`` (``--log-size``, ``--log-files``) and ``ServiceLogs``, a
  mixin for the service a twistd plugin makes: it gives twistd, as the
  application's ``ILogObserver``, a rate-limited observer writing to a
  ``twisted.python.logfile.LogFile`` that rotates at ``--log-size`` bytes and
  keeps ``--log-files`` old files (twistd's own ``--logfile`` rotates at 1 MB
  and never deletes one). ``--logfile``, ``--nodaemon``, ``--logger`` and
  ``--syslog`` keep their meaning.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger, formatEvent, textFileLogObserver
from twisted.python import usage
from twisted.python.logfile import LogFile
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

from p2p.listening import positive_int

#: Lines of one kind written per period before the rest are only counted.
DEFAULT_BURST = 20
#: Length of a rate-limit period, in seconds.
DEFAULT_PERIOD = 10.0
#: Kinds of line tracked per period; more kinds share one budget.
MAX_KINDS = 1024
#: Size at which a log file is rotated (twistd's own default).
DEFAULT_LOG_SIZE = 1_000_000
#: Rotated log files kept beside the current one; older ones are deleted.
DEFAULT_LOG_FILES = 5
#: Longest sample of a suppressed line quoted in the summary.
_MAX_SAMPLE = 200

_Kind = tuple[Any, ...]
_OTHER: _Kind = ("(other kinds)",)


def _kind(event: dict) -> _Kind:
    """What makes two events "the same line": where, how severe, which message."""
    return (event.get("log_namespace"), event.get("log_level"), event.get("log_format"))


def one_line(text: str, limit: int = _MAX_SAMPLE) -> str:
    """``text`` shortened to ``limit`` characters, control characters escaped."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@implementer(ILogObserver)
class RateLimitedObserver:
    """Passes at most ``burst`` events of each kind per ``period``, then a summary.

    A period starts with the first event after a quiet one, so no timer runs
    while nothing is logged. Safe to call from any thread (twisted.web's WSGI
    threads log too): the counters are locked and the timer is started on the
    reactor thread.
    """

    def __init__(
        self,
        observer: ILogObserver,
        clock: IReactorTime,
        burst: int = DEFAULT_BURST,
        period: float = DEFAULT_PERIOD,
        call_from_thread: Callable[..., object] | None = None,
    ) -> None:
        self.observer = observer
        self.clock = clock
        self.burst = burst
        self.period = period
        self._call_from_thread = call_from_thread or getattr(clock, "callFromThread", None)
        self._lock = threading.Lock()
        self._passed: dict[_Kind, int] = {}
        self._suppressed: dict[_Kind, tuple[int, dict]] = {}
        self._timer_started = False
        self._summary = Logger(namespace="p2p.logs", observer=observer)

    def __call__(self, event: dict) -> None:
        kind = _kind(event)
        with self._lock:
            if kind not in self._passed and len(self._passed) >= MAX_KINDS:
                kind = _OTHER
            passed = self._passed.get(kind, 0)
            if passed < self.burst:
                self._passed[kind] = passed + 1
            else:
                count, sample = self._suppressed.get(kind, (0, event))
                self._suppressed[kind] = (count + 1, sample)
                event = None
            start = not self._timer_started
            self._timer_started = True
        if start:
            self._start_timer()
        if event is not None:
            self.observer(event)

    def _start_timer(self) -> None:
        if self._call_from_thread is not None and not isInIOThread():
            self._call_from_thread(self.clock.callLater, self.period, self._end_period)
        else:
            self.clock.callLater(self.period, self._end_period)

    def _end_period(self) -> None:
        with self._lock:
            suppressed, self._suppressed = self._suppressed, {}
            self._passed = {}
            self._timer_started = False
        for count, sample in suppressed.values():
            self._summary.warn(
                "suppressed {count} log lines in {period:g} s like: {sample}",
                count=count,
                period=self.period,
                sample=one_line(formatEvent(sample)),
            )


class LogOptions(usage.Options):
    """``--log-size`` and ``--log-files``: how big the log file grows, how many are kept."""

    optParameters = [
        [
            "log-size",
            None,
            DEFAULT_LOG_SIZE,
            "Rotate the log file (--logfile) when it reaches this many bytes.",
            positive_int,
        ],
        [
            "log-files",
            None,
            DEFAULT_LOG_FILES,
            "Rotated log files kept; older ones are deleted.",
            positive_int,
        ],
    ]


def bounded_log_file(path: str, size: int, files: int) -> LogFile:
    """A log file rotating at ``size`` bytes that keeps ``files`` rotated files."""
    return LogFile.fromFullPath(path, rotateLength=size, maxRotatedFiles=files)


def service_log_observer(
    twistd: usage.Options, size: int, files: int, reactor: Any = None
) -> ILogObserver | None:
    """The rate-limited, bounded observer for twistd's options; None leaves twistd's own.

    twistd's ``--logger`` and ``--syslog`` are left to twistd, as is ``--logfile -``
    without ``--nodaemon`` (twistd refuses it). A file gets SIGUSR1 rotation,
    as twistd's own log file does.
    """
    if twistd.get("logger") or twistd.get("syslog"):
        return None
    path = twistd.get("logfile") or ""
    nodaemon = bool(twistd.get("nodaemon"))
    if path == "-" and not nodaemon:
        return None
    if reactor is None:
        from twisted.internet import reactor
    if path == "-" or (not path and nodaemon):
        out: Any = sys.stdout
    else:
        out = bounded_log_file(path or "twistd.log", size, files)
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(out.rotate))
    return RateLimitedObserver(textFileLogObserver(out), reactor)


class ServiceLogs:
    """Mixin for a twistd service: once in twistd's application, it names its log observer.

    twistd builds the service, puts it in the application, and only then looks
    for an ``ILogObserver`` component on the application to log to: this is
    where the service sets it, from ``log_options`` (its ``Options``, with
    ``LogOptions``; their ``parent`` are twistd's own). A service put in
    another service (the stack's parts) sets nothing.
    """

    #: The service's parsed ``Options`` (including ``LogOptions``); None: leave twistd's log.
    log_options: usage.Options | None = None

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)  # type: ignore[misc]
        options = self.log_options
        twistd = getattr(options, "parent", None)
        if options is None or twistd is None or not hasattr(parent, "setComponent"):
            return
        observer = service_log_observer(twistd, options["log-size"], options["log-files"])
        if observer is not None:
            parent.setComponent(ILogObserver, observer)
