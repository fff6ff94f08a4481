"""The shell's words: split a line as a shell does (quotes keep spaces), and quote
a name so it can be typed back.

Rules (protocol.md section 5): words are separated by blanks; ``"..."`` or
``'...'`` make one word of what they enclose, spaces included (quotes may join
other text: ``"my song".mp3`` is ``my song.mp3``); inside double quotes, and
outside quotes, a backslash takes the next character literally (``\\"``,
``\\\\``, ``\\ ``); inside single quotes nothing is special. A line with an
unclosed quote is an error.
"""

from __future__ import annotations

import unicodedata

#: Characters that make a name need quotes to be typed back as one word.
_SPECIAL = frozenset("\"'\\")


class UnclosedQuote(ValueError):
    """A quote opened and never closed."""


def split_words(line: str) -> list[str]:
    """``'GET_FILE bob "my song.mp3" x'`` -> ``['GET_FILE', 'bob', 'my song.mp3', 'x']``."""
    words: list[str] = []
    word: list[str] = []
    in_word = False
    quote: str | None = None
    chars = iter(line)
    for ch in chars:
        if quote == "'":
            if ch == "'":
                quote = None
            else:
                word.append(ch)
        elif quote == '"':
            if ch == '"':
                quote = None
            elif ch == "\\":
                word.append(next(chars, "\\"))
            else:
                word.append(ch)
        elif ch in "\"'":
            quote, in_word = ch, True
        elif ch == "\\":
            word.append(next(chars, "\\"))
            in_word = True
        elif ch.isspace():
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
        else:
            word.append(ch)
            in_word = True
    if quote is not None:
        raise UnclosedQuote(f"unclosed {quote}")
    if in_word:
        words.append("".join(word))
    return words


def word_spans(line: str) -> list[tuple[int, int]]:
    """Where each word of ``line`` starts and ends (its quotes included); a line
    ending inside a quote ends its last word at the end."""
    spans: list[tuple[int, int]] = []
    start: int | None = None
    quote: str | None = None
    i = 0
    while i < len(line):
        ch = line[i]
        if quote is not None:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                i += 1
        elif ch in "\"'":
            quote = ch
            start = i if start is None else start
        elif ch == "\\":
            start = i if start is None else start
            i += 1
        elif ch.isspace():
            if start is not None:
                spans.append((start, i))
                start = None
        elif start is None:
            start = i
        i += 1
    if start is not None:
        spans.append((start, len(line)))
    return spans


def _blank(ch: str) -> bool:
    """A space that splits words (control characters are not typed: no quotes for them)."""
    return ch.isspace() and unicodedata.category(ch) != "Cc"


def quote(name: str) -> str:
    """``name`` as one word of a command line: itself when it has no blank and
    nothing special, else in double quotes (``"``, ``\\`` escaped)."""
    plain = not name.startswith("#")  # a line whose first word starts with # is a comment
    if name and plain and not any(_blank(ch) or ch in _SPECIAL for ch in name):
        return name
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
