"""MySQL semantics SQLite lacks, emulated because Spider's questions depend on them.

Registered on every connection (the cache builder's and the backend's):
text collation as ``utf8mb4_general_ci`` (``MYSQL_CI``) and ``AVG`` with
MySQL's precision. Queries get ``avg(col, D)`` for FLOAT(M,D)/DECIMAL(M,D)
columns (``scale_avg_calls``); SQLite's error messages are reworded as
MySQL's (``mysql_error_message``) so an observation does not tell the model
which backend it runs on.
"""

from __future__ import annotations

import decimal
import re
import sqlite3
import unicodedata
from typing import Any, Mapping

from ipr_core.envs.sql.dump import Database
from ipr_core.envs.sql.lexer import tokenize

MYSQL_CI = "MYSQL_CI"


def _ci_key(s: str) -> str:
    # utf8mb4_general_ci, closely enough for Spider: case- and accent-insensitive,
    # trailing spaces ignored (PAD SPACE: 'Aberdeen ' = 'Aberdeen', which flight_2's
    # data needs). NOCASE would only fold ASCII case.
    s = s.rstrip(" ")
    if s.isascii():
        return s.upper()
    return "".join(ch for ch in unicodedata.normalize("NFD", s) if not unicodedata.combining(ch)).upper()


def _ci_collate(a: str, b: str) -> int:
    ka, kb = _ci_key(a), _ci_key(b)
    return (ka > kb) - (ka < kb)


_NUMERIC_PREFIX = re.compile(r"^\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class _MySQLAvg:
    """AVG as MySQL returns it: over exact numbers a DECIMAL with 4 more digits than
    the argument (div_precision_increment), so AVG(int) is 19.5588, not
    19.558823529411764; over FLOAT(M,D) / DECIMAL(M,D) columns, D + 4 digits
    (the two-argument form, see ``scale_avg_calls``); otherwise a double."""

    def __init__(self) -> None:
        self.total: Any = 0
        self.n = 0
        self.exact = True
        self.scale: int | None = None

    def step(self, v: Any, scale: int | None = None) -> None:
        self.scale = scale
        if v is None:
            return
        if isinstance(v, str):  # SQLite's own rule: the numeric prefix of a text
            m = _NUMERIC_PREFIX.match(v)
            v = float(m.group()) if m else 0.0
        elif isinstance(v, bytes):
            v = 0.0
        if isinstance(v, float):
            self.exact = False
        self.total += v
        self.n += 1

    def finalize(self) -> Any:
        if not self.n:
            return None
        if self.exact:
            mean = decimal.Decimal(self.total) / decimal.Decimal(self.n)
            digits = (self.scale or 0) + 4
        elif self.scale is not None:
            mean = decimal.Decimal(self.total / self.n)
            digits = self.scale + 4
        else:
            return self.total / self.n
        return float(mean.quantize(decimal.Decimal(1).scaleb(-digits), rounding=decimal.ROUND_HALF_UP))


def register_mysql_semantics(con: sqlite3.Connection) -> None:
    con.create_collation(MYSQL_CI, _ci_collate)
    con.create_aggregate("avg", 1, _MySQLAvg)  # type: ignore[arg-type]
    con.create_aggregate("avg", 2, _MySQLAvg)  # type: ignore[arg-type]


# SQLite's messages for the errors agents make most, in MySQL's wording.
_SQLITE_ERRORS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^no such table: (?:main\.)?(.+)$"), "Table '{db}.{0}' doesn't exist"),
    (re.compile(r"^no such column: (.+)$"), "Unknown column '{0}' in 'field list'"),
    (re.compile(r"^ambiguous column name: (.+)$"), "Column '{0}' in field list is ambiguous"),
    (re.compile(r'^near "(.*)": syntax error$', re.S), "You have an error in your SQL syntax; check the manual that corresponds to your MySQL server version for the right syntax to use near '{0}' at line 1"),
    (re.compile(r"^no such function: (.+)$"), "FUNCTION {db}.{0} does not exist"),  # an allowed MySQL function SQLite lacks (YEAR, IF)
    (re.compile(r"^incomplete input$"), "You have an error in your SQL syntax; check the manual that corresponds to your MySQL server version for the right syntax to use near '' at line 1"),
    (re.compile(r"^not authorized$|^attempt to write a readonly database$"), "the database is read-only: only SELECT queries are allowed"),
]


def mysql_error_message(msg: str, db: str) -> str:
    """SQLite's error ``msg`` (in database ``db``) as MySQL would word it, else as it is."""
    for pattern, template in _SQLITE_ERRORS:
        m = pattern.match(msg)
        if m:
            groups = [g.lower() if "Table" in template else g for g in m.groups()]
            return template.format(*groups, db=db.lower())
    return msg


_AVG_COLUMN = re.compile(r"\bavg\s*\(\s*((?:\w+\s*\.\s*)?(\w+))\s*\)", re.I)


def column_scales(db: Database) -> dict[str, int]:
    """Column name (lowercased) -> D of its FLOAT(M,D)/DOUBLE(M,D)/DECIMAL(M,D) type, when
    every column of that name in ``db`` has the same D (else the name is left out)."""
    seen: dict[str, set[int | None]] = {}
    for t in db.tables:
        for c in t.columns:
            m = re.match(r"(float|double|real|decimal|numeric)\(\d+,(\d+)\)", c.type)
            seen.setdefault(c.name.lower(), set()).add(int(m.group(2)) if m else None)
    return {name: next(iter(v)) for name, v in seen.items() if len(v) == 1 and None not in v}  # type: ignore[misc]


def scale_avg_calls(sql: str, scales: Mapping[str, int]) -> str:
    """``avg(col)`` -> ``avg(col, D)`` where ``col`` names a FLOAT(M,D)/DECIMAL(M,D)
    column of the database (unambiguously, see ``column_scales``), so the result
    has MySQL's D + 4 digits. String literals and identifiers are left alone."""
    if not scales:
        return sql

    def sub(m: re.Match[str]) -> str:
        scale = scales.get(m.group(2).lower())
        return m.group(0) if scale is None else f"{m.group(0)[:-1].rstrip()}, {scale})"

    return "".join(_AVG_COLUMN.sub(sub, text) if kind == "other" else text for kind, text in tokenize(sql))
