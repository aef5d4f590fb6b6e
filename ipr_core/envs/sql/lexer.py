"""MySQL lexing: one regex tokenizer and what is built on it.

The tokenizer serves three callers: splitting the dump into statements,
refusing multi-statement actions (a ``;`` inside a string is not a separator),
and translating MySQL literals for SQLite.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(
    r"""
      (?P<str>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*")
    | (?P<ident>`(?:[^`]|``)*`)
    | (?P<comment>(?:--(?=[ \t\r\n]|$)|\#)[^\n]*|/\*.*?\*/)
    | (?P<semi>;)
    | (?P<open>['"`].*)
    | (?P<other>[^'"`;\#/\-]+|.)
    """,
    re.S | re.X,
)


def tokenize(sql: str) -> list[tuple[str, str]]:
    """(kind, text) tokens: str, ident, comment, semi, open (an unterminated quote: the rest), other."""
    return [(m.lastgroup or "other", m.group()) for m in _TOKEN.finditer(sql)]


def is_executable_comment(text: str) -> bool:
    # MySQL runs /*!NNNNN ... */ (and MariaDB /*M!...*/) as SQL: it is content, not a comment.
    return text.startswith("/*!") or text.startswith("/*M!")


def split_statements(sql: str) -> list[str]:
    """Top-level statements of ``sql`` (split at ``;`` outside quotes and comments).

    Leading whitespace and plain comments are dropped, and so are pieces that
    hold nothing else, so a single trailing ``;`` or a trailing comment does not
    count as a second statement.
    """
    out: list[str] = []
    buf: list[str] = []
    content = False
    for kind, text in tokenize(sql):
        if kind == "semi":
            if content:
                out.append("".join(buf).strip())
            buf, content = [], False
            continue
        is_content = (kind == "comment" and is_executable_comment(text)) or (kind not in ("comment", "other")) or (kind == "other" and bool(text.strip()))
        if not content and not is_content:
            continue  # leading whitespace and plain comments belong to no statement
        buf.append(text)
        content = content or is_content
    if content:
        out.append("".join(buf).strip())
    return out


def has_executable_comment(sql: str) -> bool:
    return any(kind == "comment" and is_executable_comment(text) for kind, text in tokenize(sql))


def strip_comments(sql: str) -> str:
    return "".join(" " if kind == "comment" else text for kind, text in tokenize(sql)).strip()


_MYSQL_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a", "%": "\\%", "_": "\\_"}


def mysql_string_value(token: str) -> str:
    """The value of a MySQL string literal token ('...' or "..."): backslash escapes and doubled quotes decoded."""
    q, body = token[0], token[1:-1]
    return re.sub(r"\\(.)|" + re.escape(q * 2), lambda m: _MYSQL_ESCAPES.get(m.group(1), m.group(1)) if m.group(1) is not None else q, body, flags=re.S)


def sqlite_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def mysql_to_sqlite(sql: str) -> str:
    """Translate MySQL lexical conventions to SQLite's, leaving the rest alone.

    MySQL (without ANSI_QUOTES) reads ``"..."`` as a string; SQLite reads it as an
    identifier and only falls back to a string when no column matches. Backslash
    escapes exist in MySQL strings only. ``#`` starts a comment in MySQL only.
    Backtick identifiers are valid SQLite as they are.
    """
    parts = []
    for kind, text in tokenize(sql):
        if kind == "str":
            parts.append(sqlite_string(mysql_string_value(text)))
        elif kind == "comment" and text.startswith("#"):
            parts.append(" ")
        else:
            parts.append(text)
    return "".join(parts)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def first_keyword(stmt: str) -> str:
    """The statement's first word, upper-cased (after comments and opening parentheses)."""
    m = re.match(r"[\s(]*([A-Za-z_]+)", strip_comments(stmt))
    return m.group(1).upper() if m else ""
