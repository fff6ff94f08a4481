"""DATETIME stamps from the SOAP time service (protocol.md section 4), via zeep.

zeep blocks, so every call runs in the reactor's thread pool (``deferToThread``);
one ``requests.Session`` is kept alive across calls and the zeep ``Client`` (which
downloads and parses the WSDL) is built lazily, once. When the service cannot be
reached the client says so once on stderr and stamps with the local clock
(``wire.format_datetime``): a command never fails because of the time service.
After a failure the service is tried again only after ``retry_after`` seconds, so a
dead service does not slow every command down.
"""

from __future__ import annotations

import calendar
import os
import re
import threading
import time
from collections.abc import Callable

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from p2p import wire

#: Where the WSDL is looked for when neither ``--wsdl`` nor ``WSDL_URL`` says.
DEFAULT_WSDL = f"http://localhost:{wire.TIME_PORT}/?wsdl"


def wsdl_url(option: str | None = None, environ: dict[str, str] | None = None) -> str:
    """The WSDL address: the option, else ``WSDL_URL``, else the default."""
    if option:
        return option
    env = os.environ if environ is None else environ
    return env.get("WSDL_URL") or DEFAULT_WSDL


class TimeClient:
    """Asks the time service for ``dd/mm/YYYY HH:MM:SS``; never fails."""

    log = Logger()

    def __init__(
        self,
        wsdl: str,
        warn: Callable[[str], None],
        reactor=None,
        timeout: float = 5.0,
        retry_after: float = 30.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.wsdl = wsdl
        self.warn = warn
        self.reactor = reactor
        self.timeout = timeout
        self.retry_after = retry_after
        self._client = None
        self._lock = threading.Lock()  # one zeep Client, built once, even if calls overlap
        self._warned = False
        self._down_until: float | None = None

    def now(self) -> Deferred:
        """Fire with the DATETIME to stamp a request with."""
        if self._down_until is not None and self.reactor.seconds() < self._down_until:
            return defer.succeed(wire.format_datetime())
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._ask)
        d.addCallbacks(self._answered, self._unreachable)
        return d

    def _ask(self) -> str:
        """Runs in a worker thread: the blocking SOAP call."""
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            client = self._client
        answer = client.service.get_time()
        text = str(answer)
        wire.decode_field(text.encode("utf-8"), wire.FieldKind.DATETIME)  # BadField if junk
        return text

    def _make_client(self):
        import requests
        import zeep
        from zeep.transports import Transport

        session = requests.Session()
        transport = Transport(session=session, timeout=self.timeout, operation_timeout=self.timeout)
        return zeep.Client(self.wsdl, transport=transport)

    def _answered(self, text: str) -> str:
        if self._down_until is not None:
            self.warn(f"time service at {self.wsdl} answers again")
        self._down_until = None
        return text

    def _unreachable(self, failure) -> str:
        self.log.debug("time service failed: {f}", f=failure.getErrorMessage())
        if not self._warned:
            self._warned = True
            self.warn(
                f"time service at {self.wsdl} cannot be reached ({_short(failure)}); "
                "stamping requests with the local clock"
            )
        self._down_until = self.reactor.seconds() + self.retry_after
        return wire.format_datetime()


def advanced(stamp: str, seconds: float) -> str | None:
    """``stamp`` (``dd/mm/YYYY HH:MM:SS``) moved on by ``seconds``, in the same format; None
    if it is not in that format. Plain calendar arithmetic on the wall-clock reading, so
    the stamp's own time zone carries over and no daylight-saving rule applies."""
    try:
        base = calendar.timegm(time.strptime(stamp, wire.DATETIME_FORMAT))
    except (ValueError, OverflowError):
        return None
    return time.strftime(wire.DATETIME_FORMAT, time.gmtime(base + max(0, int(seconds))))


def _short(failure) -> str:
    """The gist of a failure: the OS error inside requests' long message if there is one."""
    message = failure.getErrorMessage()
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", message)
    if errno:
        return errno.group(0)
    return f"{failure.type.__name__}: {message[:120]}"
