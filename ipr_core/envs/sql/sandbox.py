"""What the agent may run, and the limits every backend enforces.

The adapter vets each action before it reaches a database: one statement, no
executable comments (``/*! ... */``), no write, DDL or session statement (by
its first keyword). What slips past (``WITH x AS (...) DELETE ...``) meets the
backend's own guard: the SQLite authorizer or the server's read-only user.

Both backends also run ``vet_names`` on every statement: only the functions of
``ALLOWED_FUNCTIONS`` may be called, and nothing that tells which database
system runs (catalog tables, ``@@`` variables, version and user functions) may
be named; the SQLite authorizer enforces the same list inside the engine. Both
enforce the same ``Limits``: a per-statement deadline and bounds on a result's
rows, columns and bytes, checked while the rows are fetched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from ipr_core.envs.sql.lexer import first_keyword, function_calls, has_executable_comment, significant_tokens, split_statements, strip_comments
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


# The functions a statement may call, on both backends (lowercase names). What
# a Spider answer needs (the gold queries call COUNT, SUM, AVG, MIN and MAX) and
# common functions that cannot build a value much larger than their arguments.
# Left out on purpose: anything that reads or changes the system (LOAD_EXTENSION,
# FTS3_TOKENIZER, SLEEP, GET_LOCK, LOAD_FILE), and amplifiers (REPEAT, LPAD,
# SPACE, ZEROBLOB, RANDOMBLOB, PRINTF, CONCAT, REPLACE, CHAR, CAST AS BINARY(n)):
# a server builds their value before the client can count its bytes.
ALLOWED_FUNCTIONS = frozenset(
    "count sum avg min max group_concat "  # aggregates (GROUP_CONCAT is bounded by max_cell_bytes in both engines)
    "abs round floor ceil ceiling mod "  # numbers
    "coalesce ifnull nullif if iif "  # NULLs and conditions
    "lower upper lcase ucase length char_length character_length substr substring trim ltrim rtrim instr left right "
    "cast extract date time datetime year month day strftime "  # casts and dates
    "row_number rank dense_rank".split()  # window functions
)
# Operators SQLite runs as function calls (its authorizer sees them by name).
SQLITE_OPERATOR_FUNCTIONS = frozenset({"like"})
# Names that identify the database system, its version, configuration or the
# account: refused with SYSTEM_REFUSAL (also as calls, before the function check).
SYSTEM_SCHEMAS = frozenset({"information_schema", "performance_schema"})
SYSTEM_QUALIFIERS = frozenset({"mysql", "sys"})  # as ``mysql.user``, ``sys.version_major()``
SYSTEM_WORDS = frozenset({"current_user", "current_role"})  # MySQL functions callable without '()'
SYSTEM_FUNCTIONS = frozenset({"version", "database", "schema", "user", "session_user", "system_user", "connection_id"})
SYSTEM_REFUSAL = "queries about the database system itself (its catalog, version, variables or account) are not allowed: query the task's tables; nothing was run"


def function_refusal(name: str) -> QueryResult:
    """The refusal of a call to ``name``, worded the same on both backends."""
    return QueryResult(error=f"function {name.lower()}() is not allowed: only common aggregate, numeric, text and date functions may be called; nothing was run", refused=True)


def system_refusal() -> QueryResult:
    """The refusal of a statement that names the database system (one message, no backend named)."""
    return QueryResult(error=SYSTEM_REFUSAL, refused=True)


def _names_system(tokens: list[tuple[str, str]]) -> bool:
    for i, (kind, text) in enumerate(tokens):
        low = text.lower()
        if (kind, text) == ("punct", "@@"):
            return True  # @@version, @@session.sql_mode, @@`datadir`
        if kind not in ("word", "ident"):
            continue
        if low in SYSTEM_SCHEMAS or low.startswith("sqlite_") or (kind == "word" and low in SYSTEM_WORDS):
            return True  # sqlite_master, sqlite_schema, sqlite_temp_master, sqlite_version, ...
        if low in SYSTEM_QUALIFIERS and tokens[i + 1 : i + 2] == [("punct", ".")]:
            return True
    return False


def vet_names(stmt: str) -> QueryResult | None:
    """None when ``stmt`` calls only allowed functions and names nothing of the
    database system; else the refusal, without running it."""
    tokens = significant_tokens(stmt)
    if _names_system(tokens):
        return system_refusal()
    for name in function_calls(tokens):
        if name in SYSTEM_FUNCTIONS:
            return system_refusal()
        if name not in ALLOWED_FUNCTIONS:
            return function_refusal(name)
    return None


def value_bytes(v: object) -> int:
    """What a value weighs against the byte limits: UTF-8 bytes of a text, bytes of a
    blob, 8 for a number, a date or NULL."""
    if isinstance(v, str):
        return len(v) if v.isascii() else len(v.encode("utf-8", "surrogatepass"))
    if isinstance(v, (bytes, bytearray)):
        return len(v)
    if isinstance(v, memoryview):
        return v.nbytes
    return 8


@dataclass(frozen=True)
class Limits:
    """Per-statement limits, the same on every backend.

    The byte limits bound a result before it becomes text: SQLite does not build
    a value over ``max_cell_bytes`` at all (its LENGTH limit), MariaDB's
    GROUP_CONCAT stops there, and both backends count bytes row by row while
    fetching, stopping at the first limit broken. One row weighs at most
    ``max_columns * max_cell_bytes``.
    """

    statement_timeout_s: float = 5.0  # a longer statement is interrupted: TIMEOUT_MESSAGE
    max_rows: int = 100_000  # a larger result is an error, not a flood of memory
    max_cell_bytes: int = 65_536  # one value (Spider's longest stored value: 60 bytes)
    max_result_bytes: int = 4 * 1024 * 1024  # all values (Spider's largest table: 150 kB)
    max_columns: int = 256  # Spider's widest table: 50 columns

    def __post_init__(self) -> None:
        if not self.statement_timeout_s > 0:
            raise ValueError(f"statement_timeout_s must be > 0, got {self.statement_timeout_s}")
        for name in ("max_rows", "max_cell_bytes", "max_result_bytes", "max_columns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_cell_bytes <= min(self.max_result_bytes, 2**31 - 1):
            # SQLite's LENGTH limit is at most 2**31 - 1; a value over the total could never be returned.
            raise ValueError(f"max_cell_bytes must be <= max_result_bytes and < 2**31, got {self.max_cell_bytes} (max_result_bytes={self.max_result_bytes})")

    def timed_out(self) -> QueryResult:
        return QueryResult(error=TIMEOUT_MESSAGE, timed_out=True)

    def too_many_rows(self) -> QueryResult:
        return QueryResult(error=f"the result has more than {self.max_rows} rows")

    def too_many_columns(self) -> QueryResult:
        return QueryResult(error=f"the result has more than {self.max_columns} columns")

    def cell_too_large(self) -> QueryResult:
        return QueryResult(error=f"the result has a value larger than {self.max_cell_bytes} bytes")

    def result_too_large(self) -> QueryResult:
        return QueryResult(error=f"the result is larger than {self.max_result_bytes} bytes")

    def collect(self, rows: Iterable[Sequence[object]]) -> QueryResult:
        """The rows as a result, reading one at a time and stopping at the first limit
        broken (rows, a value's bytes, the total bytes): that error instead."""
        kept: list[Sequence[object]] = []
        total = 0
        for row in rows:
            if len(kept) == self.max_rows:
                return self.too_many_rows()
            for v in row:
                size = value_bytes(v)
                if size > self.max_cell_bytes:
                    return self.cell_too_large()
                total += size
            if total > self.max_result_bytes:
                return self.result_too_large()
            kept.append(row)
        return QueryResult.of_rows(kept)


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
