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


# Words that may stand before '(' without calling a function: clauses and
# operators (``IN (``, ``FROM (``, ``OVER (``, ``USE INDEX (``) and the type
# names of ``CAST(x AS DECIMAL(10, 2))``. Any other word before '(' is a call.
NOT_CALLS = frozenset(
    "SELECT FROM WHERE AND OR NOT XOR IN EXISTS ON USING AS JOIN UNION ALL ANY SOME DISTINCT DISTINCTROW INTERSECT "
    "EXCEPT BY HAVING WHEN THEN ELSE CASE IS LIKE BETWEEN ESCAPE OVER FILTER WITH RECURSIVE MATERIALIZED VALUES ROW "
    "LIMIT OFFSET DIV REGEXP RLIKE INTERVAL INDEX KEY LATERAL "
    "DECIMAL DEC NUMERIC FLOAT DOUBLE REAL INT INTEGER SIGNED UNSIGNED".split()
)
# MySQL's unquoted identifier characters (and numbers); '@@' (a system variable) is one piece.
_PIECE = re.compile(r"@@|[0-9A-Za-z_$\u0080-\uffff]+|\S")


def significant_tokens(sql: str) -> list[tuple[str, str]]:
    """The tokens that carry meaning, comments and whitespace dropped: ('word', an
    unquoted word or number), ('ident', a `quoted` name, unquoted), ('str', a literal)
    or ('punct', one character or '@@')."""
    out: list[tuple[str, str]] = []
    for kind, text in tokenize(sql):
        if kind == "other":
            for piece in _PIECE.findall(text):
                first = piece[0]
                out.append(("word" if first.isalnum() or first in "_$" or first >= "\u0080" else "punct", piece))
        elif kind == "ident":
            out.append(("ident", text[1:-1].replace("``", "`")))
        elif kind in ("str", "open"):
            out.append(("str", text))
        elif kind == "semi":
            out.append(("punct", ";"))
        elif kind == "comment" and is_executable_comment(text):
            # MySQL runs its content: it counts (``/*!50000 version() */`` calls version).
            out.extend(significant_tokens(re.sub(r"^/\*M?!\d*", "", text)[:-2]))
    return out


def _closing(tokens: list[tuple[str, str]], open_at: int) -> int:
    """Index of the ')' matching the '(' at ``open_at`` (len(tokens) when unbalanced)."""
    depth = 0
    for i in range(open_at, len(tokens)):
        if tokens[i] == ("punct", "("):
            depth += 1
        elif tokens[i] == ("punct", ")"):
            depth -= 1
            if depth == 0:
                return i
    return len(tokens)


def _is_cte_columns(tokens: list[tuple[str, str]], open_at: int) -> bool:
    # ``WITH name (a, b) AS (...)``: the name and its column list, not a call;
    # a call is never followed by AS [NOT] [MATERIALIZED] '('.
    end = _closing(tokens, open_at)
    rest = [text.upper() for _, text in tokens[end + 1 : end + 5]]
    if rest[:1] != ["AS"]:
        return False
    rest = rest[1:]
    rest = rest[1:] if rest[:1] == ["NOT"] else rest
    rest = rest[1:] if rest[:1] == ["MATERIALIZED"] else rest
    return rest[:1] == ["("]


def function_calls(sql: str | list[tuple[str, str]]) -> list[str]:
    """Names of the functions ``sql`` (or its ``significant_tokens``) calls: a word or
    `quoted` name before '(', also across whitespace and comments as MySQL allows,
    lowercased; a qualified call (``schema.f(``) comes back as ``schema.f``."""
    tokens = significant_tokens(sql) if isinstance(sql, str) else sql
    names: list[str] = []
    for i in range(len(tokens) - 1):
        kind, text = tokens[i]
        if kind not in ("word", "ident") or tokens[i + 1] != ("punct", "("):
            continue
        if kind == "word" and (text.upper() in NOT_CALLS or text[0].isdigit()):
            continue
        if _is_cte_columns(tokens, i + 1):
            continue
        name = text.lower()
        if i >= 2 and tokens[i - 1] == ("punct", ".") and tokens[i - 2][0] in ("word", "ident"):
            name = f"{tokens[i - 2][1].lower()}.{name}"
        names.append(name)
    return names
