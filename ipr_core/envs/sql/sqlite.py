"""The embedded backend: read-only SQLite copies of the dump's databases.

The copies come from the cache (``sqlite_cache.py``) and are opened read-only
three times over: URI ``mode=ro&immutable=1``, ``PRAGMA query_only`` and an
authorizer that allows only reads of the database's own tables and calls of
the allowed functions (``sandbox.py``); a progress handler interrupts a
statement past ``Limits.statement_timeout_s``, and the engine's LENGTH and
COLUMN limits keep it from building a value or a row over ``Limits``. MySQL
semantics that matter for Spider are emulated (``sqlite_compat.py``).
"""

from __future__ import annotations

import functools
import sqlite3
import time
from pathlib import Path

from ipr_core.envs.sql.dump import Dump
from ipr_core.envs.sql.lexer import mysql_to_sqlite
from ipr_core.envs.sql.results import QueryResult
from ipr_core.envs.sql.sandbox import ALLOWED_FUNCTIONS, SQLITE_OPERATOR_FUNCTIONS, Limits, function_refusal, system_refusal, vet_names
from ipr_core.envs.sql.sqlite_cache import build_sqlite
from ipr_core.envs.sql.sqlite_compat import column_scales, mysql_error_message, register_mysql_semantics, scale_avg_calls

# Authorizer action codes a read-only query needs besides reads and calls (checked
# by name); everything else (writes, DDL, PRAGMA and its table-valued functions,
# ATTACH, virtual tables, transactions) is denied even if it slipped past the classifier.
_SQLITE_READ_ACTIONS = {sqlite3.SQLITE_SELECT, getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
_SQLITE_FUNCTIONS = ALLOWED_FUNCTIONS | SQLITE_OPERATOR_FUNCTIONS
_SQLITE_REFUSALS = {"not authorized", "attempt to write a readonly database"}


class SQLiteBackend:
    """Read-only SQLite copies of the dump's databases, one cached connection per database."""

    kind = "sqlite"

    def __init__(self, dump: Dump, cache_root: str | Path | None = None, limits: Limits = Limits()):
        self.dump = dump
        self.limits = limits
        t0 = time.perf_counter()
        self.path = build_sqlite(dump, cache_root)
        self.open_s = time.perf_counter() - t0
        self._conns: dict[str, sqlite3.Connection] = {}
        self._deadline = float("inf")
        self._denied: QueryResult | None = None  # why the authorizer denied the running statement
        self._scales = {key: column_scales(db) for key, db in dump.databases.items()}
        widest = max((len(t.columns) for d in dump.databases.values() for t in d.tables), default=0)
        if limits.max_columns < widest:
            # SQLite's COLUMN limit also bounds table definitions: the schema would not load.
            raise ValueError(f"max_columns={limits.max_columns} is below the dump's widest table ({widest} columns)")

    def _progress(self) -> int:
        # Called every N virtual-machine steps: a non-zero return interrupts the statement.
        return 1 if time.monotonic() > self._deadline else 0

    def _authorize(self, tables: frozenset[str], action: int, arg1: str | None, arg2: str | None, *_: object) -> int:
        """Called while a statement is prepared: reads of ``tables`` (the database's
        own) and calls of the allowed functions pass; a denial records the refusal."""
        if action in _SQLITE_READ_ACTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ and (arg1 or "").lower() in tables:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _SQLITE_FUNCTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ:
            self._denied = system_refusal()  # sqlite_master, sqlite_temp_master, ... (also as FROM 'sqlite_master')
        elif action == sqlite3.SQLITE_FUNCTION:
            self._denied = function_refusal(arg2 or "")
        return sqlite3.SQLITE_DENY

    def _conn(self, db: str) -> sqlite3.Connection:
        key = self.dump.database(db).name.lower()
        con = self._conns.get(key)
        if con is None:
            uri = (self.path / f"{key}.sqlite").as_uri() + "?mode=ro&immutable=1"
            # check_same_thread=False: an EnvPool may step this env from different
            # threads, one at a time.
            con = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA query_only = ON")
            register_mysql_semantics(con)
            # The engine builds no string or blob (nor row) over max_cell_bytes and no
            # result over max_columns, so zeroblob(2e8) fails before allocating.
            con.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.limits.max_cell_bytes)
            con.setlimit(sqlite3.SQLITE_LIMIT_COLUMN, self.limits.max_columns)
            tables = frozenset(t.name.lower() for t in self.dump.database(key).tables)
            con.set_authorizer(functools.partial(self._authorize, tables))
            con.set_progress_handler(self._progress, 2000)
            self._conns[key] = con
        return con

    def reset_session(self, db: str) -> None:
        # Reads cannot change a connection's state (the authorizer denies PRAGMA,
        # ATTACH, temp tables), so a clean session is the cached connection.
        self._conn(db)

    def execute(self, db: str, sql: str) -> QueryResult:
        refusal = vet_names(sql)  # the same check, and refusal text, as on MariaDB
        if refusal is not None:
            return refusal
        con = self._conn(db)
        self._denied = None
        self._deadline = time.monotonic() + self.limits.statement_timeout_s
        try:
            cur = con.execute(scale_avg_calls(mysql_to_sqlite(sql), self._scales[db.lower()]))
            if cur.description is None:
                return QueryResult(rows=None)
            result = self.limits.collect(cur)  # row by row: stops at the first limit broken
            cur.close()
        except (sqlite3.Error, OverflowError, ValueError) as e:  # ProgrammingError for 2 statements, ValueError for NUL
            return self._error(e, db)
        finally:
            self._deadline = float("inf")
        return result

    def _error(self, e: Exception, db: str) -> QueryResult:
        """SQLite's exception as the result both backends give for the same cause."""
        msg = str(e)
        if isinstance(e, sqlite3.OperationalError) and msg == "interrupted":
            return self.limits.timed_out()
        if self._denied is not None:  # "access to sqlite_master.type is prohibited", "not authorized to use function: GLOB"
            return self._denied
        if msg == "string or blob too big":  # the LENGTH limit: a value (or row) over max_cell_bytes
            return self.limits.cell_too_large()
        if msg == "too many columns in result set":  # the COLUMN limit
            return self.limits.too_many_columns()
        return QueryResult(error=mysql_error_message(msg, db), refused=msg in _SQLITE_REFUSALS)

    def close(self) -> None:
        for con in self._conns.values():
            con.close()
        self._conns.clear()
