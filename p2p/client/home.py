"""The client's own state on this machine: ``$P2P_HOME`` (default ``~/.config/p2p``).

Three things live there, each written atomically (a crash leaves the old file
or the new one) and readable by the owner only:

- ``identities/<user>.pem``: one file per user this client registered, a first
  line ``user: <name>`` then the private key and certificate in PEM
  (:class:`p2p.tls.Identity`). Whoever holds the file *is* that user for the
  indexer, so it is mode 0600 and never leaves the machine unless exported.
- ``known_indexers``: ``<host>:<port> <fingerprint>`` lines, like SSH's
  known_hosts: the key each indexer had when first met (or as pinned with
  ``--indexer-fingerprint``).
- ``published/<user>.json``: for each share directory, the names this client
  published from it, each with what it told the indexer of it (description,
  size, SHA-256 and the file's stamp then; nothing after a classic PUBLISH).
  The peer server serves a file only if it is listed here, and only while it
  is still what was published: what the indexer lists never decides what is
  served.
- ``content_hashes.json``: sizes and SHA-256 of files by path and stamp
  (:mod:`p2p.client.content`), so republishing an unchanged file is instant.

File names are percent-quoted user names (only lowercase ASCII letters, digits,
``-`` and ``_`` kept, so names differing only in case stay apart on a
case-insensitive file system), hashed when too long for a file name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2p.client.content import Claim
from p2p.tls import Identity, is_fingerprint, write_private

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
#: Longest quoted stem kept as it is; longer names are hashed (file names stop at 255 bytes).
_MAX_STEM = 150
_USER_LINE = "user: "


class HomeError(Exception):
    """The local state cannot be read or changed as asked (the message says why)."""


class IdentityExists(HomeError):
    """Another identity is already kept for that user."""


def default_home() -> Path:
    """``$P2P_HOME``, else ``~/.config/p2p``."""
    configured = os.environ.get("P2P_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".config" / "p2p"


def file_stem(user: str) -> str:
    """A file name for ``user``: percent-quoted UTF-8, or a hash when that is too long."""
    quoted = "".join(
        chr(b) if chr(b) in _SAFE else f"%{b:02X}" for b in user.encode("utf-8", "surrogatepass")
    )
    if len(quoted) <= _MAX_STEM:
        return quoted
    return "#" + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()


def indexer_key(host: str, port: int) -> str:
    """How an indexer is named in ``known_indexers``: ``host:port`` (``[v6]:port``)."""
    host = host.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Home:
    """The state directory of one client (see the module docstring).

    Nothing touches the disk until something is read or written, so a Home
    that is never used leaves no trace.
    """

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_home()
        self._cache: dict[Path, tuple[tuple[int, int, int], Any]] = {}

    # --- paths ---------------------------------------------------------------

    @property
    def known_indexers_file(self) -> Path:
        return self.path / "known_indexers"

    def identity_file(self, user: str) -> Path:
        return self.path / "identities" / f"{file_stem(user)}.pem"

    def published_file(self, user: str) -> Path:
        return self.path / "published" / f"{file_stem(user)}.json"

    @property
    def content_cache_file(self) -> Path:
        return self.path / "content_hashes.json"

    @property
    def pieces_dir(self) -> Path:
        """Piece digests of published content, one file per SHA-256 (PIECES)."""
        return self.path / "pieces"

    def _write(self, path: Path, data: bytes) -> None:
        """Atomic, owner-only; the home itself made 0700 when missing."""
        if not self.path.is_dir():
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(path, data)
        self._cache.pop(path, None)

    def _read(self, path: Path, parse: Callable[[bytes], Any], missing: Any) -> Any:
        """``parse`` of the file's bytes, remembered until the file changes."""
        try:
            st = path.stat()
        except FileNotFoundError:
            self._cache.pop(path, None)
            return missing
        # Every write is a new file renamed in place: a new inode, whatever the clock says.
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        value = parse(path.read_bytes())
        self._cache[path] = (stamp, value)
        return value

    # --- identities ------------------------------------------------------------

    def identity(self, user: str) -> Identity | None:
        """The identity kept for ``user``, or None. HomeError if its file is damaged."""
        path = self.identity_file(user)

        def parse(data: bytes) -> Identity:
            owner, identity = read_identity(data, path)
            if owner != user:
                raise HomeError(f"{path} holds the identity of {owner!r}, not of {user!r}")
            return identity

        return self._read(path, parse, None)

    def create_identity(self, user: str, identity: Identity | None = None) -> Identity:
        """Keep ``identity`` (a new one if None) as ``user``'s; it replaces any other."""
        if identity is None:
            identity = Identity.generate()
        self._write(self.identity_file(user), identity_bytes(user, identity))
        return identity

    def forget_identity(self, user: str) -> None:
        """Delete ``user``'s identity (nothing if there is none)."""
        path = self.identity_file(user)
        path.unlink(missing_ok=True)
        self._cache.pop(path, None)

    def export_identity(self, user: str, destination: Path | str) -> Path:
        """Write ``user``'s identity to ``destination`` (mode 0600; it holds the private key).

        HomeError if there is no identity for ``user`` or ``destination`` exists.
        """
        identity = self.identity(user)
        if identity is None:
            raise HomeError(f"no identity for {user!r} in {self.path / 'identities'}")
        destination = Path(destination).expanduser()
        if destination.exists():
            raise HomeError(f"{destination} exists; choose a new file name")
        write_private(destination, identity_bytes(user, identity))
        return destination

    def import_identity(self, source: Path | str, replace: bool = False) -> str:
        """Keep the identity exported to ``source``; returns its user name.

        IdentityExists if another identity is kept for that user, unless ``replace``.
        """
        source = Path(source).expanduser()
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise HomeError(f"cannot read {source}: {exc.strerror or exc}") from exc
        user, identity = read_identity(data, source)
        current = self.identity(user)
        if current is not None and current.fingerprint != identity.fingerprint and not replace:
            raise IdentityExists(
                f"another identity is kept for {user!r} in {self.identity_file(user)} "
                f"(key {current.fingerprint}); importing would lose it"
            )
        self.create_identity(user, identity)
        return user

    # --- known indexers --------------------------------------------------------

    def _known(self) -> dict[str, str]:
        def parse(data: bytes) -> dict[str, str]:
            known = {}
            for line in data.decode("utf-8", "replace").splitlines():
                words = line.split()
                if len(words) == 2 and not line.startswith("#") and is_fingerprint(words[1]):
                    known[words[0]] = words[1]
            return known

        return self._read(self.known_indexers_file, parse, {})

    def pinned_indexer(self, host: str, port: int) -> str | None:
        """The fingerprint pinned for the indexer at ``host:port``, or None."""
        return self._known().get(indexer_key(host, port))

    def pin_indexer(self, host: str, port: int, fingerprint: str) -> None:
        """Pin ``fingerprint`` for ``host:port``, replacing its line if there is one."""
        if not is_fingerprint(fingerprint):
            raise ValueError(f"not a key fingerprint: {fingerprint!r}")
        key = indexer_key(host, port)
        path = self.known_indexers_file
        old = path.read_text("utf-8", "replace").splitlines() if path.exists() else []
        lines = [line for line in old if line.split()[:1] != [key]]
        lines.append(f"{key} {fingerprint}")
        self._write(path, ("\n".join(lines) + "\n").encode("utf-8"))

    # --- what was published from here ------------------------------------------

    def _published_all(self, user: str) -> dict[str, dict[str, Claim | None]]:
        def parse(data: bytes) -> dict[str, dict[str, Claim | None]]:
            try:
                raw = json.loads(data)
                record = {}
                for directory, names in raw.items():
                    if isinstance(names, list):  # as written before claims were kept
                        names = dict.fromkeys(names)
                    record[str(directory)] = {
                        str(n): Claim.from_json(c) if c is not None else None
                        for n, c in names.items()
                    }
            except (ValueError, AttributeError) as exc:
                raise HomeError(f"{self.published_file(user)} is damaged: {exc}") from exc
            return record

        return self._read(self.published_file(user), parse, {})

    def published(self, user: str, share_dir: Path | str) -> frozenset[str]:
        """The names ``user`` published from ``share_dir`` with this client."""
        return frozenset(self._published_all(user).get(_share_key(share_dir), {}))

    def claim(self, user: str, share_dir: Path | str, name: str) -> Claim | None:
        """What ``user`` told the indexer of ``name`` from ``share_dir`` (None: not
        published from here, or published without size and hash)."""
        return self._published_all(user).get(_share_key(share_dir), {}).get(name)

    def _change_published(
        self,
        user: str,
        share_dir: Path | str | None,
        change: Callable[[dict[str, Claim | None]], None],
    ) -> None:
        record = {d: dict(names) for d, names in self._published_all(user).items()}
        dirs = list(record) if share_dir is None else [_share_key(share_dir)]
        for directory in dirs:
            change(record.setdefault(directory, {}))
        out = {
            d: {n: (c.to_json() if c is not None else None) for n, c in sorted(names.items())}
            for d, names in record.items()
            if names
        }
        path = self.published_file(user)
        if out:
            self._write(path, json.dumps(out, indent=1, sort_keys=True).encode("utf-8"))
        else:
            path.unlink(missing_ok=True)
            self._cache.pop(path, None)

    def add_published(
        self, user: str, share_dir: Path | str, name: str, claim: Claim | None = None
    ) -> None:
        """Record ``name`` as published from ``share_dir``, with what the indexer was
        told of it (None: no size and hash), replacing what was recorded."""
        self._change_published(user, share_dir, lambda names: names.__setitem__(name, claim))

    def remove_published(self, user: str, share_dir: Path | str, name: str) -> None:
        self._change_published(user, share_dir, lambda names: names.pop(name, None))

    def clear_published(self, user: str, share_dir: Path | str | None = None) -> None:
        """Forget what ``user`` published from ``share_dir`` (None: from everywhere)."""
        self._change_published(user, share_dir, dict.clear)


def _share_key(share_dir: Path | str) -> str:
    return str(Path(share_dir).expanduser().resolve())


def identity_bytes(user: str, identity: Identity) -> bytes:
    """An identity file: ``user: <name>``, then the key and certificate in PEM."""
    return f"{_USER_LINE}{user}\n".encode() + identity.to_pem()


def read_identity(data: bytes, where: Path | str) -> tuple[str, Identity]:
    """The user and identity of an identity file; HomeError naming ``where`` if it is not one."""
    first, _, _rest = data.partition(b"\n")
    text = first.decode("utf-8", "replace").rstrip("\r")
    if not text.startswith(_USER_LINE) or not text[len(_USER_LINE) :]:
        raise HomeError(f"{where} is not a p2p identity file (no 'user: <name>' first line)")
    try:
        identity = Identity.from_pem(data)
    except ValueError as exc:
        raise HomeError(f"{where}: {exc}") from exc
    return text[len(_USER_LINE) :], identity
