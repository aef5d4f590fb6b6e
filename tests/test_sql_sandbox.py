"""The InterCode-SQL sandbox on both backends: results bounded in bytes before they
become text, only listed functions callable, nothing that names the database
system. Each case must come back (refused or cut) within a bounded time and
memory. The MariaDB cases run on the test's own mariadbd (``mariadb_fixture``)
and skip when MariaDB is not installed (.ci/mariadb.sh)."""

from __future__ import annotations

import resource
import time
import tracemalloc

import pytest

pytest.importorskip("intercode")  # the dump ships with intercode-bench

from conftest import SHARED_DATA  # noqa: E402

from mariadb_fixture import serve_or_skip  # noqa: E402

from ipr_core.envs.intercode_sql import InterCodeSQLEnv  # noqa: E402
from ipr_core.envs.sql import ALLOWED_FUNCTIONS, SYSTEM_REFUSAL, Limits, default_task_file, function_calls, load_records, split_statements, vet_names  # noqa: E402
from ipr_core.types import Task  # noqa: E402

FULL_TASKS = SHARED_DATA / "intercode_sql" / "ic_spider_dev.json"
WORLD = Task("sandbox-world_1", "intercode_sql", "train", 0, {"db": "world_1", "question": "?", "gold": "SELECT 1"})

MAX_SECONDS = 5.0  # every refusal or cut comes back within this (statement_timeout_s=2)
MAX_PY_PEAK = 64 * 2**20  # Python allocations during the step (tracemalloc)
MAX_RSS_GROWTH = 128 * 2**20  # this process's peak RSS (the old zeroblob step took 1.7 GB)
MAX_SERVER_GROWTH = 128 * 2**20  # mariadbd's peak RSS


def FUNC(name: str) -> str:
    return f"Error executing query: function {name}() is not allowed: only common aggregate, numeric, text and date functions may be called; nothing was run"


SYSTEM = "Error executing query: " + SYSTEM_REFUSAL
CELL = "Error executing query: the result has a value larger than 65536 bytes"
TOTAL = "Error executing query: the result is larger than 4194304 bytes"

# The same observation on both backends.
CASES = [
    # values too large to build: refused before they reach an engine
    ("SELECT zeroblob(200000000)", FUNC("zeroblob")),
    ("SELECT repeat('x', 200000000)", FUNC("repeat")),
    ("SELECT length(lpad('x', 200000000, 'y'))", FUNC("lpad")),
    ("SELECT randomblob(200000000)", FUNC("randomblob")),
    ("WITH RECURSIVE r(s, n) AS (SELECT group_concat(Name), 0 FROM city UNION ALL SELECT CONCAT(s, s), n + 1 FROM r WHERE n < 30) SELECT s FROM r", FUNC("concat")),
    # functions that reach outside the sandbox, and any unlisted one
    ("SELECT fts3_tokenizer('simple')", FUNC("fts3_tokenizer")),
    ("SELECT fts3_tokenizer('evil', x'4141414141414141')", FUNC("fts3_tokenizer")),
    ("SELECT load_extension('/tmp/libevil.so')", FUNC("load_extension")),
    ("SELECT LOAD_EXTENSION('/tmp/libevil.so', 'init')", FUNC("load_extension")),
    ("SELECT sleep(30)", FUNC("sleep")),
    ("SELECT hex(Name) FROM city", FUNC("hex")),
    ("SELECT * FROM pragma_table_info('city')", FUNC("pragma_table_info")),
    # the backend, its version, catalog, variables or account
    ("SELECT * FROM sqlite_master", SYSTEM),
    ("SELECT name FROM main.sqlite_schema", SYSTEM),
    ("SELECT * FROM sqlite_temp_master", SYSTEM),
    ("SELECT sqlite_version()", SYSTEM),
    ("SELECT sqlite_source_id()", SYSTEM),
    ("SELECT @@version", SYSTEM),
    ("SELECT @@session.sql_mode", SYSTEM),
    ("SELECT version()", SYSTEM),
    ("SELECT VERSION /* spaced */ ()", SYSTEM),
    ("SELECT `version`()", SYSTEM),
    ("SELECT database(), user()", SYSTEM),
    ("SELECT current_user", SYSTEM),
    ("SELECT * FROM information_schema.tables", SYSTEM),
    ("SELECT table_name FROM `INFORMATION_SCHEMA`.`COLUMNS`", SYSTEM),
    ("SELECT * FROM performance_schema.threads", SYSTEM),
    ("SELECT user, password FROM mysql.user", SYSTEM),
    ("SELECT sys.version_major()", SYSTEM),
    # results too large: cut while fetching, before any text is built
    ("SELECT group_concat(a.Name) FROM city AS a, city AS b WHERE b.ID <= 3", CELL),
    ("SELECT '" + "x" * 70_000 + "'", CELL),
    ("SELECT (SELECT group_concat(Name) FROM city) FROM city LIMIT 200", TOTAL),
]
# What only one backend's dialect can say; its guard inside the engine answers.
SQLITE_CASES = [
    ("WITH RECURSIVE r(s, n) AS (SELECT 'x', 0 UNION ALL SELECT s || s, n + 1 FROM r WHERE n < 40) SELECT s FROM r", CELL),  # 2**40 bytes
    ("SELECT * FROM 'sqlite_master'", SYSTEM),  # a string as a table name: past the lexer, the authorizer denies the read
    ("SELECT Name FROM city WHERE Name GLOB 'A*'", FUNC("glob")),  # an operator SQLite runs as a function
    ("SELECT [zeroblob](200000000)", FUNC("zeroblob")),  # a [quoted] call the lexer does not see as one
]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ipr-cache")


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory):
    yield from serve_or_skip(tmp_path_factory.mktemp("mariadb"))


