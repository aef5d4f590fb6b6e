"""Schema commands answered from the dump, identically on both backends.

``SHOW TABLES``, ``DESCRIBE <table>`` and ``SHOW COLUMNS FROM <table>`` are
answered from the dump's schema in MySQL 8's format (InterCode's server), so
the expert's exploration and the agent's observations do not depend on the
backend (MariaDB itself would print ``int(11)``).
"""

from __future__ import annotations

import re

from ipr_core.envs.sql.dump import Dump
from ipr_core.envs.sql.lexer import mysql_string_value, strip_comments, tokenize
from ipr_core.envs.sql.results import QueryResult

_SHOW_TABLES = re.compile(r"^SHOW\s+(FULL\s+)?TABLES(?:\s+(?:FROM|IN)\s+`?([\w$]+)`?)?(?:\s+LIKE\s+('(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\"))?$", re.I)
_DESCRIBE = re.compile(r"^(?:DESC|DESCRIBE|EXPLAIN)\s+(?:`?([\w$]+)`?\s*\.\s*)?`?([\w$]+)`?(?:\s+`?([\w$]+)`?)?$", re.I)
_SHOW_COLUMNS = re.compile(r"^SHOW\s+(?:FULL\s+)?(?:COLUMNS|FIELDS)\s+(?:FROM|IN)\s+(?:`?([\w$]+)`?\s*\.\s*)?`?([\w$]+)`?(?:\s+(?:FROM|IN)\s+`?([\w$]+)`?)?$", re.I)


def _like_regex(pattern: str) -> re.Pattern[str]:
    out = "".join(".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in pattern)
    return re.compile(f"^{out}$", re.I | re.S)


def meta_command(dump: Dump, db: str, stmt: str) -> QueryResult | None:
    """SHOW TABLES / DESCRIBE <table> / SHOW COLUMNS FROM <table>, answered from the dump's
    schema in MySQL 8's format (identical on both backends); None for any other statement."""
    s = strip_comments(stmt).rstrip(" ;\t\n")
    m = _SHOW_TABLES.match(s)
    if m:
        name = m.group(2) or db
        if name.lower() not in dump.databases:
            return QueryResult(error=f"Unknown database '{name.lower()}'")
        names = dump.database(name).table_names()
        if m.group(3):
            rx = _like_regex(mysql_string_value(m.group(3)))
            names = [t for t in names if rx.match(t)]
        return QueryResult(rows=tuple((t, "BASE TABLE") if m.group(1) else (t,) for t in names))
    m = _DESCRIBE.match(s)
    column = None
    if m:
        schema, table, column = m.group(1), m.group(2), m.group(3)
    else:
        m = _SHOW_COLUMNS.match(s)
        if not m:
            return None
        schema, table = m.group(1) or m.group(3), m.group(2)
    name = schema or db
    if name.lower() not in dump.databases:
        return QueryResult(error=f"Unknown database '{name.lower()}'")
    t = dump.database(name).table(table)
    if t is None:
        return QueryResult(error=f"Table '{name.lower()}.{table.lower()}' doesn't exist")
    rows = t.describe_rows()
    if column:
        rows = tuple(r for r in rows if _like_regex(column).match(r[0]))
    return QueryResult(rows=rows)


def tables_in_query(dump: Dump, db: str, sql: str) -> list[str]:
    """Tables of ``db`` that ``sql`` names (outside string literals), lowercased, in order of first mention."""
    names = {t.lower() for t in dump.database(db).table_names()}
    found: list[str] = []
    for kind, text in tokenize(sql):
        if kind == "ident":
            words = [text.strip("`")]
        elif kind == "other":
            words = re.findall(r"[A-Za-z_$][\w$]*", text)
        else:
            continue
        for w in words:
            if w.lower() in names and w.lower() not in found:
                found.append(w.lower())
    return found
