"""The lines the shell prints on stdout: protocol.md section 5, per command and reply code.

Pure data and formatting, no I/O: other tools match these lines byte for byte,
so they are written in one place. Explanations for humans are not here; they
go to stderr as notes.
"""

from __future__ import annotations

from p2p import wire
from p2p.client.words import quote


def _outcomes(op: str, fail: str, **by_role: str) -> tuple[dict[int, str], str]:
    """Map an operation's reply codes to its lines, by the role of each code in OPS."""
    spec = wire.OPS[op]
    table = {wire.OK: f"c> {op} OK"}
    for role, text in by_role.items():
        code = getattr(spec, role)
        assert code is not None, (op, role)
        table[code] = f"c> {text}"
    return table, f"c> {fail}"


#: For every indexer operation: code -> line, and the plain FAIL line.
OUTCOMES: dict[str, tuple[dict[int, str], str]] = {
    "REGISTER": _outcomes("REGISTER", "REGISTER FAIL", own="USERNAME IN USE"),
    "UNREGISTER": _outcomes("UNREGISTER", "UNREGISTER FAIL", no_user="USER DOES NOT EXIST"),
    "CONNECT": _outcomes(
        "CONNECT",
        "CONNECT FAIL",
        no_user="CONNECT FAIL, USER DOES NOT EXIST",
        own="USER ALREADY CONNECTED",
    ),
    "PUBLISH": _outcomes(
        "PUBLISH",
        "PUBLISH FAIL",
        no_user="PUBLISH FAIL, USER DOES NOT EXIST",
        not_connected="PUBLISH FAIL, USER NOT CONNECTED",
        own="PUBLISH FAIL, CONTENT ALREADY PUBLISHED",
    ),
    "DELETE": _outcomes(
        "DELETE",
        "DELETE FAIL",
        no_user="DELETE FAIL, USER DOES NOT EXIST",
        not_connected="DELETE FAIL, USER NOT CONNECTED",
        own="DELETE FAIL, CONTENT NOT PUBLISHED",
    ),
    "LIST_USERS": _outcomes(
        "LIST_USERS",
        "LIST_USERS FAIL",
        no_user="LIST_USERS FAIL, USER DOES NOT EXIST",
        not_connected="LIST_USERS FAIL, USER NOT CONNECTED",
    ),
    "LIST_CONTENT": _outcomes(
        "LIST_CONTENT",
        "LIST_CONTENT FAIL",
        no_user="LIST_CONTENT FAIL, USER DOES NOT EXIST",
        not_connected="LIST_CONTENT FAIL, USER NOT CONNECTED",
        own="LIST_CONTENT FAIL, REMOTE USER DOES NOT EXIST",
    ),
    "DISCONNECT": _outcomes(
        "DISCONNECT",
        "DISCONNECT FAIL",
        no_user="DISCONNECT FAIL / USER DOES NOT EXIST",
        not_connected="DISCONNECT FAIL / USER NOT CONNECTED",
    ),
    "SEARCH": _outcomes(
        "SEARCH",
        "SEARCH FAIL",
        no_user="SEARCH FAIL, USER DOES NOT EXIST",
        not_connected="SEARCH FAIL, USER NOT CONNECTED",
    ),
}
#: The extensions that answer for a classic operation print that operation's lines.
OUTCOMES["PUBLISH_FILE"] = OUTCOMES["PUBLISH"]
OUTCOMES["LIST_FILES"] = OUTCOMES["LIST_CONTENT"]

#: Extra words for a human when an operation gets its "any other error" code.
HINTS = {
    "UNREGISTER": "; a connected user cannot be unregistered, DISCONNECT it first",
    "CONNECT": "; the port sent may be unacceptable",
    "SEARCH": "; a query needs a word of letters or digits",
}

GET_FILE_OK = "c> GET_FILE OK"
GET_FILE_NO_FILE = "c> GET_FILE FAIL / FILE NOT EXIST"
GET_FILE_FAIL = "c> GET_FILE FAIL"


def outcome_line(op: str, code: int) -> str:
    """The line for ``op`` answered ``code``: its own line, or the plain FAIL line."""
    table, fail = OUTCOMES[op]
    return table.get(code, fail)


def fail_line(op: str) -> str:
    """The plain FAIL line of ``op`` (indexer unreachable, argument refused, ...)."""
    return OUTCOMES[op][1]


def not_connected_line(op: str) -> str:
    """The line of a command that needs a connected user when there is none."""
    return outcome_line(op, wire.OPS[op].not_connected)


def user_row(name: str, ip: str, port: str) -> str:
    """One LIST_USERS row, tab-indented; the name as it is typed in a command."""
    return f"\t{typed(name)} {shown(ip)} {shown(port)}"


def content_row(name: str, size: str, description: str) -> str:
    """One LIST_CONTENT row, tab-indented: name (as it is typed in a command), size
    (``-``: unknown), the description in double quotes."""
    return f'\t{typed(name)} {shown(size)} "{shown(description, keep_tab=True)}"'


def search_row(owner: str, name: str, size: str, description: str, copies: str) -> str:
    """One SEARCH hit, tab-indented: as a LIST_CONTENT row after its owner, and how many
    connected users have the same content when more than one does."""
    row = f"\t{typed(owner)} {content_row(name, size, description)[1:]}"
    if wire.is_decimal(copies) and int(copies) > 1:
        row += f" ({int(copies)} users have it)"
    return row


def typed(name: str) -> str:
    """A name from the indexer as it is typed back in a command: :func:`shown`, and in
    double quotes when it holds blanks, quotes or backslashes (``"my song.mp3"``)."""
    return shown(quote(name))


def shown(text: str, keep_tab: bool = False) -> str:
    """``text`` from the indexer, safe to print: control characters escaped.

    Our indexer refuses them, another may not; a newline would split a listing
    row and an escape sequence would reach the user's terminal. Descriptions
    keep their tabs, which the protocol allows.
    """

    def bad(ch: str) -> bool:  # wire's rule for descriptions: no control character but tab
        return not wire.check_text(ch) or (ch == "\t" and not keep_tab)

    if not any(map(bad, text)):
        return text
    return "".join(ch.encode("unicode_escape").decode() if bad(ch) else ch for ch in text)
