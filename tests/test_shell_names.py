"""Names with spaces: quotes in the shell, listings that print names so they can be
copied back, and the whole way through a real indexer and a real peer.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from p2p.client import commands, results
from p2p.client.commands import Parsed, ParseError, parse
from p2p.client.words import quote, split_words
from tests.test_client_e2e import Stack


class ParseTests(TestCase):
    def test_quotes_keep_spaces(self):
        self.assertEqual(
            parse('PUBLISH "my song.mp3" a song  I wrote '),
            Parsed("PUBLISH", ("my song.mp3", "a song  I wrote")),
        )
        self.assertEqual(
            parse("GET_FILE alice \"my song.mp3\" 'copy of it.mp3'"),
            Parsed("GET_FILE", ("alice", "my song.mp3", "copy of it.mp3", "")),
        )
        self.assertEqual(parse(r"DELETE my\ song.mp3"), Parsed("DELETE", ("my song.mp3",)))
        self.assertEqual(parse('DELETE "say \\"hi\\".txt"'), Parsed("DELETE", ('say "hi".txt',)))
        self.assertEqual(parse('DELETE "my "song.mp3'), Parsed("DELETE", ("my song.mp3",)))

    def test_a_description_is_the_rest_of_the_line_as_typed(self):
        self.assertEqual(
            parse('PUBLISH f.txt it\'s "mine"'), Parsed("PUBLISH", ("f.txt", 'it\'s "mine"'))
        )

    def test_unclosed_quotes_and_comments(self):
        for line in ('DELETE "my song.mp3', "GET_FILE alice 'x y", 'PUBLISH "a b desc'):
            with self.assertRaises(ParseError) as caught:
                parse(line)
            self.assertTrue(str(caught.exception).startswith("Syntax error. Usage: "), line)
        self.assertIsNone(parse("# it's a comment"))
        with self.assertRaises(ParseError):
            parse('DELETE "a b" c')  # two words

    def test_every_listed_name_reads_back_as_itself(self):
        names = ["my song.mp3", "plain", 'say "hi"', "back\\slash", "it's", "#hash", "名 前"]
        for name in names:
            self.assertEqual(split_words(quote(name)), [name], name)
            row = results.content_row(name, "3", "d")
            self.assertEqual(parse(f"DELETE {row.split(' 3 ')[0].strip()}").args, (name,))
        self.assertEqual(results.user_row("al ice", "1.2.3.4", "5"), '\t"al ice" 1.2.3.4 5')
        self.assertEqual(results.content_row("a.txt", "1", "d"), '\ta.txt 1 "d"')

    def test_help_still_lists_every_command(self):
        listed = [line.split()[0] for line in commands.help_text()]
        self.assertEqual(listed, list(commands.COMMANDS))


class EndToEndTests(TestCase):
    @defer.inlineCallbacks
    def test_publish_list_get_and_delete_a_name_with_spaces(self):
        stack = Stack(self)
        yield stack.start_indexer()
        share = Path(self.mktemp())
        share.mkdir()
        song = b"la la la " * 1000
        (share / "my song.mp3").write_bytes(song)
        a = stack.shell("alice", share=share)
        b = stack.shell("bob")
        for shell, user in ((a, "alice"), (b, "bob")):
            yield shell.check(f"REGISTER {user}", "c> REGISTER OK")
            yield shell.check(f"CONNECT {user}", "c> CONNECT OK")
        yield a.check('PUBLISH "my song.mp3" a song I wrote', "c> PUBLISH OK")
        listing = yield b.run("LIST_CONTENT alice", 2)
        self.assertEqual(
            listing, ["c> LIST_CONTENT OK", f'\t"my song.mp3" {len(song)} "a song I wrote"']
        )
        yield b.check('GET_FILE alice "my song.mp3" "copy of it.mp3"', "c> GET_FILE OK")
        self.assertEqual((b.cwd / "copy of it.mp3").read_bytes(), song)
        # The name as listed, copied back into a command.
        copied = listing[1].split(f" {len(song)} ")[0].strip()
        yield b.check(f"GET_FILE alice {copied} again.mp3", "c> GET_FILE OK")
        self.assertEqual((b.cwd / "again.mp3").read_bytes(), song)
        yield a.check('DELETE "my song.mp3', "Syntax error. Usage: DELETE <file>")
        yield a.check('DELETE "my song.mp3"', "c> DELETE OK")
        yield b.check("LIST_CONTENT alice", "c> LIST_CONTENT OK")
        yield a.quit()
        yield b.quit()
