"""Empty 500s and log floods (issue 9, item 5), against real ``twistd`` processes.

Every malformed SOAP request gets a SOAP fault and one short log line, never a
traceback; a flood of bad SOAP calls or of undecodable UDP datagrams to the
logger writes a bounded number of lines plus "suppressed N" summaries; the
log files rotate at ``--log-size`` and no more than ``--log-files`` old ones
are kept. The rate limit itself is tested on a fake clock.
"""

from __future__ import annotations

import io
import re
import signal
from pathlib import Path

from lxml import etree
from twisted.internet import defer, protocol, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.logs import DEFAULT_BURST, DEFAULT_PERIOD, RateLimitedObserver, service_log_observer
from p2p.oncrpc import rpc
from p2p.timews.app import GuardedWsgiApplication, make_application
from tests.support import (
    TWISTD,
    deadline,
    exchange,
    logger_ports,
    poll_until,
    spawn,
    time_url,
    url_port,
)
from tests.test_harden_time import GET_TIME, NS, SOAP_ENV, http_request, split_responses

ENVELOPE = (
    f'<e:Envelope xmlns:e="{SOAP_ENV}" xmlns:t="urn:p2p:time"><e:Body>{{}}</e:Body></e:Envelope>'
)
DECL = '<?xml version="1.0" encoding="UTF-8"?>'
ENTITY_DTD = '<!DOCTYPE e [<!ENTITY a "b">]>'
#: The attack of the issue: an entity reference inside <t:get_time>.
ENTITY_REFERENCE = (DECL + ENTITY_DTD + ENVELOPE.format("<t:get_time>&a;</t:get_time>")).encode()
UTF8 = b"text/xml; charset=utf-8"
SUPPRESSED = re.compile(r"suppressed (\d+) log lines")
FAULT_LINE = "SOAP fault to "


def envelope(inner: str = "<t:get_time/>", head: str = DECL) -> str:
    return head + ENVELOPE.format(inner)


def multipart(part: bytes) -> bytes:
    return b"--xyz\r\nContent-Type: text/xml\r\nContent-ID: <a>\r\n\r\n" + part + b"\r\n--xyz--\r\n"


#: (what, body, Content-Type, faultcode): every kind of malformed call found by probing.
#: The first five made Spyne raise (an empty 500 and a traceback) before the fix.
MALFORMED = [
    ("entity in get_time", ENTITY_REFERENCE, UTF8, "Client.DTDNotAllowed"),
    (
        "entity in Body",
        envelope("&a;<t:get_time/>", DECL + ENTITY_DTD).encode(),
        UTF8,
        "Client.DTDNotAllowed",
    ),
    (
        "external entity",
        envelope(
            "<t:get_time>&a;</t:get_time>",
            DECL + '<!DOCTYPE e [<!ENTITY a SYSTEM "file:///etc/passwd">]>',
        ).encode(),
        UTF8,
        "Client.DTDNotAllowed",
    ),
    (
        "entity, UTF-16",
        envelope(
            "<t:get_time>&a;</t:get_time>", '<?xml version="1.0" encoding="UTF-16"?>' + ENTITY_DTD
        ).encode("utf-16"),
        b"text/xml",
        "Client.DTDNotAllowed",
    ),
    ("charset idna", GET_TIME, b"text/xml; charset=idna", "Client.BadCharset"),
    (
        "DTD without entities",
        envelope(head=DECL + "<!DOCTYPE e>").encode(),
        UTF8,
        "Client.DTDNotAllowed",
    ),
    (
        "undefined entity",
        envelope("<t:get_time>&nope;</t:get_time>").encode(),
        UTF8,
        "Client.XMLSyntaxError",
    ),
    (
        "character reference to NUL",
        envelope("<t:get_time>&#0;</t:get_time>").encode(),
        UTF8,
        "Client.XMLSyntaxError",
    ),
    (
        "parameter entity",
        envelope(head=DECL + '<!DOCTYPE e [<!ENTITY % p "x"> %p;]>').encode(),
        UTF8,
        "Client.XMLSyntaxError",
    ),
    (
        "EBCDIC",
        envelope(head='<?xml version="1.0" encoding="cp500"?>').encode("cp500"),
        b"text/xml",
        "Client.XMLSyntaxError",
    ),
    (
        "unknown encoding",
        envelope(head='<?xml version="1.0" encoding="klingon"?>').encode(),
        b"text/xml",
        "Client.XMLSyntaxError",
    ),
    ("UTF-8 body, charset utf-16", GET_TIME, b"text/xml; charset=utf-16", "Client.XMLSyntaxError"),
    ("multipart without boundary", GET_TIME, b"multipart/related", "Client.ValidationError"),
    (
        "multipart",
        multipart(GET_TIME),
        b'multipart/related; boundary=xyz; start="<a>"',
        "Client.ValidationError",
    ),
    (
        "huge attribute",
        envelope('<t:get_time a="' + "x" * 60000 + '"/>').encode(),
        UTF8,
        "Client.SchemaValidationError",
    ),
    (
        "many attributes",
        envelope("<t:get_time " + " ".join(f'a{i}="1"' for i in range(4000)) + "/>").encode(),
        UTF8,
        "Client.SchemaValidationError",
    ),
    ("NUL byte", GET_TIME.replace(b"<e:Body>", b"<e:Body>\x00"), UTF8, "Client.XMLSyntaxError"),
]


