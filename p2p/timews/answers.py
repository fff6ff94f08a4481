"""get_time answers Spyne already gave, served again without Spyne.

Spyne's answer to a POST depends only on the request's method, path, query,
Content-Type and body (it reads no other header for a SOAP call), and for
``get_time`` on the second it is called in. So once Spyne has validated a
request and answered it, a byte-identical request is valid too and gets the
same envelope with the current second in place of the one Spyne wrote. That
is what this module keeps: a few such validated requests (a client sends the
same envelope every time), each with its answer cut around the time stamp,
and the whole answer of the current second, ready to write.

Anything not byte-identical to a request Spyne answered with 200 goes to
Spyne, so validation, faults and the WSDL are Spyne's exactly as before. The
memory is bounded: at most ``max_entries`` requests of at most ``max_body``
bytes each; the oldest is forgotten first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from p2p import wire

#: Key of the stamp ``get_time`` returned, in the environ Spyne got.
STAMP = "p2p.stamp"
#: Key of the request body, in the environ Spyne got (set by the guard).
BODY = "p2p.body"
#: Key of the Content-Type as the client sent it (the guard hands Spyne a checked one).
CONTENT_TYPE = "p2p.content_type"

Key = tuple[str, str, str, str, bytes]


def answer_key(method: str, path_info: str, query: str, content_type: str, body: bytes) -> Key:
    """What Spyne's answer to a POST depends on, as one hashable key."""
    return (method, path_info, query, content_type, body)


@dataclass
class _Answer:
    """One learned answer: the envelope around the stamp, and the current second's copy."""

    status: str
    headers: list[tuple[str, str]]
    before: bytes
    after: bytes
    second: str = ""
    body: bytes = field(default=b"", repr=False)

    def at(self, stamp: str) -> bytes:
        """The envelope naming ``stamp``, built once per second."""
        if stamp != self.second:
            self.body = b"".join((self.before, stamp.encode("ascii"), self.after))
            self.second = stamp
        return self.body


class ValidatedAnswers:
    """A bounded memory of requests Spyne validated and answered with 200."""

    def __init__(
        self,
        max_entries: int = 64,
        max_body: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries = max_entries
        self.max_body = max_body
        self.clock = clock
        self._answers: OrderedDict[Key, _Answer] = OrderedDict()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._answers)

    def learn(self, environ: dict, status: str, headers: list, body: bytes) -> None:
        """Remember Spyne's answer to the request in ``environ`` when it can be reused:
        a 200 to a POST of a small body, naming the stamp ``get_time`` returned once.

        Called from the WSGI application, possibly in a worker thread: the only
        shared change is one dict assignment (atomic under the GIL).
        """
        stamp = environ.get(STAMP)
        request_body = environ.get(BODY)
        if not stamp or request_body is None or not status.startswith("200 "):
            return
        if environ.get("REQUEST_METHOD") != "POST" or len(request_body) > self.max_body:
            return
        parts = body.split(stamp.encode("ascii"))
        if len(parts) != 2:
            return
        key = answer_key(
            "POST",
            environ.get("PATH_INFO", ""),
            environ.get("QUERY_STRING", ""),
            environ.get(CONTENT_TYPE, ""),
            request_body,
        )
        kept = [(n, v) for n, v in headers if n.lower() != "content-length"]
        answers = self._answers
        answers[key] = _Answer(status, kept, parts[0], parts[1])
        while len(answers) > self.max_entries:
            try:
                answers.popitem(last=False)
            except KeyError:  # emptied meanwhile by another thread
                break

    def lookup(self, key: Key) -> tuple[str, list[tuple[str, str]], bytes] | None:
        """Status, headers and body for a request identical to a validated one, or None."""
        answer = self._answers.get(key)
        if answer is None:
            return None
        self.hits += 1
        return answer.status, answer.headers, answer.at(wire.format_datetime(self.clock()))
