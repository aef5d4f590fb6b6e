"""The dump converted once into one SQLite file per database, cached on disk.

The cache folder is ``<cache>/intercode_sql/<dump sha256[:16]>-v<CONVERTER_VERSION>/``:
content-addressed, so a changed dump or converter gets a new folder. It is
built under a temporary name and renamed into place with ``_COMPLETE.json``
inside, so concurrent builders never see half a cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from ipr_core.envs.sql.dump import Database, Dump, Table
from ipr_core.envs.sql.lexer import mysql_to_sqlite, quote_ident
from ipr_core.envs.sql.sqlite_compat import MYSQL_CI, register_mysql_semantics

# Bump when the SQLite conversion changes: the cache folder name carries it.
CONVERTER_VERSION = 2


def default_cache_root() -> Path:
    return Path(os.environ.get("IPR_CACHE_DIR") or Path.home() / ".cache" / "ipr-flow")


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
            write_sqlite_database(tmp / f"{key}.sqlite", db)
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


def write_sqlite_database(path: Path, db: Database) -> None:
    """``db``'s tables (with their indexes) and rows into a new SQLite file at ``path``."""
    con = sqlite3.connect(path, isolation_level=None)
    register_mysql_semantics(con)
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


def sqlite_build_info(path: Path) -> dict:
    return json.loads((path / _COMPLETE).read_text())