def start_time_service(testcase: TestCase, *options: str) -> tuple:
    """``twistd p2p-time`` logging to ``t.log`` in a fresh folder: (process, folder)."""
    cwd = Path(testcase.mktemp())
    cwd.mkdir(parents=True)
    args = [*TWISTD, "-n", "--pidfile=", "--logfile=t.log", "p2p-time"]
    args += ["--listen", "tcp:0:interface=127.0.0.1", *options]
    return spawn(testcase, args, cwd=cwd, name="p2p-time"), cwd


def log_lines(path: Path) -> list[str]:
    return path.read_text("utf-8", "replace").splitlines() if path.exists() else []


def suppressed(lines: list[str]) -> int:
    """The lines the "suppressed N" summaries account for."""
    return sum(int(m[1]) for line in lines if (m := SUPPRESSED.search(line)))


def fault_code(body: bytes) -> str | None:
    root = etree.fromstring(body)
    faults = root.findall("e:Body/e:Fault", NS)
    return faults[0].findtext("faultcode") if len(faults) == 1 else None


def budget(seconds: float) -> int:
    """The most lines of one kind the rate limit lets through in ``seconds``."""
    return DEFAULT_BURST * (int(seconds // DEFAULT_PERIOD) + 2)


class RateLimitTests(TestCase):
    """``RateLimitedObserver`` on a fake clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.seen: list[dict] = []
        self.observer = RateLimitedObserver(self.seen.append, self.clock, burst=3, period=10)

    def emit(self, fmt: str = "bad request {n}", n: int = 0, **extra) -> None:
        self.observer(
            {"log_namespace": "x", "log_level": LogLevel.info, "log_format": fmt, "n": n, **extra}
        )

    def test_burst_then_one_summary_per_period(self):
        for n in range(10):
            self.emit(n=n)
        self.assertEqual([e["n"] for e in self.seen], [0, 1, 2])
        self.clock.advance(10)
        self.assertEqual(len(self.seen), 4)
        self.assertEqual(
            formatEvent(self.seen[3]), "suppressed 7 log lines in 10 s like: bad request 3"
        )
        self.assertEqual(self.seen[3]["log_level"], LogLevel.warn)
        for n in range(5):  # a new period passes the burst again
            self.emit(n=n)
        self.assertEqual(len(self.seen), 7)
        self.clock.advance(10)
        self.assertIn("suppressed 2 log lines", formatEvent(self.seen[-1]))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # quiet: no timer

    def test_kinds_are_counted_apart(self):
        for n in range(5):
            self.emit("one {n}", n)
            self.emit("two {n}", n)
        self.assertEqual(len(self.seen), 6)
        self.clock.advance(10)
        summaries = sorted(formatEvent(e) for e in self.seen[6:])
        self.assertEqual(
            summaries,
            [
                "suppressed 2 log lines in 10 s like: one 3",
                "suppressed 2 log lines in 10 s like: two 3",
            ],
        )

    def test_summary_sample_is_one_short_line(self):
        for _ in range(4):
            self.emit("{text}", text="a\nb" + "x" * 1000)
        self.clock.advance(10)
        summary = formatEvent(self.seen[-1])
        self.assertNotIn("\n", summary)
        self.assertLess(len(summary), 300)

    def test_quiet_period_has_no_summary(self):
        self.emit()
        self.clock.advance(10)
        self.assertEqual(len(self.seen), 1)


class LogChoiceTests(TestCase):
    """Which observer the services give twistd, from twistd's own options."""

    def twistd(self, **given) -> dict:
        return {"logfile": None, "nodaemon": False, "syslog": False, "logger": None, **given}

    def test_twistd_keeps_logger_syslog_and_daemon_stdout(self):
        for given in ({"logger": "a.b"}, {"syslog": True}, {"logfile": "-"}):
            self.assertIsNone(service_log_observer(self.twistd(**given), 1000, 2))

    def test_file_and_stdout_are_rate_limited(self):
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        path = Path(self.mktemp())
        clock = task.Clock()
        observer = service_log_observer(self.twistd(logfile=str(path)), 1000, 2, clock)
        self.assertIsInstance(observer, RateLimitedObserver)
        observer({"log_format": "hello", "log_level": LogLevel.info, "log_time": 0})
        self.assertIn("hello", path.read_text())
        stdout = service_log_observer(self.twistd(nodaemon=True), 1000, 2, clock)
        self.assertIsInstance(stdout, RateLimitedObserver)

    def test_the_stack_has_the_log_options_once(self):
        from p2p import stack

        options = stack.Options()
        options.parseOptions(["--log-size", "5000", "--log-files", "3"])
        self.assertEqual((options["log-size"], options["log-files"]), (5000, 3))
        for prefixed in ("--time-log-size", "--logger-log-files"):
            self.assertRaises(usage.UsageError, stack.Options().parseOptions, [prefixed, "1"])


class ServerFaultTests(TestCase):
    """Whatever raises inside Spyne is a ``Server`` fault and one error line, no traceback."""

    def test_spyne_raising(self):
        class Broken(GuardedWsgiApplication):
            def handle_rpc(self, req_env, start_response):
                raise RuntimeError("boom\nsecond line")

        app = Broken(make_application(), max_content_length=65536)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        started = []
        environ = {
            "REQUEST_METHOD": "POST",
            "CONTENT_TYPE": "text/xml",
            "REMOTE_ADDR": "192.0.2.1",
            "SERVER_NAME": "h",
            "SERVER_PORT": "80",
            "PATH_INFO": "/",
            "QUERY_STRING": "",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(GET_TIME),
        }
        body = b"".join(app(environ, lambda status, headers: started.append(status)))
        self.assertEqual(started, ["500 Internal Server Error"])
        self.assertEqual(fault_code(body), "soap11env:Server")
        [line] = [formatEvent(e) for e in events if e.get("log_namespace") == "p2p.timews.fault"]
        self.assertEqual(
            line,
            "SOAP fault to 192.0.2.1 POST: 500 Server: "
            "internal error (RuntimeError: boom\\nsecond line)",
        )
        self.assertFalse([e for e in events if "log_failure" in e])


class TimeFaultTests(TestCase):
    """Malformed SOAP calls to a real ``twistd p2p-time``."""

    @defer.inlineCallbacks
    def setUp(self):
        self.proc, cwd = start_time_service(self)
        self.port = url_port((yield time_url(self.proc)))
        self.log = cwd / "t.log"
        self.answered = 0

    def post(self, body: bytes, content_type: bytes = UTF8, method: bytes = b"POST"):
        headers = [(b"Host", b"h"), (b"Content-Type", content_type), (b"Connection", b"close")]
        d = exchange(self.port, http_request(method, b"/", body, headers))
        return d.addCallback(split_responses)

    @defer.inlineCallbacks
    def good_call(self):
        """A good call, once its access line is in the log: all earlier lines are too."""
        [(status, _, _)] = yield self.post(GET_TIME)
        self.assertEqual(status, 200)
        self.answered += 1
        yield poll_until(
            lambda: sum('" 200 ' in line for line in log_lines(self.log)) == self.answered,
            what="the access line of a good call",
        )
        return len(log_lines(self.log))

    @defer.inlineCallbacks
    def test_entity_reference_gets_a_fault_and_one_line(self):
        before = yield self.good_call()
        [(status, headers, body)] = yield self.post(ENTITY_REFERENCE)
        self.assertEqual(status, 500)
        self.assertEqual(headers[b"content-type"], b"text/xml; charset=utf-8")
        self.assertEqual(fault_code(body), "soap11env:Client.DTDNotAllowed")
        after = yield self.good_call()
        lines = log_lines(self.log)
        [line] = lines[before : after - 1]
        self.assertIn(FAULT_LINE + "127.0.0.1 POST: 500 Client.DTDNotAllowed", line)
        self.assertLess(len(line), 200)
        self.assertNotIn("Traceback", "\n".join(lines))

    @defer.inlineCallbacks
    def test_every_malformed_call_gets_a_fault_and_one_line(self):
        self.assertLessEqual(len(MALFORMED) + 3, DEFAULT_BURST)  # so none is rate-limited
        before = yield self.good_call()
        for what, body, content_type, code in MALFORMED:
            [(status, _, answer)] = yield self.post(body, content_type)
            self.assertEqual((what, status), (what, 500), answer[:300])
            self.assertEqual((what, fault_code(answer)), (what, "soap11env:" + code))
        for method, status in ((b"PUT", 405), (b"DELETE", 405)):
            [(got, _, answer)] = yield self.post(GET_TIME, method=method)
            self.assertEqual(got, status)
            self.assertEqual(fault_code(answer), "soap11env:Client.MethodNotAllowed")
        too_long = yield exchange(
            self.port, http_request(body=b"<" * 70000, headers=[(b"Host", b"h")])
        )
        [(status, _, answer)] = split_responses(too_long)
        self.assertEqual((status, fault_code(answer)), (413, "soap11env:Client.RequestTooLong"))
        after = yield self.good_call()
        lines = log_lines(self.log)
        written = lines[before : after - 1]
        self.assertEqual(len(written), len(MALFORMED) + 3, "\n".join(written))
        for line in written:
            self.assertIn(FAULT_LINE, line)
            self.assertLess(len(line), 300)
        self.assertNotIn("Traceback", "\n".join(lines))


class FloodTests(TestCase):
    """Floods write a bounded log: a burst per period and summaries of the rest."""

    @defer.inlineCallbacks
    def test_bad_soap_flood(self):
        proc, cwd = start_time_service(self)
        port = url_port((yield time_url(proc)))
        request = http_request(
            body=ENTITY_REFERENCE, headers=[(b"Host", b"h"), (b"Connection", b"close")]
        )
        count = 300
        start = reactor.seconds()
        for _ in range(count // 20):
            yield defer.gatherResults([exchange(port, request) for _ in range(20)])
        elapsed = reactor.seconds() - start
        log = cwd / "t.log"
        passed = [line for line in log_lines(log) if FAULT_LINE in line]
        self.assertLessEqual(len(passed), budget(elapsed))
        # every bad call is either a line or counted in a summary
        yield poll_until(
            lambda: len(passed) + suppressed(log_lines(log)) == count,
            timeout=DEFAULT_PERIOD * 2,
            what="summaries accounting for every bad call",
        )
        self.assertNotIn("Traceback", log.read_text())

    @defer.inlineCallbacks
    def test_undecodable_datagram_flood_to_the_logger(self):
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        args = [*TWISTD, "-n", "--pidfile=", "--logfile=l.log", "p2p-logger", "--no-rpcbind"]
        args += ["--listen", "tcp:0:interface=127.0.0.1", "--listen", "udp:0:interface=127.0.0.1"]
        proc = spawn(self, args, cwd=cwd, name="p2p-logger")
        ports = yield logger_ports(proc)
        client = _Datagrams(ports["udp"])
        udp = reactor.listenUDP(0, client, interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        count = 0
        start = reactor.seconds()
        for batch in range(20):
            for n in range(100):
                # an XID, then a message type that is not CALL: dropped, one log line each
                client.transport.write(
                    rpc.pack_int(batch * 1000 + n) + b"\0\0\0\7garbage!", client.address
                )
                count += 1
            yield deadline(client.null_call(10**6 + batch))  # the logger read the batch
        elapsed = reactor.seconds() - start
        log = cwd / "l.log"
        passed = [line for line in log_lines(log) if "undecodable" in line]
        self.assertLessEqual(len(passed), budget(elapsed))
        yield poll_until(
            lambda: len(passed) + suppressed(log_lines(log)) == count,
            timeout=DEFAULT_PERIOD * 2,
            what="summaries accounting for every datagram",
        )


class _Datagrams(protocol.DatagramProtocol):
    """Sends datagrams to the logger; ``null_call`` fires when its NULL call is answered."""

    def __init__(self, port: int) -> None:
        self.address = ("127.0.0.1", port)
        self.waiting: dict[int, defer.Deferred] = {}

    def null_call(self, xid: int) -> defer.Deferred:
        call = rpc.Call(xid, wire.LOGGER_PROGRAM, wire.LOGGER_VERSION, wire.LOGGER_PROC_NULL)
        self.waiting[xid] = d = defer.Deferred()
        self.transport.write(rpc.encode_call(call), self.address)
        return d

    def datagramReceived(self, data: bytes, addr) -> None:
        d = self.waiting.pop(rpc.decode_reply(data).xid, None)
        if d is not None:
            d.callback(None)


class RotationTests(TestCase):
    """``--log-size`` and ``--log-files`` bound the log files of a real service."""

    @defer.inlineCallbacks
    def test_log_files_rotate_and_old_ones_are_deleted(self):
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        for n in range(1, 6):  # left by an earlier run that kept more
            (cwd / f"t.log.{n}").write_text(f"old {n}\n")
        args = [*TWISTD, "-n", "--pidfile=", "--logfile=t.log", "p2p-time"]
        args += ["--listen", "tcp:0:interface=127.0.0.1", "--log-size", "1000", "--log-files", "2"]
        proc = spawn(self, args, cwd=cwd, name="p2p-time")
        port = url_port((yield time_url(proc)))
        bad = http_request(body=b"<x", headers=[(b"Host", b"h"), (b"Connection", b"close")])
        good = http_request(body=GET_TIME, headers=[(b"Host", b"h"), (b"Connection", b"close")])
        for _ in range(DEFAULT_BURST):
            yield exchange(port, bad)
            yield exchange(port, good)
        # 40 lines of well over 100 bytes: the 1000-byte file rotated several times
        yield poll_until(
            lambda: sorted(p.name for p in cwd.glob("t.log*")) == ["t.log", "t.log.1", "t.log.2"],
            what="two rotated files, the older ones deleted",
        )
        for path in cwd.glob("t.log*"):
            self.assertNotIn("old", path.read_text())
            self.assertLess(path.stat().st_size, 1000 + 300)  # rotated before a line past the size
