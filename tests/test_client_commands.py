"""The shell's line parser: command names, argument counts, usage lines."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.client import commands
from p2p.client.commands import Parsed, ParseError, parse


class ParseTests(TestCase):
    def test_every_command_with_its_arguments(self) -> None:
        cases = {
            "REGISTER alice": Parsed("REGISTER", ("alice",)),
            "UNREGISTER alice": Parsed("UNREGISTER", ("alice",)),
            "CONNECT alice": Parsed("CONNECT", ("alice",)),
            "PUBLISH a.txt some text": Parsed("PUBLISH", ("a.txt", "some text")),
            "DELETE a.txt": Parsed("DELETE", ("a.txt",)),
            "LIST_USERS": Parsed("LIST_USERS", ()),
            "LIST_CONTENT bob": Parsed("LIST_CONTENT", ("bob",)),
            "DISCONNECT alice": Parsed("DISCONNECT", ("alice",)),
            "GET_FILE bob r.bin l.bin": Parsed("GET_FILE", ("bob", "r.bin", "l.bin", "")),
            "GET_FILE bob r.bin": Parsed("GET_FILE", ("bob", "r.bin", "", "")),
            "GET_FILE --force bob r l": Parsed("GET_FILE", ("bob", "r", "l", "--force")),
            "HELP": Parsed("HELP", ()),
            "QUIT": Parsed("QUIT", ()),
        }
        for line, expected in cases.items():
            self.assertEqual(parse(line), expected, line)

    def test_command_names_are_case_insensitive_arguments_are_not(self) -> None:
        self.assertEqual(parse("register Alice"), Parsed("REGISTER", ("Alice",)))
        self.assertEqual(parse("List_Users"), Parsed("LIST_USERS", ()))
        self.assertEqual(parse("  qUiT  "), Parsed("QUIT", ()))

    def test_description_keeps_its_inner_spacing(self) -> None:
        parsed = parse("publish  f.txt   two  spaces here  ")
        self.assertEqual(parsed, Parsed("PUBLISH", ("f.txt", "two  spaces here")))

    def test_wrong_argument_counts_print_the_usage(self) -> None:
        cases = {
            "REGISTER": "Syntax error. Usage: REGISTER <user>",
            "register a b": "Syntax error. Usage: REGISTER <user>",
            "CONNECT": "Syntax error. Usage: CONNECT <user>",
            "PUBLISH f.txt": "Syntax error. Usage: PUBLISH <file> <description>",
            "PUBLISH": "Syntax error. Usage: PUBLISH <file> <description>",
            "DELETE": "Syntax error. Usage: DELETE <file>",
            "LIST_USERS x": "Syntax error. Usage: LIST_USERS",
            "LIST_CONTENT": "Syntax error. Usage: LIST_CONTENT <user>",
            "DISCONNECT a b": "Syntax error. Usage: DISCONNECT <user>",
            "GET_FILE bob": (
                "Syntax error. Usage: GET_FILE [--force] <user> <remote file> [<local file>]"
            ),
            "GET_FILE bob r l x": (
                "Syntax error. Usage: GET_FILE [--force] <user> <remote file> [<local file>]"
            ),
            "QUIT now": "Syntax error. Usage: QUIT",
            "UNREGISTER": "Syntax error. Usage: UNREGISTER <user>",
        }
        for line, message in cases.items():
            with self.assertRaises(ParseError, msg=line) as caught:
                parse(line)
            self.assertEqual(str(caught.exception), message)

    def test_unknown_command(self) -> None:
        with self.assertRaises(ParseError) as caught:
            parse("FROBNICATE x")
        self.assertIn("Unknown command: FROBNICATE", str(caught.exception))
        self.assertIn("HELP", str(caught.exception))

    def test_blank_lines_and_comments_are_skipped(self) -> None:
        for line in ("", "   ", "\t", "# a comment", "  #REGISTER x"):
            self.assertIsNone(parse(line), repr(line))

    def test_help_lists_every_command(self) -> None:
        text = "\n".join(commands.help_text())
        for name in commands.COMMANDS:
            self.assertIn(name, text)


class FieldProblemTests(TestCase):
    def test_valid_values(self) -> None:
        self.assertIsNone(commands.field_problem("alice"))
        self.assertIsNone(commands.field_problem("ñandú"))
        self.assertIsNone(commands.field_problem("x" * wire.MAX_NAME))
        self.assertIsNone(commands.field_problem("two words", wire.FieldKind.TEXT))

    def test_values_the_protocol_cannot_carry(self) -> None:
        self.assertIsNotNone(commands.field_problem("x" * (wire.MAX_NAME + 1)))
        self.assertIsNotNone(commands.field_problem("ñ" * 129))  # 258 bytes
        self.assertIsNotNone(commands.field_problem("bell\x07"))
        self.assertIsNotNone(commands.field_problem("bad\udcff"))  # invalid UTF-8 input
        self.assertIsNotNone(commands.field_problem("d" * 257, wire.FieldKind.TEXT))
