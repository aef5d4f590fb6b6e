"""SQL plumbing for InterCode-SQL: the MySQL dump, an embedded SQLite copy of it,
a MariaDB/MySQL server backend, and a throwaway local MariaDB server.

InterCode-SQL ships its 20 Spider-dev databases as one MySQL 8 dump. Both
backends serve the same databases and return rows normalised the same way, so
tasks, observations and rewards agree (``docs/intercode_sql.md`` lists where
they cannot):

- ``SQLiteBackend`` (embedded default): the dump is converted once into one
  SQLite file per database under ``<cache>/intercode_sql/<dump sha>-v<N>/``
  (content-addressed: a changed dump or converter gets a new folder) and opened
  read-only (URI ``mode=ro`` + ``PRAGMA query_only`` + an authorizer that only
  allows reads), with a per-statement deadline (progress handler). MySQL
  semantics that matter for Spider are emulated: text columns collate
  case-insensitively (MySQL's ``utf8mb4_general_ci``), table names are
  case-insensitive (``lower_case_table_names=1``), ``"..."`` is a string
  literal and backslash escapes are decoded.
- ``MySQLBackend``: the dump is loaded once into the server (skipped when a
  marker row says this dump is already there); the agent connects as a
  read-only user with ``max_statement_time`` (MariaDB) or
  ``max_execution_time`` (MySQL) set for its session.

Nothing here knows about episodes or rewards: see ``intercode_sql.py``.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from ipr_core.envs.base import EnvError

# Bump when the SQLite conversion changes: the cache folder name carries it.
CONVERTER_VERSION = 2
TIMEOUT_MESSAGE = "Query execution was interrupted (max_statement_time exceeded)"


def default_dump_path() -> Path:
    """The MySQL dump bundled with intercode-bench (byte-identical to InterCode's ic_spider_dbs.sql)."""
    import importlib.util

    spec = importlib.util.find_spec("intercode")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("intercode-bench is not installed: pip install 'ipr-flow[intercode_sql]'")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "datasets" / "spider_dev.sql"


def default_cache_root() -> Path:
    return Path(os.environ.get("IPR_CACHE_DIR") or Path.home() / ".cache" / "ipr-flow")


# --- MySQL lexing ----------------------------------------------------------------------
# One regex tokenizer serves three callers: splitting the dump into statements,
# refusing multi-statement actions (a ';' inside a string is not a separator),
# and translating MySQL literals for SQLite.

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


def _is_executable_comment(text: str) -> bool:
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
        is_content = (kind == "comment" and _is_executable_comment(text)) or (kind not in ("comment", "other")) or (kind == "other" and bool(text.strip()))
        if not content and not is_content:
            continue  # leading whitespace and plain comments belong to no statement
        buf.append(text)
        content = content or is_content
    if content:
        out.append("".join(buf).strip())
    return out


def has_executable_comment(sql: str) -> bool:
    return any(kind == "comment" and _is_executable_comment(text) for kind, text in tokenize(sql))


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


# --- values and results ------------------------------------------------------------------


def plain_value(v: Any) -> Any:
    """One representation per value on both backends (what observations and rewards compare).

    MySQL's DECIMAL results (SUM of ints, AVG, DECIMAL columns) become int when
    they carry no fraction digits (``Decimal('15')`` from SUM) and float
    otherwise (``Decimal('3.5000')`` from AVG), which is what SQLite computes
    for the same expressions; dates and times become the strings SQLite stores.
    """
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, decimal.Decimal):
        exponent = v.as_tuple().exponent
        if isinstance(exponent, int) and exponent >= 0:
            return int(v)
        return float(v)
    if isinstance(v, _dt.datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, (_dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        total = int(v.total_seconds())
        sign, total = ("-" if total < 0 else ""), abs(total)
        return f"{sign}{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", errors="replace")
    if isinstance(v, set):
        return ",".join(sorted(v))
    return str(v)


@dataclass(frozen=True)
class QueryResult:
    """What one statement produced: rows (normalised with ``plain_value``) or an error message."""

    rows: tuple[tuple[Any, ...], ...] | None = None  # None: no result set (or an error)
    error: str | None = None  # the database's message, MySQL wording where translated
    timed_out: bool = False
    refused: bool = False  # the database refused it as a write or a privilege violation

    @property
    def ok(self) -> bool:
        return self.error is None


# --- the dump: statements and schema ---------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # as MySQL 8 shows it in DESCRIBE: int, varchar(255), float(10,2), ...
    nullable: bool
    default: str | None
    extra: str  # auto_increment, DEFAULT_GENERATED, ""


@dataclass(frozen=True)
class Table:
    name: str  # as written in the dump; servers with lower_case_table_names=1 store it lowercased
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = ()
    indexes: tuple[tuple[bool, tuple[str, ...]], ...] = ()  # (unique, columns), PRIMARY excluded

    def key_flag(self, column: str) -> str:
        """MySQL's DESCRIBE ``Key`` column: PRI, UNI (single-column unique), MUL (first column of an index) or ''."""
        if column in self.primary_key:
            return "PRI"
        if any(unique and cols == (column,) for unique, cols in self.indexes):
            return "UNI"
        if any(cols and cols[0] == column for _, cols in self.indexes):
            return "MUL"
        return ""

    def describe_rows(self) -> tuple[tuple[Any, ...], ...]:
        """``DESCRIBE table`` as MySQL 8 (InterCode's server) prints it: Field, Type, Null, Key, Default, Extra."""
        return tuple((c.name, c.type, "YES" if c.nullable else "NO", self.key_flag(c.name), c.default, c.extra) for c in self.columns)


@dataclass(frozen=True)
class Database:
    name: str  # as written in the dump (may mix case: cre_Doc_Template_Mgt)
    tables: tuple[Table, ...]
    statements: tuple[str, ...]  # the dump's statements after USE, in order

    def table(self, name: str) -> Table | None:
        low = name.lower()
        return next((t for t in self.tables if t.name.lower() == low), None)

    def table_names(self) -> list[str]:
        """``SHOW TABLES`` under lower_case_table_names=1: lowercased, sorted."""
        return sorted(t.name.lower() for t in self.tables)


@dataclass(frozen=True)
class Dump:
    path: Path
    sha256: str
    preamble: tuple[str, ...]  # statements before the first CREATE DATABASE (InterCode's admin user)
    databases: Mapping[str, Database] = field(default_factory=dict)  # lowercased name -> database

    def database(self, name: str) -> Database:
        try:
            return self.databases[name.lower()]
        except KeyError:
            raise ValueError(f"unknown database {name!r}; the dump {self.path.name} has {sorted(d.name for d in self.databases.values())}") from None


_CREATE_DB = re.compile(r"^CREATE\s+DATABASE\s+(?:IF\s+NOT\s+EXISTS\s+)?`([^`]+)`", re.I)
_USE = re.compile(r"^USE\s+`?([^`\s;]+)`?", re.I)
_CREATE_TABLE = re.compile(r"^CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?`([^`]+)`\s*\((.*)\)[^)]*$", re.I | re.S)
_COL_TYPE = re.compile(r"^([A-Za-z]+)(\s*\([^)]*\))?((?:\s+(?:unsigned|zerofill))*)", re.I)
_DEFAULT = re.compile(r"\bDEFAULT\s+('(?:[^'\\]|\\.|'')*'|NULL\b|[-+\w.]+(?:\(\))?)", re.I)
_KEY_COLS = re.compile(r"`([^`]+)`(?:\s*\(\d+\))?")


def _split_top_level_commas(body: str) -> list[str]:
    parts, buf, depth = [], [], 0
    for kind, text in tokenize(body):
        if kind != "other":
            buf.append(text)
            continue
        for ch in text:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append("".join(buf).strip())
                buf = []
            else:
                buf.append(ch)
    if "".join(buf).strip():
        parts.append("".join(buf).strip())
    return parts


def _parse_column(defn: str) -> Column:
    m = re.match(r"`((?:[^`]|``)*)`\s*(.*)$", defn, re.S)
    if not m:
        raise ValueError(f"cannot parse column definition {defn[:80]!r}")
    name, rest = m.group(1).replace("``", "`"), m.group(2)
    t = _COL_TYPE.match(rest)
    if not t:
        raise ValueError(f"cannot parse the type of column {name!r}: {rest[:80]!r}")
    col_type = (t.group(1).lower() + re.sub(r"\s+", "", t.group(2) or "") + t.group(3).lower()).strip()
    upper = rest.upper()
    d = _DEFAULT.search(rest)
    default: str | None = None
    extra = ""
    if d:
        raw = d.group(1)
        if raw.upper() == "NULL":
            default = None
        elif raw[0] == "'":
            default = mysql_string_value(raw)
        else:
            default = raw
            if raw.upper().startswith("CURRENT_TIMESTAMP"):
                extra = "DEFAULT_GENERATED"
    if "AUTO_INCREMENT" in upper:
        extra = "auto_increment"
    if "ON UPDATE CURRENT_TIMESTAMP" in upper:
        extra = (extra + " on update CURRENT_TIMESTAMP").strip()
    return Column(name, col_type, "NOT NULL" not in upper, default, extra)


def parse_create_table(stmt: str) -> Table:
    m = _CREATE_TABLE.match(stmt.strip())
    if not m:
        raise ValueError(f"not a CREATE TABLE statement: {stmt[:80]!r}")
    name, body = m.group(1), m.group(2)
    columns: list[Column] = []
    pk: tuple[str, ...] = ()
    indexes: list[tuple[bool, tuple[str, ...]]] = []
    for defn in _split_top_level_commas(body):
        head = defn.upper()
        if defn.startswith("`"):
            columns.append(_parse_column(defn))
        elif head.startswith("PRIMARY KEY"):
            pk = tuple(_KEY_COLS.findall(defn))
        elif head.startswith(("UNIQUE KEY", "UNIQUE INDEX", "UNIQUE")):
            cols = tuple(_KEY_COLS.findall(defn.split("(", 1)[1]))
            indexes.append((True, cols))
        elif head.startswith(("KEY", "INDEX", "FULLTEXT", "SPATIAL")):
            cols = tuple(_KEY_COLS.findall(defn.split("(", 1)[1]))
            indexes.append((False, cols))
        # CONSTRAINT ... FOREIGN KEY: mysqldump also writes the KEY that backs it;
        # referential integrity is irrelevant to read-only queries.
    if pk:
        columns = [Column(c.name, c.type, False, c.default, c.extra) if c.name in pk else c for c in columns]
    return Table(name, tuple(columns), pk, tuple(indexes))


def parse_dump(path: str | Path) -> Dump:
    """Split a mysqldump file into per-database statements and parse its tables."""
    path = Path(path)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    preamble: list[str] = []
    dbs: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for stmt in split_statements(data.decode("utf-8")):
        body = stmt
        m = _CREATE_DB.match(body)
        if m:
            name = m.group(1)
            current = dbs.setdefault(name.lower(), {"name": name, "tables": [], "statements": []})
            continue
        m = _USE.match(body)
        if m:
            current = dbs.setdefault(m.group(1).lower(), {"name": m.group(1), "tables": [], "statements": []})
            continue
        if current is None:
            preamble.append(stmt)
            continue
        current["statements"].append(body)
        if _CREATE_TABLE.match(body):
            current["tables"].append(parse_create_table(body))
    databases = {k: Database(v["name"], tuple(v["tables"]), tuple(v["statements"])) for k, v in dbs.items()}
    return Dump(path, sha, tuple(preamble), databases)


# --- SQLite: conversion, cache, read-only execution -----------------------------------------


def _sqlite_type(mysql_type: str) -> tuple[str, bool]:
    """(declared SQLite type, case-insensitive collation?) for a MySQL column type."""
    base = re.match(r"[a-z]+", mysql_type).group()  # type: ignore[union-attr]
    if base in ("int", "integer", "tinyint", "smallint", "mediumint", "bigint", "year", "bit", "bool", "boolean"):
        return "INTEGER", False
    if base in ("float", "double", "real", "decimal", "numeric", "dec", "fixed"):
        # REAL, not NUMERIC: MySQL returns DECIMAL(19,4) 100 as Decimal('100.0000'),
        # which plain_value makes 100.0; NUMERIC affinity would store the integer 100.
        return "REAL", False
    if base in ("blob", "tinyblob", "mediumblob", "longblob", "binary", "varbinary"):
        return "BLOB", False
    if base in ("date", "datetime", "timestamp", "time"):
        return "TEXT", False
    return "TEXT", True  # char, varchar, text, enum, set: compared as utf8mb4_general_ci does


# --- MySQL semantics SQLite lacks, registered on every connection ---------------------------

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
    (the two-argument form, see ``SQLiteBackend._scaled_avg``); otherwise a double."""

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


def _register_mysql_semantics(con: sqlite3.Connection) -> None:
    con.create_collation(MYSQL_CI, _ci_collate)
    con.create_aggregate("avg", 1, _MySQLAvg)  # type: ignore[arg-type]
    con.create_aggregate("avg", 2, _MySQLAvg)  # type: ignore[arg-type]


def sqlite_create_table(table: Table) -> list[str]:
    """CREATE TABLE (+ CREATE INDEX) statements for SQLite, table name lowercased (lower_case_table_names=1)."""
    tname = table.name.lower()
    int_pk = len(table.primary_key) == 1 and _sqlite_type(next(c.type for c in table.columns if c.name == table.primary_key[0]))[0] == "INTEGER"
    defs = []
    for c in table.columns:
        decl, nocase = _sqlite_type(c.type)
        d = f"{quote_ident(c.name)} {decl}"
        if int_pk and c.name == table.primary_key[0]:
            d += " PRIMARY KEY"  # the rowid alias: table scans run in key order, as InnoDB's do
        if nocase:
            d += f" COLLATE {MYSQL_CI}"
        defs.append(d)
    if table.primary_key and not int_pk:
        defs.append(f"PRIMARY KEY ({', '.join(quote_ident(c) for c in table.primary_key)})")
    out = [f"CREATE TABLE {quote_ident(tname)} (\n  " + ",\n  ".join(defs) + "\n)"]
    for i, (_, cols) in enumerate(table.indexes):
        # Plain indexes: they only speed up joins; uniqueness is irrelevant to reads.
        out.append(f"CREATE INDEX {quote_ident(f'ix_{tname}_{i}')} ON {quote_ident(tname)} ({', '.join(quote_ident(c) for c in cols)})")
    return out


_INSERT = re.compile(r"^(?:INSERT|REPLACE)\s+(?:IGNORE\s+)?INTO\s", re.I)


def sqlite_cache_dir(dump: Dump, cache_root: str | Path | None = None) -> Path:
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / "intercode_sql" / f"{dump.sha256[:16]}-v{CONVERTER_VERSION}"


_COMPLETE = "_COMPLETE.json"


def build_sqlite(dump: Dump, cache_root: str | Path | None = None) -> Path:
    """One SQLite file per database of ``dump``, built once and reused.

    The folder is named by the dump's digest and the converter version, so a
    changed dump (or converter) builds a new one. It is built under a temporary
    name and renamed into place, ``_COMPLETE.json`` inside, so concurrent
    builders never see half a cache: the first rename wins, the others discard theirs.
    """
    target = sqlite_cache_dir(dump, cache_root)
    if (target / _COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    t0 = time.perf_counter()
    try:
        for key, db in dump.databases.items():
            con = sqlite3.connect(tmp / f"{key}.sqlite", isolation_level=None)
            _register_mysql_semantics(con)
            try:
                con.execute("PRAGMA journal_mode=OFF")
                con.execute("BEGIN")
                for table in db.tables:
                    for ddl in sqlite_create_table(table):
                        con.execute(ddl)
                for stmt in db.statements:
                    if _INSERT.match(stmt):
                        con.execute(mysql_to_sqlite(stmt))
                con.execute("COMMIT")
                con.execute("ANALYZE")  # planner statistics: Spider's joins use the indexes
            finally:
                con.close()
        info = {"dump": str(dump.path), "sha256": dump.sha256, "converter": CONVERTER_VERSION, "seconds": round(time.perf_counter() - t0, 3), "databases": sorted(dump.databases)}
        (tmp / _COMPLETE).write_text(json.dumps(info, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _COMPLETE).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def sqlite_build_info(path: Path) -> dict:
    return json.loads((path / _COMPLETE).read_text())


# Authorizer action codes a read-only query needs; everything else (writes, DDL,
# PRAGMA, ATTACH, transactions) is denied even if it slipped past the classifier.
_SQLITE_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, getattr(sqlite3, "SQLITE_RECURSIVE", 33)}

# SQLite's messages for the errors agents make most, in MySQL's wording: the
# observation should not tell the model which backend it runs on.
_SQLITE_ERRORS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^no such table: (?:main\.)?(.+)$"), "Table '{db}.{0}' doesn't exist"),
    (re.compile(r"^no such column: (.+)$"), "Unknown column '{0}' in 'field list'"),
    (re.compile(r"^ambiguous column name: (.+)$"), "Column '{0}' in field list is ambiguous"),
    (re.compile(r'^near "(.*)": syntax error$', re.S), "You have an error in your SQL syntax; check the manual that corresponds to your MySQL server version for the right syntax to use near '{0}' at line 1"),
    (re.compile(r"^incomplete input$"), "You have an error in your SQL syntax; check the manual that corresponds to your MySQL server version for the right syntax to use near '' at line 1"),
    (re.compile(r"^not authorized$|^attempt to write a readonly database$"), "the database is read-only: only SELECT queries are allowed"),
]


def _sqlite_error_message(msg: str, db: str) -> str:
    for pattern, template in _SQLITE_ERRORS:
        m = pattern.match(msg)
        if m:
            groups = [g.lower() if "Table" in template else g for g in m.groups()]
            return template.format(*groups, db=db.lower())
    return msg


_AVG_COLUMN = re.compile(r"\bavg\s*\(\s*((?:\w+\s*\.\s*)?(\w+))\s*\)", re.I)


def _column_scales(db: Database) -> dict[str, int]:
    """Column name (lowercased) -> D of its FLOAT(M,D)/DOUBLE(M,D)/DECIMAL(M,D) type, when
    every column of that name in ``db`` has the same D (else the name is left out)."""
    seen: dict[str, set[int | None]] = {}
    for t in db.tables:
        for c in t.columns:
            m = re.match(r"(float|double|real|decimal|numeric)\(\d+,(\d+)\)", c.type)
            seen.setdefault(c.name.lower(), set()).add(int(m.group(2)) if m else None)
    return {name: next(iter(v)) for name, v in seen.items() if len(v) == 1 and None not in v}  # type: ignore[misc]


_SQLITE_REFUSALS = {"not authorized", "attempt to write a readonly database"}


class SQLBackend(Protocol):
    kind: str
    dump: Dump

    def execute(self, db: str, sql: str) -> QueryResult:
        """Run one (already vetted) statement in database ``db``; errors come back in the result."""

    def reset_session(self, db: str) -> None:
        """Start a clean session on ``db`` (no state left from earlier statements)."""

    def close(self) -> None: ...


class SQLiteBackend:
    """Read-only SQLite copies of the dump's databases, one cached connection per database."""

    kind = "sqlite"

    def __init__(self, dump: Dump, cache_root: str | Path | None = None, statement_timeout_s: float = 5.0, max_rows: int = 100_000):
        self.dump = dump
        self.statement_timeout_s = float(statement_timeout_s)
        self.max_rows = int(max_rows)
        t0 = time.perf_counter()
        self.path = build_sqlite(dump, cache_root)
        self.open_s = time.perf_counter() - t0
        self._conns: dict[str, sqlite3.Connection] = {}
        self._deadline = float("inf")
        self._scales = {key: _column_scales(db) for key, db in dump.databases.items()}

    def _progress(self) -> int:
        # Called every N virtual-machine steps: a non-zero return interrupts the statement.
        return 1 if time.monotonic() > self._deadline else 0

    @staticmethod
    def _authorize(action: int, *_: Any) -> int:
        return sqlite3.SQLITE_OK if action in _SQLITE_READ_ACTIONS else sqlite3.SQLITE_DENY

    def _conn(self, db: str) -> sqlite3.Connection:
        key = self.dump.database(db).name.lower()
        con = self._conns.get(key)
        if con is None:
            uri = (self.path / f"{key}.sqlite").as_uri() + "?mode=ro&immutable=1"
            # check_same_thread=False: an EnvPool may step this env from different
            # threads, one at a time.
            con = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA query_only = ON")
            _register_mysql_semantics(con)
            con.set_authorizer(self._authorize)
            con.set_progress_handler(self._progress, 2000)
            self._conns[key] = con
        return con

    def _scaled_avg(self, db: str, sql: str) -> str:
        """``avg(col)`` -> ``avg(col, D)`` where ``col`` names a FLOAT(M,D)/DECIMAL(M,D)
        column of this database (unambiguously), so the result has MySQL's D + 4 digits."""
        scales = self._scales[db.lower()]
        if not scales:
            return sql

        def sub(m: re.Match[str]) -> str:
            scale = scales.get(m.group(2).lower())
            return m.group(0) if scale is None else f"{m.group(0)[:-1].rstrip()}, {scale})"

        return "".join(_AVG_COLUMN.sub(sub, text) if kind == "other" else text for kind, text in tokenize(sql))

    def reset_session(self, db: str) -> None:
        # Reads cannot change a connection's state (the authorizer denies PRAGMA,
        # ATTACH, temp tables), so a clean session is the cached connection.
        self._conn(db)

    def execute(self, db: str, sql: str) -> QueryResult:
        con = self._conn(db)
        self._deadline = time.monotonic() + self.statement_timeout_s
        try:
            cur = con.execute(self._scaled_avg(db, mysql_to_sqlite(sql)))
            if cur.description is None:
                return QueryResult(rows=None)
            rows = cur.fetchmany(self.max_rows + 1)
            cur.close()
        except (sqlite3.Error, OverflowError, ValueError) as e:  # ProgrammingError for 2 statements, ValueError for NUL
            if isinstance(e, sqlite3.OperationalError) and str(e) == "interrupted":
                return QueryResult(error=TIMEOUT_MESSAGE, timed_out=True)
            return QueryResult(error=_sqlite_error_message(str(e), db), refused=str(e) in _SQLITE_REFUSALS)
        finally:
            self._deadline = float("inf")
        if len(rows) > self.max_rows:
            return QueryResult(error=f"the result has more than {self.max_rows} rows")
        return QueryResult(rows=tuple(tuple(plain_value(v) for v in r) for r in rows))

    def close(self) -> None:
        for con in self._conns.values():
            con.close()
        self._conns.clear()


# --- MariaDB / MySQL server -------------------------------------------------------------


@dataclass(frozen=True)
class MySQLURL:
    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str = ""
    options: Mapping[str, str] = field(default_factory=dict)  # unix_socket, ssl_disabled, ...

    @classmethod
    def parse(cls, url: str) -> "MySQLURL":
        """``mysql://user:password@host:port/?unix_socket=...`` (also ``mariadb://``)."""
        u = urlsplit(url)
        if u.scheme not in ("mysql", "mariadb"):
            raise ValueError(f"mysql_url must start with mysql:// or mariadb://, got {url.split('@')[-1]!r}")
        return cls(u.hostname or "127.0.0.1", u.port or 3306, unquote(u.username or "root"), unquote(u.password or ""), dict(parse_qsl(u.query)))

    def connect_args(self, user: str | None = None, password: str | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"host": self.host, "port": self.port, "user": user or self.user, "password": self.password if password is None else password}
        for k, v in self.options.items():
            args[k] = v.lower() in ("1", "true", "yes") if k.startswith("ssl_") else v
        return args

    def redacted(self) -> str:
        return f"mysql://{self.user}:***@{self.host}:{self.port}"




def _is_client_error(errno: int | None) -> bool:
    """Client-side errors (the connection is gone or broken): CR_* codes 2000-2999,
    and the connector's own (-1, None). Server errors answer a statement: 1xxx, 3xxx+."""
    return errno is None or errno < 1000 or 2000 <= errno < 3000

# command denied, access denied to a database, privilege needed (FILE), read-only server
_PRIVILEGE_ERRNOS = {1142, 1143, 1044, 1227, 1290, 1370}
_SKIP_DUMP = re.compile(r"^(?:CREATE\s+USER|GRANT|FLUSH|/\*!\d+\s+SET\s+NAMES)\b", re.I)
_META_DB = "ipr_flow_meta"


class MySQLBackend:
    """A MariaDB/MySQL server holding the dump; the agent runs as a read-only user.

    ``url`` is an account that may create databases and users (used once, to
    load the dump and create the read-only user); every query afterwards runs
    as ``readonly_user`` with SELECT on the dump's databases only.
    """

    kind = "mysql"

    def __init__(
        self,
        dump: Dump,
        url: str,
        statement_timeout_s: float = 5.0,
        max_rows: int = 100_000,
        readonly_user: str = "ipr_agent",
        readonly_password: str = "ipr_agent",
        connect_timeout_s: float = 10.0,
    ):
        try:
            import mysql.connector  # noqa: F401
        except ImportError as e:
            raise ImportError("the mysql backend needs mysql-connector-python: pip install 'ipr-flow[intercode_sql]'") from e
        self.dump = dump
        self.url = MySQLURL.parse(url)
        self.statement_timeout_s = float(statement_timeout_s)
        self.max_rows = int(max_rows)
        self.readonly_user = readonly_user
        self.readonly_password = readonly_password
        self.connect_timeout_s = connect_timeout_s
        self.flavor = ""
        self.load_s = self.ensure_loaded()
        self._cnx: Any = None
        self._db: str | None = None

    # -- administration (once) --

    def _connect(self, user: str | None = None, password: str | None = None, database: str | None = None) -> Any:
        import mysql.connector

        try:
            # use_pure: the C extension's build may not load (OpenSSL mismatch) and
            # the two return some types differently; one code path everywhere.
            return mysql.connector.connect(
                **self.url.connect_args(user, password),
                database=database,
                use_pure=True,
                autocommit=True,
                charset="utf8mb4",
                collation="utf8mb4_general_ci",
                connection_timeout=self.connect_timeout_s,
            )
        except mysql.connector.Error as e:
            raise EnvError(f"cannot connect to {self.url.redacted()} as {user or self.url.user}: {e}") from e

    def ensure_loaded(self) -> float:
        """Load the dump unless this server already holds it; create the read-only user. Returns seconds spent loading (0 when skipped)."""
        cnx = self._connect()
        try:
            cur = cnx.cursor()
            cur.execute("SELECT VERSION(), @@lower_case_table_names")
            version, lctn = cur.fetchone()
            self.flavor = "mariadb" if "mariadb" in str(version).lower() else "mysql"
            if int(lctn) != 1:
                raise EnvError(
                    f"{self.url.redacted()} runs with lower_case_table_names={lctn}: InterCode-SQL needs 1 "
                    "(the gold queries mix table-name case); start the server with --lower-case-table-names=1"
                )
            cur.execute("SELECT GET_LOCK('ipr_flow_intercode_sql_load', 600)")
            if cur.fetchone()[0] != 1:
                raise EnvError("timed out waiting for another process to load the InterCode-SQL dump")
            try:
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{_META_DB}`")
                cur.execute(f"CREATE TABLE IF NOT EXISTS `{_META_DB}`.`loaded_dumps` (sha256 CHAR(64) PRIMARY KEY, loaded_at DATETIME, seconds DOUBLE)")
                cur.execute(f"SELECT seconds FROM `{_META_DB}`.`loaded_dumps` WHERE sha256 = %s", (self.dump.sha256,))
                row = cur.fetchone()
                seconds = 0.0
                if row is None:
                    seconds = self._load(cur)
                    cur.execute(f"DELETE FROM `{_META_DB}`.`loaded_dumps`")
                    cur.execute(f"INSERT INTO `{_META_DB}`.`loaded_dumps` VALUES (%s, NOW(), %s)", (self.dump.sha256, seconds))
                self._create_readonly_user(cur)
            finally:
                cur.execute("SELECT RELEASE_LOCK('ipr_flow_intercode_sql_load')")
                cur.fetchall()
            return seconds
        finally:
            cnx.close()

    def _load(self, cur: Any) -> float:
        t0 = time.perf_counter()
        for db in self.dump.databases.values():
            cur.execute(f"DROP DATABASE IF EXISTS `{db.name}`")
            cur.execute(f"CREATE DATABASE `{db.name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
            cur.execute(f"USE `{db.name}`")
            for stmt in db.statements:
                if not _SKIP_DUMP.match(stmt):
                    cur.execute(stmt)
                    if cur.with_rows:
                        cur.fetchall()
            # Fresh statistics now, not from InnoDB's background recalculation a few
            # seconds after the bulk load: that changed join plans mid-session and with
            # them which of several tied rows ``ORDER BY ... LIMIT 1`` returned (the
            # gold query then disagreed with itself). No writes follow, so they stay.
            for table in db.tables:
                cur.execute(f"ANALYZE TABLE `{db.name}`.`{table.name}`")
                cur.fetchall()
        return time.perf_counter() - t0

    def _create_readonly_user(self, cur: Any) -> None:
        user, pw = self.readonly_user, self.readonly_password
        cur.execute("CREATE USER IF NOT EXISTS %s@'%%' IDENTIFIED BY %s", (user, pw))
        cur.execute("ALTER USER %s@'%%' IDENTIFIED BY %s", (user, pw))
        for db in self.dump.databases.values():
            cur.execute(f"GRANT SELECT, SHOW VIEW ON `{db.name.lower()}`.* TO %s@'%%'", (user,))

    # -- the agent's session --

    def _session(self) -> Any:
        # No ping per statement (a round trip): a dead connection surfaces as an
        # error, which closes it, and the next reset() reconnects.
        if self._cnx is None:
            self._cnx = self._connect(self.readonly_user, self.readonly_password)
            self._db = None
            self._configure(self._cnx)
        return self._cnx

    def _configure(self, cnx: Any) -> None:
        cur = cnx.cursor()
        if self.flavor == "mariadb":
            cur.execute(f"SET SESSION max_statement_time = {self.statement_timeout_s:.3f}")
        else:  # MySQL: SELECT statements only, in milliseconds
            cur.execute(f"SET SESSION max_execution_time = {int(self.statement_timeout_s * 1000)}")
        # The server stops after max_rows + 1 rows unless the query says LIMIT itself.
        cur.execute(f"SET SESSION sql_select_limit = {self.max_rows + 1}")
        cur.close()

    def reset_session(self, db: str) -> None:
        import mysql.connector

        name = self.dump.database(db).name.lower()
        for attempt in range(2):
            try:
                fresh = self._cnx is None
                cnx = self._session()
                if not fresh:
                    # COM_RESET_CONNECTION: drops the user variables and session
                    # settings the previous episode may have left; configure again.
                    cnx.cmd_reset_connection()
                    self._configure(cnx)
                cnx.database = name
                self._db = name
                return
            except (mysql.connector.Error, EnvError) as e:
                self.close()
                if attempt:
                    raise EnvError(f"cannot start a MySQL session on {name}: {e}") from e

    def execute(self, db: str, sql: str) -> QueryResult:
        import mysql.connector

        name = self.dump.database(db).name.lower()
        cnx = self._session()
        try:
            if self._db != name:
                cnx.database = name
                self._db = name
            cur = cnx.cursor()  # unbuffered: stop reading after max_rows + 1
            cur.execute(sql)
            if not cur.with_rows:
                cur.close()
                return QueryResult(rows=None)
            rows = cur.fetchmany(self.max_rows + 1)
            if len(rows) > self.max_rows:
                # The rest is still streaming: dropping the connection is the cheap way out.
                self.close()
                return QueryResult(error=f"the result has more than {self.max_rows} rows")
            cur.close()
        except mysql.connector.Error as e:
            errno = getattr(e, "errno", None)
            if _is_client_error(errno):
                self.close()
                raise EnvError(f"lost the MySQL connection: {e}") from e
            if errno in (1969, 3024):  # ER_STATEMENT_TIMEOUT (MariaDB), ER_QUERY_TIMEOUT (MySQL)
                return QueryResult(error=TIMEOUT_MESSAGE, timed_out=True)
            return QueryResult(error=getattr(e, "msg", None) or str(e), refused=errno in _PRIVILEGE_ERRNOS)
        return QueryResult(rows=tuple(tuple(plain_value(v) for v in r) for r in rows))

    def close(self) -> None:
        if self._cnx is not None:
            try:
                self._cnx.close()
            except Exception:  # a dead connection cannot be closed politely
                pass
            self._cnx = None
            self._db = None


# --- a throwaway MariaDB server (tests, benchmarks) ----------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mariadb() -> tuple[str, str] | None:
    """(mariadbd, mariadb-install-db) paths, or None when MariaDB is not installed (see .ci/mariadb.sh)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/usr/local/sbin"
    server = shutil.which("mariadbd", path=path) or shutil.which("mysqld", path=path)
    install = shutil.which("mariadb-install-db", path=path) or shutil.which("mysql_install_db", path=path)
    return (server, install) if server and install else None


class LocalMariaDB:
    """mariadbd on 127.0.0.1 (a free port) with its own datadir, stopped by PID.

    Runs with ``lower_case_table_names=1`` as InterCode's server did. ``url`` is
    the root account (loopback only, no password) for ``MySQLBackend``.

        with LocalMariaDB() as server:
            env = InterCodeSQLEnv(backend="mysql", mysql_url=server.url)
    """

    def __init__(self, workdir: str | Path | None = None, port: int | None = None, startup_timeout_s: float = 60.0):
        found = find_mariadb()
        if found is None:
            raise FileNotFoundError("MariaDB is not installed (mariadbd, mariadb-install-db): run .ci/mariadb.sh")
        self.server_bin, self.install_bin = found
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="ipr-mariadb-"))
        self.port = port or _free_port()
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.start_s = 0.0

    @property
    def url(self) -> str:
        return f"mysql://root@127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _user_args(self) -> list[str]:
        return ["--user=root"] if os.geteuid() == 0 else []

    def start(self) -> "LocalMariaDB":
        t0 = time.perf_counter()
        data = self.workdir / "data"
        log = self.workdir / "error.log"
        if not (data / "mysql").exists():
            data.mkdir(parents=True, exist_ok=True)
            r = subprocess.run(
                [self.install_bin, "--no-defaults", f"--datadir={data}", "--auth-root-authentication-method=normal", "--skip-test-db", "--lower-case-table-names=1", *self._user_args()],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if r.returncode != 0:
                raise RuntimeError(f"mariadb-install-db failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
        args = [
            self.server_bin,
            "--no-defaults",
            f"--datadir={data}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.workdir / 'mysqld.sock'}",
            f"--pid-file={self.workdir / 'mysqld.pid'}",
            f"--log-error={log}",
            "--lower-case-table-names=1",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--performance-schema=OFF",
            "--innodb-buffer-pool-size=32M",
            "--innodb-log-file-size=16M",
            "--max-connections=64",
            *self._user_args(),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                self.proc = None
                raise RuntimeError(f"mariadbd exited during start-up:\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"mariadbd did not accept connections on port {self.port} within {self.startup_timeout_s:.0f} s")
        self.start_s = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalMariaDB":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
