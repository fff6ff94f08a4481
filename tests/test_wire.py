"""The shared framing, limits and codes of p2p.wire."""

from twisted.trial.unittest import TestCase

from p2p import wire


class FramingTests(TestCase):
    def test_encode_fields(self):
        self.assertEqual(wire.encode_fields("REGISTER", 9090, b"x"), b"REGISTER\x009090\x00x\x00")

    def test_encode_rejects_nul(self):
        self.assertRaises(ValueError, wire.encode_field, "a\0b")

    def test_reader_splits_across_chunks(self):
        reader = wire.FieldReader(limit=10)
        self.assertEqual(reader.feed(b"AB"), [])
        self.assertEqual(reader.feed(b"C\x00D"), [b"ABC"])
        self.assertEqual(reader.feed(b"\x00\x00"), [b"D", b""])

    def test_reader_bounds_unterminated_tail(self):
        reader = wire.FieldReader(limit=4)
        reader.feed(b"abcd")
        self.assertRaises(wire.FieldTooLong, reader.feed, b"e")

    def test_decode_fields_needs_final_nul(self):
        self.assertEqual(wire.decode_fields(b"a\x00b\x00"), [b"a", b"b"])
        self.assertRaises(ValueError, wire.decode_fields, b"a\x00b")


class ValidationTests(TestCase):
    def test_name_limits(self):
        self.assertEqual(wire.decode_field(b"a" * 256, wire.FieldKind.NAME), "a" * 256)
        for bad in (b"", b"a" * 257, b"a b", b"a\tb", b"\xff", b"a\x01"):
            self.assertRaises(wire.BadField, wire.decode_field, bad, wire.FieldKind.NAME)

    def test_utf8_name(self):
        self.assertEqual(wire.decode_field("ñandú".encode(), wire.FieldKind.NAME), "ñandú")

    def test_text_allows_spaces(self):
        self.assertEqual(wire.decode_field(b"a b", wire.FieldKind.TEXT), "a b")
        self.assertRaises(wire.BadField, wire.decode_field, b"a" * 257, wire.FieldKind.TEXT)

    def test_port(self):
        self.assertEqual(wire.decode_field(b"9090", wire.FieldKind.PORT), 9090)
        for bad in (b"0", b"65536", b"-1", b"80a", b"123456", b""):
            self.assertRaises(wire.BadField, wire.decode_field, bad, wire.FieldKind.PORT)


class SearchFieldTests(TestCase):
    """The fields of section 8: size, sha256, mode, words, limit."""

    def test_size(self):
        decode = wire.decode_field
        self.assertEqual(decode(b"0", wire.FieldKind.SIZE), 0)
        self.assertEqual(decode(b"9223372036854775807", wire.FieldKind.SIZE), 2**63 - 1)
        for bad in (
            b"",
            b"9223372036854775808",
            b"-1",
            b"+1",
            b" 1",
            b"1.0",
            b"\xd9\xa3",
            b"1" * 21,
        ):
            self.assertRaises(wire.BadField, decode, bad, wire.FieldKind.SIZE)

    def test_sha256(self):
        good = b"0123456789abcdef" * 4
        self.assertEqual(wire.decode_field(good, wire.FieldKind.SHA256), good.decode())
        for bad in (good.upper(), good[:-1], good + b"0", b"g" * 64, b"-", b""):
            self.assertRaises(wire.BadField, wire.decode_field, bad, wire.FieldKind.SHA256)

    def test_mode(self):
        self.assertEqual(wire.decode_field(b"new", wire.FieldKind.MODE), "new")
        self.assertEqual(wire.decode_field(b"replace", wire.FieldKind.MODE), "replace")
        for bad in (b"NEW", b"", b"add", b"new ", b"\xff"):
            self.assertRaises(wire.BadField, wire.decode_field, bad, wire.FieldKind.MODE)

    def test_words_and_limit(self):
        self.assertEqual(
            wire.decode_field("cancio\u0301n cuna".encode(), wire.FieldKind.WORDS),
            "cancio\u0301n cuna",
        )
        for bad in (b"", b"a\nb", b"a" * 257, b"\xff"):
            self.assertRaises(wire.BadField, wire.decode_field, bad, wire.FieldKind.WORDS)
        self.assertEqual(wire.decode_field(b"1000", wire.FieldKind.LIMIT), 1000)
        for bad in (b"0", b"1001", b"-5", b"", b"01000", b"abc"):
            self.assertRaises(wire.BadField, wire.decode_field, bad, wire.FieldKind.LIMIT)


