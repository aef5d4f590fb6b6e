"""The embedded backend: read-only SQLite copies of the dump's databases.

The copies come from the cache (``sqlite_cache.py``) and are opened read-only
three times over: URI ``mode=ro&immutable=1``, ``PRAGMA query_only`` and an
authorizer that allows only reads; a progress handler interrupts a statement
past ``Limits.statement_timeout_s``. MySQL semantics that matter for Spider are
emulated (``sqlite_compat.py``).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from ipr_core.envs.sql.dump import Dump
from ipr_core.envs.sql.lexer import mysql_to_sqlite
from ipr_core.envs.sql.results import QueryResult
from ipr_core.envs.sql.sandbox import Limits
from ipr_core.envs.sql.sqlite_cache import build_sqlite
from ipr_core.envs.sql.sqlite_compat import column_scales, mysql_error_message, register_mysql_semantics, scale_avg_calls

# Authorizer action codes a read-only query needs; everything else (writes, DDL,
# PRAGMA, ATTACH, transactions) is denied even if it slipped past the classifier.
_SQLITE_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
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
        self._scales = {key: column_scales(db) for key, db in dump.databases.items()}

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
            register_mysql_semantics(con)
            con.set_authorizer(self._authorize)
            con.set_progress_handler(self._progress, 2000)
            self._conns[key] = con
        return con

    def reset_session(self, db: str) -> None:
        # Reads cannot change a connection's state (the authorizer denies PRAGMA,
        # ATTACH, temp tables), so a clean session is the cached connection.
        self._conn(db)

    def execute(self, db: str, sql: str) -> QueryResult:
        con = self._conn(db)
        self._deadline = time.monotonic() + self.limits.statement_timeout_s
        try:
            cur = con.execute(scale_avg_calls(mysql_to_sqlite(sql), self._scales[db.lower()]))
            if cur.description is None:
                return QueryResult(rows=None)
            rows = cur.fetchmany(self.limits.max_rows + 1)
            cur.close()
        except (sqlite3.Error, OverflowError, ValueError) as e:  # ProgrammingError for 2 statements, ValueError for NUL
            if isinstance(e, sqlite3.OperationalError) and str(e) == "interrupted":
                return self.limits.timed_out()
            return QueryResult(error=mysql_error_message(str(e), db), refused=str(e) in _SQLITE_REFUSALS)
        finally:
            self._deadline = float("inf")
        return self.limits.capped(rows)

    def close(self) -> None:
        for con in self._conns.values():
            con.close()
        self._conns.clear()
