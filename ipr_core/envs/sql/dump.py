"""The InterCode-SQL dump: its statements per database and their schema.

InterCode-SQL ships its 20 Spider-dev databases as one MySQL 8 dump.
``parse_dump`` splits it into per-database statements (with the quote- and
comment-aware tokenizer) and parses every ``CREATE TABLE`` into ``Table``s,
whose ``describe_rows`` answer ``DESCRIBE`` as MySQL 8 prints it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ipr_core.envs.sql.lexer import mysql_string_value, split_statements, tokenize


def default_dump_path() -> Path:
    """The MySQL dump bundled with intercode-bench (byte-identical to InterCode's ic_spider_dbs.sql)."""
    import importlib.util

    spec = importlib.util.find_spec("intercode")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("intercode-bench is not installed: pip install 'ipr-flow[intercode_sql]'")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "datasets" / "spider_dev.sql"


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
