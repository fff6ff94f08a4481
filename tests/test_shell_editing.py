"""Line editing at the prompt, in a pseudo-terminal: the readline keys (Ctrl-A, E,
K, U, W, L), Tab completion of commands, user names and file names from the last
listings, and a history that survives restarts ($P2P_HOME/history).

Completion units (no terminal) check which names a word gets.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from p2p.client.completion import Completer, common_prefix
from p2p.client.history import History
from tests.support import deadline
from tests.test_client_tty import PROMPT, TerminalCase

LEFT = b"\x1b[D"
UP = b"\x1b[A"


class KeyTests(TerminalCase):
    def requests(self, op: bytes) -> list[list[bytes]]:
        """The fields after the time of each ``op`` request the indexer got."""
        return [r.split(b"\0")[2:-1] for r in self.indexer.requests if r.startswith(op + b"\0")]

    @defer.inlineCallbacks
    def test_readline_keys(self):
        # Ctrl-A to the start, Ctrl-E to the end.
        yield self.type_keys(b"GISTER al\x01RE\x05ice\r", "c> REGISTER OK")
        # Ctrl-W drops the word before the cursor.
        yield self.type_keys(b"REGISTER bob junk\x17\r", "c> REGISTER OK", 2)
        # Ctrl-K drops from the cursor to the end.
        yield self.type_keys(b"REGISTER carolXYZ" + LEFT * 3 + b"\x0b\r", "c> REGISTER OK", 3)
        # Ctrl-U drops from the start to the cursor.
        yield self.type_keys(b"junk REGISTER dave" + LEFT * 13 + b"\x15\r", "c> REGISTER OK", 4)
        names = [fields[0] for fields in self.requests(b"REGISTER")]
        self.assertEqual(names, [b"alice", b"bob", b"carol", b"dave"])

    @defer.inlineCallbacks
    def test_ctrl_l_redraws_on_a_clear_screen(self):
        yield self.type_keys(b"REGISTER alice\r", "c> REGISTER OK")
        yield self.type_keys(b"REGIS\x0c", "\x1b[H\x1b[2J" + PROMPT.decode() + "REGIS")
        yield self.type_keys(b"TER bob\r", "c> REGISTER OK", 2)
        self.assertEqual([f[0] for f in self.requests(b"REGISTER")], [b"alice", b"bob"])

    @defer.inlineCallbacks
    def test_tab_completes_commands_users_and_files(self):
        self.slow_peer()
        self.indexer.users["slow"]["files"] = {"my song.mp3": "a song", "f.bin": "bytes"}
        yield self.type_keys(b"reg\talice\r", "c> REGISTER OK")
        yield self.type_keys(b"CONNECT alice\r", "c> CONNECT OK")
        yield self.type_keys(b"LIST_U\t\r", "c> LIST_USERS OK")
        # A user name of the last LIST_USERS.
        yield self.type_keys(b"LIST_CONTENT sl\t\r", "c> LIST_CONTENT OK")
        self.assertEqual(self.requests(b"LIST_CONTENT")[-1][1:], [b"slow"])
        # A file name of the last LIST_CONTENT, quoted because it holds a space.
        yield self.type_keys(b"GET_FILE sl\tmy\t", 'GET_FILE slow "my song.mp3" ')
        # Several candidates: what they share; nothing more to add: they are listed.
        yield self.type_keys(b"\x15LIST_\t", "c> LIST_")
        yield self.type_keys(b"\t", "LIST_CONTENT  LIST_USERS")
        self.assertFalse(self.proc.exited)


class HistoryTests(TerminalCase):
    @defer.inlineCallbacks
    def test_history_survives_a_restart(self):
        yield self.type_keys(b"REGISTER alice\r", "c> REGISTER OK")
        yield self.type_keys(b"REGISTER bob\r", "c> REGISTER OK", 2)
        self.proc.write(b"\x04")
        yield deadline(self.proc.ended)
        self.assertEqual((self.home / "history").read_bytes(), b"REGISTER alice\nREGISTER bob\n")
        self.assertEqual((self.home / "history").stat().st_mode & 0o777, 0o600)
        self.start_shell()
        # Up twice: the first line of the last session, run again.
        yield self.type_keys(UP + UP + b"\r", "c> USERNAME IN USE")
        registered = [r.split(b"\0")[2] for r in self.indexer.requests if r.startswith(b"REG")]
        self.assertEqual(registered, [b"alice", b"bob", b"alice"])


class CompletionTests(TestCase):
    def completer(self) -> Completer:
        c = Completer()
        for line in (
            "c> LIST_USERS OK",
            "\talice 127.0.0.1 1",
            "\tal bert 127.0.0.1 2",  # not a name we can tell: its first word is taken
            "c> LIST_CONTENT OK",
            '\t"my song.mp3" 12 "a song"',
            '\tmy.txt - "x"',
            "c> REGISTER OK",
            "\tnot a listing row",
        ):
            c.seen(line)
        return c

    def test_what_each_word_completes_to(self):
        c = self.completer()
        self.assertEqual(c.complete("g"), (0, ["GET_FILE"]))
        self.assertEqual(c.complete("LIST"), (0, ["LIST_CONTENT", "LIST_USERS"]))
        self.assertEqual(c.complete("GET_FILE a"), (9, ["al", "alice"]))
        self.assertEqual(c.complete("GET_FILE alice m"), (15, ['"my song.mp3"', "my.txt"]))
        self.assertEqual(c.complete('GET_FILE alice "my s'), (15, ['"my song.mp3"']))
        self.assertEqual(c.complete("GET_FILE alice my.txt "), (22, []))  # the local name
        self.assertEqual(c.complete("DELETE "), (7, ['"my song.mp3"', "my.txt"]))
        self.assertEqual(c.complete("PUBLISH f.txt a"), (14, []))  # a description
        self.assertEqual(c.complete("NOPE a"), (5, []))

    def test_a_new_listing_replaces_the_names(self):
        c = self.completer()
        c.seen("c> LIST_USERS OK")
        c.seen("\tzoe 10.0.0.1 3")
        self.assertEqual(c.complete("CONNECT "), (8, ["zoe"]))
        c.seen("c> SEARCH OK")
        c.seen('\tbob "x y.txt" 3 "desc" (2 users have it)')
        self.assertEqual(c.complete("CONNECT "), (8, ["bob", "zoe"]))
        self.assertEqual(c.complete("GET_FILE bob x"), (13, ['"x y.txt"']))

    def test_common_prefix(self):
        self.assertEqual(common_prefix(['"my song"', '"my sofa"']), '"my so')
        self.assertEqual(common_prefix([]), "")


class HistoryFileTests(TestCase):
    def test_cut_back_to_the_limit(self):
        history = History(self.mktemp(), limit=3)
        for n in range(7):
            history.add(b"LINE %d" % n)
        history.add(b"   ")
        self.assertEqual(history.load(), [b"LINE 4", b"LINE 5", b"LINE 6"])

    def test_an_unwritable_file_costs_only_the_history(self):
        notes: list[str] = []
        blocker = Path(self.mktemp())
        blocker.write_bytes(b"a file where the home's directory should be")
        history = History(blocker / "history", notes.append)
        history.add(b"REGISTER a")
        history.add(b"REGISTER b")
        self.assertEqual(len(notes), 1)