def _open(kind: str, request: pytest.FixtureRequest, cache_root, **options) -> InterCodeSQLEnv:
    if kind == "sqlite":
        return InterCodeSQLEnv(cache_dir=cache_root, statement_timeout_s=2.0, **options)
    server = request.getfixturevalue("mariadb")
    return InterCodeSQLEnv(backend="mysql", mysql_url=server.url, statement_timeout_s=2.0, **options)


@pytest.fixture(scope="module", params=["sqlite", "mariadb"])
def env(request, cache_root):
    e = _open(request.param, request, cache_root)
    yield e
    e.close()


def _bounded_step(env: InterCodeSQLEnv, request: pytest.FixtureRequest, action: str):
    """Run ``action`` in a fresh world_1 episode; assert it came back within the time
    and memory bounds; return its StepResult."""
    env.reset(WORLD)
    server = request.getfixturevalue("mariadb") if env.backend_kind == "mysql" else None
    server_before = server.peak_rss_kib() if server else 0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        result = env.step(action)
        seconds = time.perf_counter() - t0
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    assert seconds < MAX_SECONDS, (action[:80], seconds)
    assert py_peak < MAX_PY_PEAK, (action[:80], py_peak)
    assert rss_growth < MAX_RSS_GROWTH, (action[:80], rss_growth)
    if server:
        assert (server.peak_rss_kib() - server_before) * 1024 < MAX_SERVER_GROWTH, action[:80]
    return result


@pytest.mark.parametrize("action, expected", CASES, ids=[a[:48] for a, _ in CASES])
def test_refused_or_cut_within_bounds_on_both_backends(env, request, action, expected):
    r = _bounded_step(env, request, action)
    assert r.observation == expected, env.backend_kind
    refusal = expected not in (CELL, TOTAL)
    assert r.info["error"] and r.info["refused"] == refusal and not r.done
    assert env.step("SELECT count(*) FROM city").observation == "[(4079,)]"  # the session goes on


