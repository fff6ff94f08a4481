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
        self.assertEqual(set(wire.OPS) - set(wire.CLASSIC_OPS), {"LIST_PEERS", "ALIVE"})
        self.assertEqual(wire.LIST_PEERS.codes, expected["LIST_USERS"])
        self.assertEqual(wire.ALIVE.codes, expected["DISCONNECT"])

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
