"""The commands that ask the indexer: REGISTER, UNREGISTER, CONNECT, DISCONNECT,
PUBLISH, DELETE, LIST_USERS, LIST_CONTENT, SEARCH.

PUBLISH sends the file's size and SHA-256 (``PUBLISH_FILE``, computed off the
reactor and cached), LIST_CONTENT asks ``LIST_FILES`` to show sizes; against an
indexer that does not know them (a classic one) they fall back to ``PUBLISH``
and ``LIST_CONTENT`` (protocol.md 8.4), and SEARCH fails with a note.

Each checks its arguments locally (a name the protocol cannot carry, no
connected user), asks the indexer, prints the outcome line of
:mod:`p2p.client.results` and updates the :class:`~p2p.client.session.Session`
and the client's home: REGISTER claims the name with the user's identity (made
on the spot, kept only if the indexer registered it over TLS), UNREGISTER
forgets it, PUBLISH and DELETE keep the record of what the peer server may
serve. Each returns a Deferred that fires when its lines are printed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from p2p import wire
from p2p.client import results
from p2p.client.commands import field_problem
from p2p.client.content import Claim
from p2p.client.hash_progress import HashProgress
from p2p.client.indexer_client import IndexerKeyChanged, UnknownOperation
from p2p.client.session import Session, quietly, reason
from p2p.tls import Identity


class IndexerCommands:
    """The indexer commands of one shell, over its session."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.output = session.output
        #: Extension operations already said (on stderr) to be unknown to the indexer.
        self._noted: set[str] = set()

    def table(self) -> dict[str, Callable[..., Deferred]]:
        """Command name -> what runs it, for the shell's dispatch."""
        return {
            "REGISTER": self.register,
            "UNREGISTER": self.unregister,
            "CONNECT": self.connect,
            "PUBLISH": self.publish,
            "DELETE": self.delete,
            "LIST_USERS": self.list_users,
            "LIST_CONTENT": self.list_content,
            "SEARCH": self.search,
            "DISCONNECT": self.disconnect,
        }

    # --- helpers --------------------------------------------------------------

    @defer.inlineCallbacks
    def _ask(self, op: str, user: str, *args: str | int, command: str | None = None, **how: Any):
        """Ask the indexer; print the outcome line of ``command`` (default ``op``);
        fire with ``(code, rows)``.

        ``code`` is None when the indexer could not be asked or answered badly.
        ``UnknownOperation`` (an extension the indexer does not know) is raised,
        nothing printed: the caller falls back. ``how`` goes to the indexer
        client (``identity=``).
        """
        command = command or op
        try:
            code, rows = yield self.session.indexer.request(op, user, *args, **how)
        except IndexerKeyChanged:
            self.output.line(results.fail_line(command))  # the client has said why, and the fix
            return None, None
        except UnknownOperation:
            if op in wire.CLASSIC_OPS:
                raise AssertionError(f"{op} is classic") from None
            raise
        except Exception as exc:
            self.output.line(results.fail_line(command))
            self.output.note(f"{command}: the indexer could not be asked: {reason(exc)}")
            return None, None
        self.output.line(results.outcome_line(command, code))
        if code not in results.OUTCOMES[command][0]:
            hint = results.HINTS.get(command, "")
            self.output.note(f"{command}: the indexer refused the request (code {code}){hint}")
        return code, rows

    def _classic_note(self, op: str, consequence: str) -> None:
        """Say once per shell that the indexer does not know ``op``, and what follows."""
        if op not in self._noted:
            self._noted.add(op)
            where = getattr(self.session.indexer, "where", "the indexer")
            self.output.note(f"note: the indexer at {where} does not know {op}: {consequence}")

    def _refused(self, op: str, value: str, kind: wire.FieldKind = wire.FieldKind.NAME) -> bool:
        """Print the plain FAIL line if ``value`` cannot travel as a ``kind``; True if so."""
        problem = field_problem(value, kind)
        if problem:
            self.output.line(results.fail_line(op))
            self.output.note(f"{op}: {problem}")
        return problem is not None

    def _home(self, op: str, change: Callable[[], Any]) -> Any:
        """Run ``change`` on the home; if it fails, say so (the command's line is printed)."""
        try:
            return change()
        except Exception as exc:
            self.output.note(f"{op}: cannot update {self.session.home.path}: {reason(exc)}")
            return None

    def _need_user(self, op: str) -> str | None:
        """The connected user; without one, print ``op``'s NOT CONNECTED line."""
        user = self.session.user
        if user is None:
            self.output.line(results.not_connected_line(op))
            self.output.note(f"{op}: no user is connected in this shell (CONNECT first)")
        return user

    # --- commands -------------------------------------------------------------

    @defer.inlineCallbacks
    def register(self, user: str):
        """Register ``user``, claiming it with its identity (kept, or new).

        A new identity is kept only if the indexer registered the name over
        TLS: only then does the name belong to it. Against a classic indexer
        nothing is kept. When the outcome is unknown (no reply) it is kept too:
        the indexer may have registered the name with it, and a name claimed by
        a lost key is lost; kept, it is simply used by the next REGISTER.
        """
        if self._refused("REGISTER", user):
            return
        home = self.session.home
        try:
            kept = home.identity(user)
        except Exception as exc:
            self.output.line(results.fail_line("REGISTER"))
            self.output.note(f"REGISTER: {reason(exc)}")
            return
        identity = kept if kept is not None else Identity.generate()
        code, _rows = yield self._ask("REGISTER", user, identity=identity)
        if kept is not None or code not in (wire.OK, None):
            return
        if getattr(self.session.indexer, "classic", True):
            return
        if self._home("REGISTER", lambda: home.create_identity(user, identity)):
            how = "is claimed by" if code == wire.OK else "may have been claimed by"
            self.output.note(
                f"REGISTER: {user} {how} the key {identity.fingerprint}, kept in "
                f"{home.identity_file(user)}: whoever holds that file is {user} for the "
                "indexer (p2p-client --export-identity moves it to another machine)"
            )

    @defer.inlineCallbacks
    def unregister(self, user: str):
        if self._refused("UNREGISTER", user):
            return
        code, _rows = yield self._ask("UNREGISTER", user)
        if code == wire.OK:
            home = self.session.home

            def forget() -> bool:
                home.forget_identity(user)
                home.clear_published(user)
                return True

            self._home("UNREGISTER", forget)

    @defer.inlineCallbacks
    def connect(self, user: str):
        """Start the peer server first, then tell the indexer its port."""
        session = self.session
        if self._refused("CONNECT", user):
            return
        if session.user is not None:
            if user == session.user:
                self.output.line(results.outcome_line("CONNECT", wire.CONNECT.own))
            else:
                self.output.line(results.fail_line("CONNECT"))
            self.output.note(f"CONNECT: this shell is already connected as {session.user}")
            return
        try:
            identity = session.home.identity(user)
        except Exception as exc:
            self.output.line(results.fail_line("CONNECT"))
            self.output.note(f"CONNECT: {reason(exc)}")
            return
        wanted = {
            "identity": identity,
            "is_current": session.is_current,
            "pieces": session,
        }
        extra = {k: v for k, v in wanted.items() if _takes(session.server_factory, k)}
        server = session.server_factory(
            session.share_dir, session.is_published, reactor=session.reactor, **extra
        )
        try:
            port = yield server.listen(session.peer_listen)
        except Exception as exc:
            self.output.line(results.fail_line("CONNECT"))
            self.output.note(f"CONNECT: cannot listen on {session.peer_listen}: {reason(exc)}")
            return
        code, _rows = yield self._ask("CONNECT", user, port)
        if code != wire.OK:
            if code == wire.CONNECT.own:
                self.output.note(
                    f"CONNECT: the indexer lists {user} as connected from another client that "
                    "still runs (its peer answers): QUIT it there first (a client that was "
                    "killed is let go at once, or within the indexer's --peer-timeout)"
                )
            yield quietly(server.stop())
            return
        self.output.note(f"serving {session.share_dir} to peers on port {port}")
        session.go_online(user, server, port)

    @defer.inlineCallbacks
    def disconnect(self, user: str):
        session = self.session
        if self._refused("DISCONNECT", user):
            return
        if session.user is None:
            self.output.line(results.not_connected_line("DISCONNECT"))
            self.output.note("DISCONNECT: no user is connected in this shell")
            return
        if user != session.user:
            self.output.note(f"DISCONNECT: note that this shell is connected as {session.user}")
        own = user == session.user
        if own:
            session.hold_lease()  # a renewal answered "not connected" now would be our own doing
        code, _rows = yield self._ask("DISCONNECT", user)
        spec = wire.DISCONNECT
        if own and code in (wire.OK, spec.no_user, spec.not_connected):
            # The indexer no longer lists us: stop serving.
            yield session.go_offline()
        elif own:
            session.renew_lease()  # still connected: keep it listed

    @defer.inlineCallbacks
    def publish(self, name: str, description: str):
        """PUBLISH_FILE with the file's size and SHA-256 (classic PUBLISH when it cannot
        be read, or the indexer does not know PUBLISH_FILE)."""
        user = self._need_user("PUBLISH")
        if user is None or self._refused("PUBLISH", name, wire.FieldKind.FILE):
            return
        if self._refused("PUBLISH", description, wire.FieldKind.TEXT):
            return
        session = self.session
        path = self._shared_file(name)
        found = None
        if path is not None and "PUBLISH_FILE" not in self._noted:
            try:
                found = yield self._identify(path, name)
            except OSError as exc:
                self.output.note(
                    f"PUBLISH: cannot read {name} ({reason(exc)}): published without its "
                    "size and SHA-256, so downloads of it cannot be verified"
                )
        code = None
        if found is not None:
            try:
                code, _rows = yield self._ask(
                    "PUBLISH_FILE",
                    user,
                    name,
                    description,
                    found.size,
                    found.sha256,
                    "new",
                    command="PUBLISH",
                )
            except UnknownOperation:
                self._classic_note(
                    "PUBLISH_FILE",
                    "files are published without size and SHA-256 (classic PUBLISH), "
                    "so downloads of them cannot be verified",
                )
                found = None
        if found is None:
            code, _rows = yield self._ask("PUBLISH", user, name, description)
        if code == wire.OK:
            claim = Claim(description, found) if found is not None else None
            self._home(
                "PUBLISH", lambda: session.home.add_published(user, session.share_dir, name, claim)
            )
        elif code == wire.PUBLISH.own:  # published before: keep what was recorded of it

            def keep() -> None:
                if name not in session.home.published(user, session.share_dir):
                    session.home.add_published(user, session.share_dir, name)

            self._home("PUBLISH", keep)

    def _identify(self, path: Path, name: str) -> Deferred:
        """The file's size and SHA-256, read in a thread; a long read shows its progress
        (:mod:`p2p.client.hash_progress`)."""
        session = self.session
        try:
            size = path.stat().st_size
        except OSError:
            size = 0
        shown = HashProgress(self.output, name, size, session.reactor)
        return session.content.identify(path, progress=shown.read).addBoth(shown.end)

    def _shared_file(self, name: str) -> Path | None:
        """The file ``name`` names in the share directory; None, with a warning, if
        it is outside it or is not a regular file (yet)."""
        root = self.session.share_dir.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root) or path == root:
            self.output.note(
                f"PUBLISH: warning: {name} is not inside the share directory {root}; "
                "peers asking for it will be refused"
            )
        elif not path.is_file():
            self.output.note(
                f"PUBLISH: warning: there is no file {name} in the share directory {root} (yet)"
            )
        else:
            return path
        return None

    @defer.inlineCallbacks
    def delete(self, name: str):
        user = self._need_user("DELETE")
        if user is None or self._refused("DELETE", name, wire.FieldKind.FILE):
            return
        code, _rows = yield self._ask("DELETE", user, name)
        if code in (wire.OK, wire.DELETE.own):
            session = self.session
            self._home(
                "DELETE", lambda: session.home.remove_published(user, session.share_dir, name)
            )

    @defer.inlineCallbacks
    def list_users(self):
        user = self._need_user("LIST_USERS")
        if user is None:
            return
        code, rows = yield self._ask("LIST_USERS", user)
        if code == wire.OK:
            for name, ip, port in rows:
                self.output.line(results.user_row(name, ip, port))

    @defer.inlineCallbacks
    def list_content(self, owner: str):
        """LIST_FILES, to show sizes; LIST_CONTENT (sizes ``-``) if the indexer does not know it."""
        user = self._need_user("LIST_CONTENT")
        if user is None or self._refused("LIST_CONTENT", owner):
            return
        try:
            code, rows = yield self._ask("LIST_FILES", user, owner, command="LIST_CONTENT")
        except UnknownOperation:
            self._classic_note("LIST_FILES", "listings show no sizes")
            code, rows = yield self._ask("LIST_CONTENT", user, owner)
            rows = [(name, text, wire.UNKNOWN, wire.UNKNOWN) for name, text in rows or ()]
        if code == wire.OK:
            for name, description, size, _sha256 in rows:
                self.output.line(results.content_row(name, size, description))

    @defer.inlineCallbacks
    def search(self, limit: str, words: str):
        """SEARCH: the hits, best first; ``c> SEARCH FAIL`` from an indexer without it."""
        user = self._need_user("SEARCH")
        if user is None or self._refused("SEARCH", words, wire.FieldKind.WORDS):
            return
        try:
            code, rows = yield self._ask("SEARCH", user, words, limit)
        except UnknownOperation:
            self.output.line(results.fail_line("SEARCH"))
            where = getattr(self.session.indexer, "where", "the indexer")
            self.output.note(f"SEARCH: the indexer at {where} does not support search")
            return
        if code == wire.OK:
            for owner, name, description, size, _sha256, copies in rows:
                self.output.line(results.search_row(owner, name, size, description, copies))


def _takes(factory: Callable[..., Any], keyword: str) -> bool:
    """Whether ``factory`` accepts the keyword argument ``keyword``."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind is p.VAR_KEYWORD
        or (p.name == keyword and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in params
    )