@pytest.mark.parametrize("action, expected", SQLITE_CASES, ids=[a[:48] for a, _ in SQLITE_CASES])
def test_the_sqlite_engine_itself_bounds_and_refuses(request, cache_root, action, expected):
    e = _open("sqlite", request, cache_root)
    try:
        assert _bounded_step(e, request, action).observation == expected
        assert e.backend.execute("world_1", "SELECT count(*) FROM city").rows == ((4079,),)
    finally:
        e.close()


def test_mariadb_session_bounds_and_wording(request, cache_root):
    e = _open("mariadb", request, cache_root)
    try:
        e.reset(WORLD)
        cur = e.backend._session().cursor()  # past the adapter: what the server itself enforces
        cur.execute("SELECT @@group_concat_max_len, @@sql_select_limit")
        assert cur.fetchall() == [(65536, 100_001)]
        cur.close()
        # A MariaDB syntax error reads as MySQL's (InterCode's server; the SQLite backend's wording).
        obs = e.step("SELECT count (*) FROM city").observation
        assert "MySQL server version" in obs and "MariaDB" not in obs
    finally:
        e.close()


@pytest.mark.parametrize("kind", ["sqlite", "mariadb"])
def test_configured_limits_apply_alike(request, cache_root, kind):
    e = _open(kind, request, cache_root, max_cell_bytes=1000, max_result_bytes=100_000, max_columns=60)
    try:
        cases = [
            ("SELECT a.*, b.* FROM city AS a, city AS b LIMIT 100000", "Error executing query: the result is larger than 100000 bytes"),
            ("SELECT group_concat(Name) FROM city WHERE ID <= 200", "Error executing query: the result has a value larger than 1000 bytes"),
            ("SELECT * FROM country AS a, country AS b, country AS c, country AS d, country AS e LIMIT 1", "Error executing query: the result has more than 60 columns"),
        ]
        for action, expected in cases:
            assert _bounded_step(e, request, action).observation == expected, action
        assert e.step("SELECT Name FROM city WHERE ID = 1").observation == "[('Kabul',)]"
    finally:
        e.close()


def test_limits_are_validated(cache_root):
    assert Limits().max_cell_bytes == 65_536 and Limits().max_result_bytes == 4 * 2**20 and Limits().max_columns == 256
    for bad in ({"max_cell_bytes": 0}, {"max_result_bytes": 0}, {"max_columns": 0}, {"max_cell_bytes": 10, "max_result_bytes": 5}):
        with pytest.raises(ValueError):
            Limits(**bad)
    with pytest.raises(ValueError, match="widest table"):
        InterCodeSQLEnv(cache_dir=cache_root, max_columns=10)


def test_function_calls_are_found_as_mysql_parses_them():
    assert function_calls("SELECT count(*) FROM t WHERE a IN (SELECT max(b) FROM u) AND NOT EXISTS (SELECT 1)") == ["count", "max"]
    assert function_calls("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT n FROM r") == []  # a CTE's columns
    assert function_calls("SELECT count(*) AS n, CAST(x AS DECIMAL(10, 2)) FROM (SELECT 1) AS t") == ["count", "cast"]
    assert function_calls("SELECT version /* c */ (), `user`(), sys.version_major()") == ["version", "user", "sys.version_major"]
    assert function_calls("SELECT 'repeat(' , \"zeroblob(1)\" FROM t -- sleep(1)") == []  # strings and comments call nothing
    assert function_calls("SELECT 1 /*!50000 , version() */") == ["version"]  # MySQL runs an executable comment
    assert vet_names("SELECT @a := 5") is None and vet_names("SELECT name FROM t WHERE name LIKE ('a%')") is None


def test_every_gold_query_calls_only_allowed_functions():
    files = [default_task_file()] + ([FULL_TASKS] if FULL_TASKS.exists() else [])
    records = [r for f in files for r in load_records(f)]
    used = {name for r in records for name in function_calls(split_statements(r.gold)[0])}
    assert used <= ALLOWED_FUNCTIONS, used - ALLOWED_FUNCTIONS
    assert [r.gold for r in records if vet_names(split_statements(r.gold)[0]) is not None] == []
