"""The GET_FILE command: find the owner's peer, fetch the file, print the outcome.

The owner's address and key fingerprint come from LIST_PEERS (extension);
from a classic indexer, which does not know it, the address comes from
LIST_USERS and every owner counts as unclaimed. An owner with a fingerprint
is downloaded from over TLS, and a peer holding another key is refused (the
address was hijacked, or the owner moved and someone else took the port);
an unclaimed owner (``-``) is downloaded from in plaintext, as classic peers
speak. What the owner published of the file (size and SHA-256, from
``LIST_FILES``, protocol.md section 8) is handed to the download, which checks
the bytes against it before renaming them into place; a file published
without them (a classic owner or indexer) is downloaded unverified, and stderr
says so. The download itself is ``p2p.peer.download`` (or whatever the shell
was given), drawing a progress bar when stdout is a terminal. The
destination is checked before anyone is asked anything. A running download
can be cancelled (QUIT, Ctrl-C, SIGTERM).

Every download is resumable (protocol.md 2.6): what arrived stays hidden beside
the destination when it stops short, and the next GET_FILE of the same content
continues it (stderr: ``resuming <file> at <N> bytes``). For a file published
with a hash, the other connected owners of that content (``SOURCES``; their
addresses and keys from LIST_PEERS) are handed to the download, which then
takes pieces from all of them at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from p2p import wire
from p2p.client import results
from p2p.client.commands import field_problem
from p2p.client.indexer_client import UnknownOperation, ask_sources
from p2p.client.progress import ProgressBar
from p2p.client.session import Session, reason
from p2p.peer.download import ContentMismatch, Expected, Source
from p2p.tls import FingerprintMismatch, is_fingerprint


class GetFile:
    """GET_FILE for one shell.

    ``download(host, port, name, destination, progress=..., reactor=...,
    timeout=...)`` fetches a file and fails with ``no_such_file`` when the
    peer answers that the file does not exist.
    """

    def __init__(
        self,
        session: Session,
        download: Callable[..., Deferred],
        no_such_file: type[BaseException],
        timeout: float,
    ) -> None:
        self.session = session
        self.output = session.output
        self.download = download
        self.no_such_file = no_such_file
        self.timeout = timeout
        self._current: Deferred | None = None

    def cancel(self) -> None:
        """Drop the running download, if any (its command prints GET_FILE FAIL)."""
        if self._current is not None:
            self._current.cancel()

    def _fail(self, why: str) -> None:
        self.output.line(results.GET_FILE_FAIL)
        self.output.note(f"GET_FILE: {why}")

    @defer.inlineCallbacks
    def __call__(self, owner: str, remote: str, local: str):
        user = self.session.user
        if user is None:
            self._fail("no user is connected in this shell (CONNECT first)")
            return
        for value, kind in ((owner, wire.FieldKind.NAME), (remote, wire.FieldKind.FILE)):
            problem = field_problem(value, kind)
            if problem:
                self._fail(problem)
                return
        try:
            destination = local_destination(remote, local)
        except ValueError as exc:
            self._fail(str(exc))
            return
        peers = yield self._peers(user)
        address = self._find_peer(peers, owner)
        if address is None:
            self.output.line(results.GET_FILE_FAIL)
            return
        host, port, fingerprint = address
        expected = yield self._published(user, owner, remote)
        sources = []
        if expected is not None and expected.size:
            sources = yield self._other_sources(user, owner, expected.sha256, peers)
        bar = _LazyProgress(self.output.progress_stream(), f"{remote} from {owner}")
        # Only a claimed owner's download is TLS, only a published hash is checked;
        # a fake download need not know the keywords.
        checked: dict[str, Any] = {}
        if fingerprint is not None:
            checked["expected_fingerprint"] = fingerprint
        if expected is not None:
            checked["expected"] = expected
        if sources:
            checked["sources"] = sources
        # What was received stays beside the destination if the download stops short,
        # and the next GET_FILE of the same content continues it (and says so).
        checked.update(resume=True, owner=owner, notice=self.output.note)
        self._current = self.download(
            host,
            port,
            remote,
            destination,
            progress=bar.update,
            reactor=self.session.reactor,
            timeout=self.timeout,
            **checked,
        )
        try:
            yield self._current
        except self.no_such_file:
            bar.finish()
            self.output.line(results.GET_FILE_NO_FILE)
            changed = (
                " (or its copy changed since it was published and is being published "
                "again: try again shortly)"
                if expected is not None
                else ""
            )
            self.output.note(f"GET_FILE: {owner} has no file {remote} to share{changed}")
            return
        except Exception as exc:
            if isinstance(exc, defer.CancelledError):  # the user (CANCEL, QUIT) said so
                bar.finish()
                self.output.line(results.GET_FILE_FAIL)
                return
            if isinstance(exc, ContentMismatch):
                bar.finish()
                self._fail(f"what {owner} sent is not what {owner} published: {reason(exc)}")
                return
            if _wrong_key(exc):
                bar.finish()
                self._fail(
                    f"the peer at {host}:{port} is not {owner} (its key differs from the one "
                    f"the indexer lists for {owner}); nothing was kept"
                )
                return
            bar.finish()
            self._fail(f"download from {host}:{port} failed: {reason(exc)}")
            return
        finally:
            self._current = None
        bar.finish()
        self.output.line(results.GET_FILE_OK)
        if expected is None:
            self.output.note(
                f"GET_FILE: {owner} published no SHA-256 of {remote} (a classic client or "
                "indexer): what arrived is unverified"
            )

    @defer.inlineCallbacks
    def _published(self, user: str, owner: str, remote: str):
        """What ``owner`` published of ``remote`` (``LIST_FILES``): an :class:`Expected`
        with its SHA-256, or None when none was published or cannot be known."""
        try:
            code, rows = yield self.session.indexer.request("LIST_FILES", user, owner)
        except UnknownOperation:
            return None
        except Exception as exc:
            self.output.note(f"GET_FILE: LIST_FILES could not be asked: {reason(exc)}")
            return None
        if code != wire.OK or rows is None:
            return None
        for name, _description, size, sha256 in rows:
            if name == remote and field_problem(sha256, wire.FieldKind.SHA256) is None:
                known = field_problem(size, wire.FieldKind.SIZE) is None
                return Expected(int(size) if known else None, sha256)
        return None

    @defer.inlineCallbacks
    def _peers(self, user: str):
        """``{name: (host, port, fingerprint or None)}`` of the connected users (names
        listed with a bad address map to None), or None if they cannot be known.

        LIST_PEERS, or LIST_USERS from a classic indexer (no fingerprints there).
        """
        indexer = self.session.indexer
        op = "LIST_USERS" if getattr(indexer, "classic", False) else "LIST_PEERS"
        try:
            try:
                code, rows = yield indexer.request(op, user)
            except UnknownOperation:
                op = "LIST_USERS"
                code, rows = yield indexer.request(op, user)
        except Exception as exc:
            self.output.note(f"GET_FILE: the indexer could not be asked: {reason(exc)}")
            return None
        if code != wire.OK or rows is None:
            self.output.note(f"GET_FILE: {op} was refused (code {code})")
            return None
        peers: dict[str, tuple[str, int, str | None] | str | None] = {}
        for name, ip, port, *claim in rows:
            if name in peers:
                continue
            if not wire.is_decimal(port) or not 0 < int(port) < 65536:
                peers[name] = "a bad port"
                continue
            fingerprint = claim[0] if claim else wire.UNCLAIMED
            if fingerprint == wire.UNCLAIMED:
                peers[name] = (ip, int(port), None)
            elif not is_fingerprint(fingerprint):
                peers[name] = "a bad key fingerprint"
            else:
                peers[name] = (ip, int(port), fingerprint)
        return peers

    def _find_peer(self, peers: dict | None, owner: str):
        """``(host, port, fingerprint or None)`` where ``owner`` serves files; None
        (said on stderr) if unknown."""
        if peers is None:
            return None
        found = peers.get(owner)
        if found is None:
            self.output.note(f"GET_FILE: {owner} is not connected")
        elif isinstance(found, str):
            self.output.note(f"GET_FILE: the indexer lists {found} for {owner}")
            return None
        return found

    @defer.inlineCallbacks
    def _other_sources(self, user: str, owner: str, sha256: str, peers: dict):
        """The other connected owners of the content ``sha256`` (extension ``SOURCES``),
        as :class:`Source` s with the address and key LIST_PEERS gave; none when the
        indexer cannot say (a classic one: the named owner only)."""
        try:
            rows = yield ask_sources(self.session.indexer, user, sha256)
        except UnknownOperation:  # a classic indexer: the named owner only
            return []
        except Exception as exc:
            self.output.note(f"GET_FILE: SOURCES could not be asked ({reason(exc)}): {owner} only")
            return []
        found = []
        for row in rows:
            # The key (and address) LIST_PEERS lists for that owner: a peer is always
            # checked against the key the indexer binds to its name.
            address = peers.get(row.owner)
            if row.owner == owner or not isinstance(address, tuple):
                continue
            if field_problem(row.name, wire.FieldKind.FILE) is None:
                host, port, fingerprint = address
                found.append(Source(row.owner, row.name, host, port, fingerprint))
        return found


def _wrong_key(exc: BaseException) -> bool:
    """Whether a download failed because the peer's key is not the owner's."""
    return isinstance(exc, FingerprintMismatch) or isinstance(
        getattr(exc, "mismatch", None), FingerprintMismatch
    )


def local_destination(remote: str, local: str) -> Path:
    """Where GET_FILE writes: ``local``, or inside it under the remote name if it is
    a directory (as ``cp`` does). ``~`` is expanded. Raises ValueError with the
    reason when the file cannot go there, before anyone is asked anything."""
    if "\0" in local:  # (pathlib answers "not a directory" for it; open() would raise)
        raise ValueError(f"cannot save {local!r}: a file name cannot hold a NUL character")
    path = Path(local).expanduser()
    if path.is_dir():
        name = PurePosixPath(remote).name
        if name in ("", ".", ".."):
            raise ValueError(f"{local} is a directory; give a file name for {remote!r}")
        path = path / name
        if path.is_dir():
            raise ValueError(f"{path} is a directory")
    parent = path.parent
    if not parent.is_dir():
        why = f"{parent} is not a directory" if parent.exists() else f"no such directory {parent}"
        raise ValueError(f"cannot save {local}: {why}")
    return path


class _LazyProgress:
    """A progress bar created at the first update, when the total is known."""

    def __init__(self, stream: Any | None, label: str) -> None:
        self.stream = stream
        self.label = label
        self.bar: ProgressBar | None = None

    def update(self, received: int, total: int | None = None) -> None:
        if self.stream is None:
            return
        if self.bar is None:
            columns = getattr(self.stream, "columns", None)
            self.bar = ProgressBar(self.stream, total, self.label, columns=columns)
        self.bar.update(received, total)

    def finish(self) -> None:
        if self.bar is not None:
            bar, self.bar = self.bar, None
            bar.finish()
