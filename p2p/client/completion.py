"""Tab completion at the prompt: command names, user names and file names.

User and file names come from the last listings the shell printed
(``LIST_USERS``, ``LIST_CONTENT``, ``SEARCH``): :meth:`Completer.seen` reads
every result line as it is printed, so nothing is asked of the indexer to
complete. Which kind of name a word is comes from the command's parameters
(``<user>``, ``<remote file>``...). Completed names are quoted when they hold
blanks (:func:`p2p.client.words.quote`).
"""

from __future__ import annotations

from p2p.client.commands import COMMANDS
from p2p.client.words import quote, split_words, word_spans

#: Parameters completed with the user names of the last LIST_USERS (or SEARCH).
USER_PARAMS = frozenset({"user"})
#: Parameters completed with the file names of the last LIST_CONTENT (or SEARCH).
FILE_PARAMS = frozenset({"remote file", "file"})


class Completer:
    """Completions of the word before the cursor, from the last listings seen."""

    def __init__(self) -> None:
        # Ordered sets (dicts): a listing of many thousand rows is remembered in
        # linear time, on the reactor.
        self.users: dict[str, None] = {}
        self.files: dict[str, None] = {}
        self._listing: str | None = None  # the listing whose rows are being printed

    def seen(self, line: str) -> None:
        """A result line was printed: remember the names of listing rows."""
        if line.startswith("\t") and self._listing is not None:
            fields = [_unquoted(line[start:end]) for start, end in word_spans(line)[:2]]
            if self._listing == "users" and fields:
                _add(self.users, fields[0])
            elif self._listing == "files" and fields:
                _add(self.files, fields[0])
            elif self._listing == "search" and len(fields) >= 2:
                _add(self.users, fields[0])
                _add(self.files, fields[1])
            return
        self._listing = {
            "c> LIST_USERS OK": "users",
            "c> LIST_CONTENT OK": "files",
            "c> SEARCH OK": "search",
        }.get(line)
        if self._listing == "users":
            self.users = {}
        elif self._listing == "files":
            self.files = {}

    def complete(self, before: str) -> tuple[int, list[str]]:
        """For the text before the cursor: where the word being completed starts,
        and the candidates to replace it with (already quoted), sorted."""
        spans = word_spans(before)
        if spans and spans[-1][1] == len(before):
            start = spans[-1][0]
            spans = spans[:-1]
        else:
            start = len(before)
        # Options (--force) take no parameter's place.
        index = sum(1 for a, b in spans[1:] if not before[a:b].startswith("--")) + bool(spans)
        prefix = _unquoted(before[start:])
        if index == 0:
            found = [name for name in COMMANDS if name.startswith(prefix.upper())]
            return start, sorted(found)
        spec = COMMANDS.get(before[spans[0][0] : spans[0][1]].upper())
        if spec is None or index > len(spec.params):
            return start, []
        param = spec.params[index - 1]
        names = self.users if param in USER_PARAMS else self.files if param in FILE_PARAMS else []
        return start, sorted(quote(name) for name in names if name.startswith(prefix))


def common_prefix(candidates: list[str]) -> str:
    """What all ``candidates`` start with."""
    if not candidates:
        return ""
    first, last = min(candidates), max(candidates)
    size = 0
    while size < len(first) and first[size] == last[size]:
        size += 1
    return first[:size]


def _unquoted(word: str) -> str:
    """A word being typed, as it reads so far (an open quote counts as closed)."""
    for closing in ("", '"', "'"):
        try:
            return "".join(split_words(word + closing))
        except ValueError:
            continue
    return word


def _add(names: dict[str, None], name: str) -> None:
    names.setdefault(name, None)
