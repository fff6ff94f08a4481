"""Search semantics (protocol.md section 8.3) and their SQLite FTS5 form.

What a query means does not depend on the store: :func:`query_words` splits it
the way every store must (at each character that is not a letter, a digit or a
combining mark), and :class:`Hit` is what a store's ``search`` returns. The
rest is how the SQLite store implements it (its search database:
:mod:`p2p.indexer.searchindex`): an FTS5 index over the files' names and
descriptions, :func:`fts5_match`, which turns the words into an FTS5 query
that can hold no FTS5 syntax, and :func:`bm25`, the ranking of the candidates.
"""

from __future__ import annotations

import math
import re
import sys
import unicodedata
from dataclasses import dataclass

#: Unicode categories that belong to a word: letters, digits, combining marks.
_WORD_CATEGORIES = frozenset("LNM")
#: The most distinct words a query may hold: each is one more list to walk in step
#: with the others (80 common two-letter words took half a second over a million
#: files); a query with more gets SEARCH's error code.
MAX_QUERY_WORDS = 8
#: BM25 weights of the name and the description columns: a match in the name
#: counts ten times one in the description.
NAME_WEIGHT = 10.0
DESCRIPTION_WEIGHT = 1.0


@dataclass(frozen=True, slots=True)
class Hit:
    """One SEARCH hit: a connected owner's file and how many connected users have its bytes."""

    owner: str
    name: str
    description: str
    size: int | None
    sha256: str | None
    copies: int


def query_words(text: str) -> list[str]:
    """The words of a query: runs of letters, digits and combining marks, in NFC.

    Everything else separates words and means nothing else (quotes, ``*``,
    ``:``, ``-``, brackets). Case and accents stay: the index folds both.
    Repeated words count once.
    """
    words: list[str] = []
    current: list[str] = []
    for ch in unicodedata.normalize("NFC", text):
        if unicodedata.category(ch)[0] in _WORD_CATEGORIES:
            current.append(ch)
        elif current:
            words.append("".join(current))
            current = []
    if current:
        words.append("".join(current))
    return list(dict.fromkeys(words))


def fts5_match(words: list[str]) -> str:
    """An FTS5 MATCH expression: every word as a quoted prefix, all of them required.

    A quoted string is a plain phrase to FTS5 (``"`` inside is doubled, though
    :func:`query_words` never keeps one), so ``OR``, ``NEAR``, ``^`` or a
    column filter in a query are only words.
    """
    return " ".join('"{}"*'.format(word.replace('"', '""')) for word in words)


#: Fold a word as the index's tokenizer does (unicode61, remove_diacritics 2): drop the
#: combining marks of the canonical decomposition, then lower the case.
#: ``str.translate`` pays a raised and caught KeyError for each character its table
#: lacks (half of folding a name with an accent): so every code point below
#: :data:`_KEPT_BELOW` (the alphabets that carry marks) is in it, as itself when kept.
_KEPT_BELOW = 0x3000
_MARKS = {
    cp: None if unicodedata.category(chr(cp)) == "Mn" else cp
    for cp in range(sys.maxunicode + 1)
    if cp < _KEPT_BELOW or unicodedata.category(chr(cp)) == "Mn"
}
_TOKENS = re.compile(r"[^\W_]+").findall


def fold(text: str) -> str:
    """``text`` without accents and in lower case, as the index compares words."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFD", text).translate(_MARKS).lower()


def words_of(text: str) -> tuple[str, int]:
    """The folded words of ``text`` as the index holds them, each after a space (so
    ``" " + word`` occurs once per word it starts), and how many there are."""
    found = _TOKENS(fold(text))
    return " " + " ".join(found), len(found)


def bm25(
    words: list[str],
    idf: list[float],
    name: tuple[str, int],
    description: tuple[str, int],
    average_length: float,
) -> float:
    """The BM25 score of one file for the folded query ``words`` (higher is better).

    As FTS5's ``bm25()`` with the weights above (k1 1.2, b 0.75): a word's
    frequency is its weighted number of prefix matches in the name and in the
    description (as :func:`words_of` gives them), the document's length their
    number of words together.
    """
    (name_text, name_length), (description_text, description_length) = name, description
    norm = K1 * (1 - B + B * (name_length + description_length) / average_length)
    score = 0.0
    for word, weight in zip(words, idf, strict=True):
        start = " " + word
        frequency = NAME_WEIGHT * name_text.count(start)
        frequency += DESCRIPTION_WEIGHT * description_text.count(start)
        score += weight * frequency * (K1 + 1) / (frequency + norm)
    return score


def inverse_frequency(files: int, matching: int) -> float:
    """BM25's weight of a word found in ``matching`` of ``files`` files (at least 1e-6)."""
    return max(math.log((files - matching + 0.5) / (matching + 0.5)), 1e-6)


K1 = 1.2
B = 0.75

#: The full-text index of the search database (see :mod:`p2p.indexer.searchindex`), and
#: its prefix indexes: 1 to 3 characters answer short query words without merging every
#: term that starts with them.
FTS_TABLE = "files_fts"
PREFIXES = "1 2 3"
