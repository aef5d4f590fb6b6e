"""What the agent may run, and the limits every backend enforces.

The adapter vets each action before it reaches a database: one statement, no
executable comments (``/*! ... */``), no write, DDL or session statement (by
its first keyword). What slips past (``WITH x AS (...) DELETE ...``) meets the
backend's own guard: the SQLite authorizer or the server's read-only user.
Both backends enforce the same ``Limits``: a per-statement deadline and a
result-size cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ipr_core.envs.sql.lexer import first_keyword, has_executable_comment, split_statements, strip_comments
from ipr_core.envs.sql.results import QueryResult

TIMEOUT_MESSAGE = "Query execution was interrupted (max_statement_time exceeded)"

READ_KEYWORDS = {"SELECT", "WITH", "VALUES"}
META_KEYWORDS = {"SHOW", "DESC", "DESCRIBE", "EXPLAIN"}
WRITE_KEYWORDS = {
    "INSERT", "UPDATE", "DELETE", "REPLACE", "MERGE", "UPSERT", "CREATE", "DROP", "ALTER", "TRUNCATE", "RENAME",
    "GRANT", "REVOKE", "SET", "USE", "LOCK", "UNLOCK", "CALL", "LOAD", "HANDLER", "DO", "PREPARE", "EXECUTE",
    "DEALLOCATE", "BEGIN", "START", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "FLUSH", "KILL", "INSTALL",
    "UNINSTALL", "ANALYZE", "OPTIMIZE", "REPAIR", "CHECK", "CHECKSUM", "ATTACH", "DETACH", "PRAGMA", "VACUUM",
    "REINDEX", "SHUTDOWN", "RESET", "PURGE", "CHANGE", "BINLOG", "XA", "IMPORT", "BACKUP", "RESTORE", "CACHE",
}  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """Per-statement limits, the same on every backend."""

    statement_timeout_s: float = 5.0  # a longer statement is interrupted: TIMEOUT_MESSAGE
    max_rows: int = 100_000  # a larger result is an error, not a flood of memory

    def __post_init__(self) -> None:
        if not self.statement_timeout_s > 0:
            raise ValueError(f"statement_timeout_s must be > 0, got {self.statement_timeout_s}")
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")

    def timed_out(self) -> QueryResult:
        return QueryResult(error=TIMEOUT_MESSAGE, timed_out=True)

    def too_many_rows(self) -> QueryResult:
        return QueryResult(error=f"the result has more than {self.max_rows} rows")

    def capped(self, rows: Sequence[Sequence[object]]) -> QueryResult:
        """``rows`` (fetched up to ``max_rows + 1``) as a result, or the too-many-rows error."""
        return self.too_many_rows() if len(rows) > self.max_rows else QueryResult.of_rows(rows)


def single_statement(sql: str) -> tuple[str, QueryResult | None]:
    """(the one statement of ``sql``, None) or ("", the refusal) for several statements
    or an executable comment."""
    stmts = split_statements(sql)
    if len(stmts) > 1:
        return "", QueryResult(error=f"only one SQL statement per action is allowed (found {len(stmts)} separated by ';'); nothing was run")
    if has_executable_comment(stmts[0]):
        return "", QueryResult(error="executable comments (/*! ... */) are not allowed; nothing was run")
    return stmts[0], None


def keyword_verdict(stmt: str) -> tuple[QueryResult, bool] | None:
    """None when ``stmt`` is a read that may run; else (the answer, refused) without running it."""
    kw = first_keyword(stmt)
    if kw in WRITE_KEYWORDS:
        return QueryResult(error=f"the database is read-only: {kw} statements are not allowed (only SELECT, SHOW TABLES and DESCRIBE <table>); nothing was run"), True
    if kw in META_KEYWORDS:
        return QueryResult(error=f"this {kw} form is not supported: use SHOW TABLES or DESCRIBE <table>"), True
    if kw not in READ_KEYWORDS:
        # What MySQL answers to prose or unknown statements, without running them.
        near = strip_comments(stmt)[:80].replace("'", "\\'")
        return QueryResult(error=f"You have an error in your SQL syntax; check the manual that corresponds to your MySQL server version for the right syntax to use near '{near}' at line 1"), False
    return None
