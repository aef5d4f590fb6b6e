"""SQL plumbing for InterCode-SQL: the MySQL dump, two backends serving it, and
what the adapter (``ipr_core/envs/intercode_sql.py``) vets, answers and prints.

InterCode-SQL ships its 20 Spider-dev databases as one MySQL 8 dump. Both
backends serve the same databases and return rows normalised the same way, so
tasks, observations and rewards agree (``docs/intercode_sql.md`` lists where
they cannot). One module per concern:

- ``lexer``: the MySQL tokenizer (statements, comments, literals, MySQL -> SQLite literals);
- ``dump``: the dump parsed into databases, tables and columns (``parse_dump``);
- ``results``: ``QueryResult``, values normalised across backends, observation text;
- ``sandbox``: what the agent may run (one read statement, the allowed functions, no
  system names: ``vet_names``) and ``Limits`` (timeout, rows, columns, bytes);
- ``backend``: the ``SQLBackend`` protocol;
- ``sqlite_cache``, ``sqlite_compat``, ``sqlite``: the embedded default, converted
  once into cached read-only SQLite files with MySQL semantics emulated;
- ``mysql``: a MariaDB/MySQL server, loaded once, queried as a read-only user;
- ``meta``: SHOW TABLES / DESCRIBE answered from the dump's schema;
- ``tasks``: InterCode task files and their train/test split.

A throwaway local MariaDB for tests and benchmarks is ``tests/mariadb_fixture.py``.
"""

from ipr_core.envs.sql.backend import SQLBackend
from ipr_core.envs.sql.dump import Column, Database, Dump, Table, default_dump_path, parse_create_table, parse_dump
from ipr_core.envs.sql.lexer import first_keyword, function_calls, has_executable_comment, mysql_string_value, mysql_to_sqlite, quote_ident, significant_tokens, split_statements, strip_comments, tokenize
from ipr_core.envs.sql.meta import meta_command, tables_in_query
from ipr_core.envs.sql.mysql import MySQLBackend, MySQLURL, ReadOnlyAccount
from ipr_core.envs.sql.results import ERROR_PREFIX, NO_OUTPUT, OBS_LIMIT, QueryResult, format_observation, plain_value
from ipr_core.envs.sql.sandbox import (
    ALLOWED_FUNCTIONS,
    META_KEYWORDS,
    READ_KEYWORDS,
    SYSTEM_REFUSAL,
    TIMEOUT_MESSAGE,
    WRITE_KEYWORDS,
    Limits,
    function_refusal,
    keyword_verdict,
    single_statement,
    system_refusal,
    value_bytes,
    vet_names,
)
from ipr_core.envs.sql.sqlite import SQLiteBackend
from ipr_core.envs.sql.sqlite_cache import CONVERTER_VERSION, build_sqlite, default_cache_root, sqlite_build_info, sqlite_cache_dir, sqlite_create_table
from ipr_core.envs.sql.tasks import HARDNESS, PAPER_TEST_SIZE, SQLRecord, default_task_file, load_records, resolve_test_size, split_records

__all__ = [
    "ALLOWED_FUNCTIONS", "CONVERTER_VERSION", "ERROR_PREFIX", "HARDNESS", "META_KEYWORDS", "NO_OUTPUT", "OBS_LIMIT",
    "PAPER_TEST_SIZE", "READ_KEYWORDS", "SYSTEM_REFUSAL", "TIMEOUT_MESSAGE", "WRITE_KEYWORDS", "Column", "Database",
    "Dump", "Limits", "MySQLBackend", "MySQLURL", "QueryResult", "ReadOnlyAccount", "SQLBackend", "SQLiteBackend",
    "SQLRecord", "Table", "build_sqlite", "default_cache_root", "default_dump_path", "default_task_file",
    "first_keyword", "format_observation", "function_calls", "function_refusal", "has_executable_comment",
    "keyword_verdict", "load_records", "meta_command", "mysql_string_value", "mysql_to_sqlite", "parse_create_table",
    "parse_dump", "plain_value", "quote_ident", "resolve_test_size", "significant_tokens", "single_statement",
    "split_records", "split_statements", "sqlite_build_info", "sqlite_cache_dir", "sqlite_create_table",
    "strip_comments", "system_refusal", "tables_in_query", "tokenize", "value_bytes", "vet_names",
]  # fmt: skip
