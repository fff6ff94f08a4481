"""Look-alike user names are refused: no one can register a name that looks like another.

A zero-width space, a bidi override or a decomposed accent makes a name that
prints exactly like ``alice`` or ``zoë`` but is another name. The unit tests
check the rule; the end-to-end test sends such names as an attacker would, to
a real indexer, from 127.0.0.2, while a good client on 127.0.0.1 is served.
"""

from __future__ import annotations

import unicodedata

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from p2p import wire
from tests.support import deadline
from tests.test_indexer_e2e import DT, RawClient, start_indexer

#: Names that look like "alice" or "zoë" on a screen, and are not.
LOOK_ALIKES = [
    "al\u200bice",  # zero-width space
    "ali\u200dce",  # zero-width joiner
    "\u2066alice\u2069",  # bidi isolate
    "\u202eecila",  # right-to-left override: shows as "alice"
    "alice\ufeff",  # zero-width no-break space (BOM)
    "al\u00adice",  # soft hyphen
    unicodedata.normalize("NFD", "zoë"),  # e + combining diaeresis
]


class UserNameRuleTests(TestCase):
    def test_look_alikes_are_not_user_names(self):
        for name in LOOK_ALIKES:
            self.assertFalse(wire.check_user(name), repr(name))
            self.assertRaises(wire.BadField, wire.decode_field, name.encode(), wire.FieldKind.USER)

    def test_ordinary_names_in_any_script_are(self):
        for name in ("alice", "zoë", "ñandú", "Дмитрий", "李雷", "O'Brien", "a-b_c.d"):
            self.assertTrue(wire.check_user(name), name)
            self.assertEqual(wire.decode_field(name.encode(), wire.FieldKind.USER), name)

    def test_file_names_keep_their_rule(self):
        # A file name may hold a joiner (emoji sequences) or decomposed text.
        name = "family\U0001f468\u200d\U0001f469.png"
        self.assertEqual(wire.decode_field(name.encode(), wire.FieldKind.NAME), name)

    def test_every_operation_checks_its_user_field(self):
        for op in wire.OPS.values():
            self.assertIs(op.fields[1], wire.FieldKind.USER, op.name)


class LookAlikeAttackTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.ix = yield start_indexer(self)
        self.assertEqual((yield self.ix.codes(("REGISTER", "alice"), ("REGISTER", "zoë"))), [0, 0])
        self.assertEqual((yield self.ix.codes(("CONNECT", "alice", 5000))), [0])

    @defer.inlineCallbacks
    def attacker(self, op: str, user: str, *args):
        client = RawClient()
        endpoint = TCP4ClientEndpoint(
            reactor, "127.0.0.1", self.ix.port, bindAddress=("127.0.0.2", 0)
        )
        yield connectProtocol(endpoint, client)
        client.transport.write(wire.encode_request(op, DT, user, *args))
        reply = yield deadline(client.closed)
        return reply

    @defer.inlineCallbacks
    def test_look_alike_register_and_connect_are_refused(self):
        users_before = yield self.ix.request("LIST_USERS", "alice")
        for name in LOOK_ALIKES:
            reply = yield self.attacker("REGISTER", name)
            self.assertEqual(reply, bytes([wire.REGISTER.error]), repr(name))
            reply = yield self.attacker("CONNECT", name, 6000)
            self.assertEqual(reply, bytes([wire.CONNECT.error]), repr(name))
            # The good client is served meanwhile, and nothing changed.
            self.assertEqual((yield self.ix.request("LIST_USERS", "alice")), users_before)
        # None of them exists: registering them in NFC / without the invisible
        # characters gives "name in use" for the real users, not a new account.
        self.assertEqual((yield self.ix.codes(("REGISTER", "alice"), ("REGISTER", "zoë"))), [1, 1])