class CodesTests(TestCase):
    def test_code_table(self):
        expected = {
            "REGISTER": (0, 1, 2),
            "UNREGISTER": (0, 1, 2),
            "CONNECT": (0, 1, 2, 3),
            "DISCONNECT": (0, 1, 2, 3),
            "PUBLISH": (0, 1, 2, 3, 4),
            "DELETE": (0, 1, 2, 3, 4),
            "LIST_USERS": (0, 1, 2, 3),
            "LIST_CONTENT": (0, 1, 2, 3, 4),
        }
        self.assertEqual({name: op.codes for name, op in wire.CLASSIC_OPS.items()}, expected)
        # The extensions: LIST_PEERS answers exactly as LIST_USERS does.
        self.assertEqual(
            set(wire.OPS) - set(wire.CLASSIC_OPS),
            {"LIST_PEERS", "ALIVE", "HOLD", "PUBLISH_FILE", "LIST_FILES", "SEARCH", "SOURCES"},
        )
        self.assertEqual(wire.LIST_PEERS.codes, expected["LIST_USERS"])
        self.assertEqual(wire.ALIVE.codes, expected["DISCONNECT"])
        # Section 8: PUBLISH_FILE and LIST_FILES answer as PUBLISH and LIST_CONTENT.
        self.assertEqual(wire.PUBLISH_FILE.codes, expected["PUBLISH"])
        self.assertEqual(wire.PUBLISH_FILE.error, wire.PUBLISH.error)
        self.assertEqual(wire.LIST_FILES.codes, expected["LIST_CONTENT"])
        self.assertEqual(wire.SEARCH.codes, (0, 1, 2, 3))
        self.assertEqual(wire.SEARCH.error, 3)
        self.assertLessEqual({"LIST_FILES", "SEARCH", "SOURCES"}, wire.READ_OPS)
        # SOURCES answers as SEARCH (same shape and checks), its one argument a hash.
        self.assertEqual(wire.SOURCES.codes, wire.SEARCH.codes)
        self.assertEqual(wire.SOURCES.error, 3)
        self.assertEqual(wire.SOURCES.args, (wire.FieldKind.SHA256,))

    def test_piece_size(self):
        """1 MiB pieces, doubled while a file would have more than 16384 of them."""
        mib = 1024 * 1024
        for size, piece, count in (
            (0, mib, 0),
            (1, mib, 1),
            (mib, mib, 1),
            (mib + 1, mib, 2),
            (16384 * mib, mib, 16384),
            (16384 * mib + 1, 2 * mib, 8193),
            (32768 * mib, 2 * mib, 16384),
            (32768 * mib + 1, 4 * mib, 8193),
            (wire.MAX_FILE_SIZE, 2**63 // 16384, 16384),
        ):
            with self.subTest(size=size):
                self.assertEqual(wire.piece_size(size), piece)
                self.assertEqual(wire.piece_count(size), count)
                self.assertLessEqual(wire.piece_count(size), wire.MAX_PIECES)
        self.assertNotIn("PUBLISH_FILE", wire.READ_OPS)

    def test_audit_record(self):
        self.assertEqual(
            wire.audit_record("ana", "PUBLISH", "01/02/2026 10:00:00", "f.txt"),
            "ana PUBLISH f.txt 01/02/2026 10:00:00",
        )
        self.assertEqual(
            wire.audit_record("ana", "LIST_CONTENT", "01/02/2026 10:00:00", "bob"),
            "ana LIST_CONTENT 01/02/2026 10:00:00",
        )


class LocalHostTests(TestCase):
    def test_wildcards_become_loopback(self):
        self.assertEqual(wire.local_host("0.0.0.0"), "127.0.0.1")
        self.assertEqual(wire.local_host("::"), "::1")
        self.assertEqual(wire.local_host(""), "127.0.0.1")
        self.assertEqual(wire.local_host("", unspecified="::1"), "::1")
        self.assertEqual(wire.local_host("10.0.0.5"), "10.0.0.5")


class FileNameTests(TestCase):
    """File names may hold spaces (protocol.md section 1); user names may not."""

    def test_spaces_yes_control_characters_no(self):
        for name in ("my song.mp3", " lead", "trail ", "a  b", "名 前", "x\u00a0y", "f" * 256):
            self.assertEqual(wire.decode_field(name.encode(), wire.FieldKind.FILE), name)
        for bad in (b"", b"f" * 257, b"a\tb", b"a\nb", b"\x7f", "a\x85".encode(), b"\xff"):
            self.assertRaises(wire.BadField, wire.decode_field, bad, wire.FieldKind.FILE)
        # 256 bytes, not characters.
        self.assertRaises(wire.BadField, wire.decode_field, "é".encode() * 129, wire.FieldKind.FILE)

    def test_user_names_and_owners_keep_their_rule(self):
        for kind in (wire.FieldKind.USER, wire.FieldKind.NAME):
            self.assertRaises(wire.BadField, wire.decode_field, b"my song", kind)

    def test_which_fields_are_file_names(self):
        files = {op for op, spec in wire.OPS.items() if wire.FieldKind.FILE in spec.args}
        self.assertEqual(files, {"PUBLISH", "DELETE", "PUBLISH_FILE"})
        for op in ("LIST_CONTENT", "LIST_FILES"):
            self.assertEqual(wire.OPS[op].args, (wire.FieldKind.NAME,))


class FileNamesAtTheIndexerTests(TestCase):
    """The indexer publishes, lists and deletes a file name with spaces."""

    def test_publish_list_delete(self):
        from tests.test_indexer_protocol import Harness

        h = Harness(self)
        self.assertEqual(h.request("REGISTER", "alice"), b"\0")
        self.assertEqual(h.request("CONNECT", "alice", 5000), b"\0")
        self.assertEqual(h.request("PUBLISH", "alice", "my song.mp3", "a song"), b"\0")
        self.assertEqual(h.request("PUBLISH", "alice", "bad\tname", "x"), b"\4")
        self.assertEqual(
            h.request("LIST_CONTENT", "alice", "alice"), b"\0" + b"1\0my song.mp3\0a song\0"
        )
        self.assertEqual(h.request("LIST_CONTENT", "alice", "my song"), b"\4")  # an owner: no
        self.assertEqual(h.request("DELETE", "alice", "my song.mp3"), b"\0")


class DecimalTests(TestCase):
    """wire.is_decimal: what a number field may hold before int() reads it."""

    def test_plain_ascii_digits_only(self):
        self.assertTrue(wire.is_decimal("0"))
        self.assertTrue(wire.is_decimal("9090"))
        for text in ("", "²", "٣", "\uff11\uff12", "-1", " 1", "1.0", "0x1"):
            self.assertFalse(wire.is_decimal(text), text)
