"""InterCode-SQL adapter: the dump and its SQLite copy, InterCode's reward, actions,
safety (read-only, one statement, timeouts), experts, splits, and parity between
the embedded SQLite backend and a real MariaDB server (started by a fixture on
127.0.0.1; those tests skip when MariaDB is not installed: .ci/mariadb.sh)."""

from __future__ import annotations

import hashlib
import logging
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("intercode")

from conftest import SHARED_DATA  # noqa: E402

from mariadb_fixture import serve_or_skip  # noqa: E402
from sql_agreement import gold_agreement  # noqa: E402

from ipr_core.envs.base import Environment, StepResult, make_env, replay  # noqa: E402
from ipr_core.envs.intercode_sql import (  # noqa: E402
    OBS_LIMIT,
    InterCodeSQLEnv,
    format_observation,
    intercode_reward,
    kendall_tau_b,
    parse_action,
    split_records,
    tables_in_query,
)
from ipr_core.envs.sql import (  # noqa: E402
    MySQLBackend,
    QueryResult,
    SQLiteBackend,
    build_sqlite,
    default_dump_path,
    mysql_to_sqlite,
    parse_dump,
    split_statements,
    sqlite_build_info,
)

FULL_TASKS = SHARED_DATA / "intercode_sql" / "ic_spider_dev.json"
# 4,079 cities cubed: no engine finishes this within a test's timeout.
SLOW_QUERY = "SELECT count(*) FROM city AS a, city AS b, city AS c WHERE a.Population + b.Population > c.Population"


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ipr-cache")


@pytest.fixture(scope="session")
def dump():
    return parse_dump(default_dump_path())


@pytest.fixture(scope="module")
def env(cache_root):
    e = InterCodeSQLEnv(cache_dir=cache_root)
    yield e
    e.close()


@pytest.fixture(scope="module")
def full_env(cache_root):
    if not FULL_TASKS.exists():
        pytest.skip(f"{FULL_TASKS} is missing")
    e = InterCodeSQLEnv(task_file=FULL_TASKS, cache_dir=cache_root, statement_timeout_s=0.5)
    yield e
    e.close()


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory):
    """A throwaway mariadbd (lower_case_table_names=1) on a free loopback port, stopped by PID."""
    yield from serve_or_skip(tmp_path_factory.mktemp("mariadb"))


@pytest.fixture(scope="module")
def mysql_env(mariadb, cache_root):
    task_file = FULL_TASKS if FULL_TASKS.exists() else None
    e = InterCodeSQLEnv(task_file=task_file, backend="mysql", mysql_url=mariadb.url, statement_timeout_s=0.5)
    yield e
    e.close()


def _episode(env, task, actions):
    _, results = replay(env, task, actions)
    return results


def _sha(paths):
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(Path(p).read_bytes())
    return h.hexdigest()


# --- lexing and the dump ---------------------------------------------------------------


def test_statement_splitting_respects_quotes_and_comments():
    assert split_statements("SELECT 1;") == ["SELECT 1"]
    assert split_statements("-- find them\nSELECT 'a;b' FROM t; -- done\n") == ["SELECT 'a;b' FROM t"]
    assert split_statements('SELECT "x;y"; DROP TABLE t') == ['SELECT "x;y"', "DROP TABLE t"]
    assert split_statements("SELECT `we;ird` FROM t /* ; */") == ["SELECT `we;ird` FROM t /* ; */"]
    assert split_statements("SELECT 'it\\'s; fine'") == ["SELECT 'it\\'s; fine'"]
    assert split_statements("/*!40101 SET NAMES utf8 */;") == ["/*!40101 SET NAMES utf8 */"]  # executable: content
    assert split_statements("  ;  -- nothing\n") == []


def test_mysql_literals_translate_to_sqlite():
    # MySQL: "..." is a string, backslash escapes exist, # starts a comment.
    assert mysql_to_sqlite('SELECT a FROM t WHERE b = "Sky Radio"') == "SELECT a FROM t WHERE b = 'Sky Radio'"
    assert mysql_to_sqlite("SELECT 'Do They Know It\\'s Christmas'") == "SELECT 'Do They Know It''s Christmas'"
    assert mysql_to_sqlite('SELECT "say ""hi"""') == "SELECT 'say \"hi\"'"
    assert mysql_to_sqlite("SELECT 'a\\nb', `Name` FROM t # why") == "SELECT 'a\nb', `Name` FROM t  "


def test_dump_schema_describes_tables_as_mysql_8(dump):
    assert len(dump.databases) == 20
    assert dump.preamble and "admin" in dump.preamble[0]  # InterCode's admin user: never executed
    db = dump.database("cre_doc_template_mgt")  # case-insensitive, as with lower_case_table_names=1
    assert db.name == "cre_Doc_Template_Mgt" and db.table_names() == ["documents", "paragraphs", "ref_template_types", "templates"]
    assert dump.database("world_1").table("CITY").describe_rows()[:2] == (
        ("ID", "int", "NO", "PRI", None, "auto_increment"),
        ("Name", "char(35)", "NO", "", "", ""),
    )
    assert dump.database("world_1").table("city").key_flag("CountryCode") == "MUL"
    assert dump.database("car_1").table("model_list").key_flag("Model") == "UNI"
    visit = dump.database("museum_visit").table("visit")
    assert visit.primary_key == ("Museum_ID", "visitor_ID") and visit.describe_rows()[3] == ("Total_spent", "double", "YES", "", None, "")
    with pytest.raises(ValueError, match="unknown database"):
        dump.database("nope")


def test_sqlite_cache_is_built_once_and_rebuilt_when_the_dump_changes(tmp_path):
    src = tmp_path / "mini.sql"
    src.write_text(
        "CREATE DATABASE IF NOT EXISTS `shop` /*!40100 DEFAULT CHARACTER SET utf8mb4 */;\nUSE `shop`;\n"
        "CREATE TABLE `Item` (\n  `id` int NOT NULL AUTO_INCREMENT,\n  `Name` varchar(20) DEFAULT NULL,\n"
        "  `price` decimal(19,4) DEFAULT NULL,\n  PRIMARY KEY (`id`)\n) ENGINE=InnoDB;\n"
        "INSERT INTO `Item` VALUES (1,'Bob\\'s \"pen\"; red',1.5000),(2,'Zed ',NULL);\n"
    )
    first = build_sqlite(parse_dump(src), tmp_path / "cache")
    stamp = (first / "_COMPLETE.json").stat().st_mtime_ns
    assert build_sqlite(parse_dump(src), tmp_path / "cache") == first
    assert (first / "_COMPLETE.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    backend = SQLiteBackend(parse_dump(src), tmp_path / "cache")
    res = backend.execute("shop", "SELECT name, price FROM ITEM WHERE name = 'zed' OR name LIKE 'bob%' ORDER BY id")
    assert res.rows == (("Bob's \"pen\"; red", 1.5), ("Zed ", None))  # escapes decoded; 'zed' = 'Zed ' (PAD SPACE, _ci)
    backend.close()
    src.write_text(src.read_text().replace("(2,'Zed ',NULL)", "(2,'Zed ',NULL),(3,'Ann',2.0000)"))
    second = build_sqlite(parse_dump(src), tmp_path / "cache")
    assert second != first and sqlite_build_info(second)["sha256"] == parse_dump(src).sha256
    assert SQLiteBackend(parse_dump(src), tmp_path / "cache").execute("shop", "SELECT count(*) FROM item").rows == ((3,),)


def test_sqlite_emulates_mysql_semantics_spider_needs(env):
    b = env.backend
    # AVG of integers: a DECIMAL with 4 more digits; of FLOAT(M,D) columns: D + 4 digits.
    assert b.execute("concert_singer", "SELECT avg(capacity) FROM stadium").rows == ((10621.6667,),)
    assert b.execute("world_1", "SELECT avg(GNP) FROM country WHERE GovernmentForm = 'US Territory'").rows == ((510.333333,),)
    # utf8mb4_general_ci: case-insensitive, trailing spaces ignored (flight_2's data has them).
    assert b.execute("flight_2", "SELECT count(*) FROM airports WHERE City = 'aberdeen'").rows == ((2,),)
    assert b.execute("pets_1", "SELECT DISTINCT pettype FROM PETS ORDER BY 1").rows == (("cat",), ("dog",))


# --- InterCode's reward -----------------------------------------------------------------------


def _intercode_get_reward(agent, gold):
    """The installed intercode-bench SqlEnv.get_reward, run on a stand-in for its MySQL cursor."""
    from intercode.envs.sql.sql_env import SqlEnv

    cur = SimpleNamespace(execute=lambda q: None, description=("x",), fetchall=lambda: list(gold))
    fake = SimpleNamespace(observation=agent, gold="-", info={}, cur=cur, logger=logging.getLogger("intercode-test"))
    fake.get_intersect_items = lambda items, counts: SqlEnv.get_intersect_items(fake, items, counts)
    reward, _ = SqlEnv.get_reward(fake)
    return reward


@pytest.mark.filterwarnings("ignore:One or more sample arguments is too small")
def test_reward_matches_intercodes_own_implementation():
    pytest.importorskip("scipy")
    rng = random.Random(0)
    values = [(1,), (2,), (3,), ("a", 1.5), ("b", None), (4,)]
    checked = 0
    for _ in range(400):
        gold = [rng.choice(values) for _ in range(rng.randint(0, 7))]
        agent = [rng.choice(values) for _ in range(rng.randint(0, 7))]
        if rng.random() < 0.3:
            agent = rng.sample(gold, len(gold))  # same rows, shuffled: the order term matters
        theirs = _intercode_get_reward(list(agent), gold)
        assert intercode_reward(agent, gold) == pytest.approx(min(1.0, max(0.0, theirs)), abs=1e-9), (agent, gold)
        checked += 1
    # errors (a string observation) and no query score 0, as InterCode's non-list observation
    assert _intercode_get_reward("Error executing query: x", [(1,)]) == 0.0 and intercode_reward(None, [(1,)]) == 0.0
    assert checked == 400


def test_reward_cases_and_deviation():
    gold = [(1,), (2,), (3,), (4,)]
    assert intercode_reward(gold, gold) == 1.0
    assert intercode_reward([], []) == 1.0  # both empty
    assert intercode_reward([(1,), (2,)], gold) == 0.5  # IoU 2/4, same order
    assert intercode_reward([(1,), (2,), (3,), (4,), (5,)], gold) == 0.8
    assert intercode_reward([(2,), (1,), (3,), (4,)], gold) == 0.67  # tau 2/3 scales the IoU
    assert intercode_reward(list(reversed(gold)), gold) == 0.0  # InterCode: -1.0; clipped to [0, 1]


@pytest.mark.filterwarnings("ignore:One or more sample arguments is too small")
def test_kendall_tau_b_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 40)
        x = [rng.choice("abcdef") for _ in range(n)]
        y = [rng.choice("abcdef") for _ in range(n)]
        ours, theirs = kendall_tau_b(x, y), stats.kendalltau(x, y).statistic
        assert (ours != ours and theirs != theirs) or ours == pytest.approx(theirs, abs=1e-12)


# --- actions and observations ------------------------------------------------------------------


@pytest.mark.parametrize(
    "action, kind, sql",
    [
        ("submit", "submit", ""),
        ("Submit.", "submit", ""),
        ("submit[]", "submit", ""),
        ("SELECT count(*) FROM singer", "sql", "SELECT count(*) FROM singer"),
        ("```sql SELECT name FROM singer```", "sql", "SELECT name FROM singer"),
        ("```sql\nSELECT name\nFROM singer\n```", "sql", "SELECT name\nFROM singer"),  # the paper's block
        ("```sql SELECT name FROM singer", "sql", "SELECT name FROM singer"),  # a block cut to its first line
        ("execute[SELECT 1]", "sql", "SELECT 1"),
        ("SELECT submit_date FROM t", "sql", "SELECT submit_date FROM t"),  # not a submit
        ("```sql", "invalid", ""),
        ("  ;  ", "invalid", ""),
    ],
)
def test_parse_action(action, kind, sql):
    parsed = parse_action(action)
    assert parsed.kind == kind and parsed.sql == sql


def test_observations_are_intercode_rows_cut_to_350_characters():
    assert format_observation(QueryResult(rows=((1, "a"), (2, None)))) == "[(1, 'a'), (2, None)]"
    assert format_observation(QueryResult(rows=())) == "[]"
    assert format_observation(QueryResult(error="Unknown column 'x' in 'field list'")) == "Error executing query: Unknown column 'x' in 'field list'"
    long = format_observation(QueryResult(rows=tuple((i,) for i in range(500))))
    assert len(long) == OBS_LIMIT + 3 and long.endswith("...")  # the IPR reference appends '...'


# --- the protocol, tasks and splits ------------------------------------------------------------------


def test_adapter_implements_the_protocol(env):
    assert isinstance(env, Environment) and env.name == "intercode_sql" and env.max_steps == 10
    assert "Action:" in env.system_prompt()
    task = env.list_tasks("train", n=1)[0]
    assert task.env == "intercode_sql" and {"db", "question", "gold", "hardness"} <= set(task.meta)
    first = env.reset(task)
    assert first == f"Question: {task.meta['question']}\nDatabase: {task.meta['db']}"
    r = env.step("SHOW TABLES")
    assert isinstance(r, StepResult) and r.reward == 0.0 and not r.done
    assert {"success", "invalid", "truncated"} <= set(r.info)
    built = make_env("intercode_sql", {"cache_dir": str(env.backend.path.parents[1]), "tables_in_prompt": True}, max_steps=4)
    pets = next(t for t in env.list_tasks("train") if t.meta["db"] == "pets_1")
    assert built.max_steps == 4 and built.reset(pets).endswith("\nDatabase: pets_1\nTables: has_pet, pets, student")
    assert len(built.expert(pets)) <= 4
    built.close()
    with pytest.raises(ValueError, match="environment 'intercode_sql' has no option 'no_such_option'"):
        make_env("intercode_sql", {"no_such_option": 1})


def test_list_tasks_is_deterministic_and_splits_are_disjoint(env):
    train, test = env.list_tasks("train"), env.list_tasks("test")
    assert len(train) + len(test) == 23 and len(test) == 5  # the sample: 20% held out
    assert not {t.task_id for t in train} & {t.task_id for t in test}
    assert [t.task_id for t in env.list_tasks("train", n=5, seed=3)] == [t.task_id for t in env.list_tasks("train", n=5, seed=3)]
    assert [t.task_id for t in env.list_tasks("train", n=5, seed=3)] == [t.task_id for t in env.list_tasks("train", seed=3)][:5]
    with pytest.raises(ValueError, match="requested"):
        env.list_tasks("train", n=100)
    with pytest.raises(ValueError, match="unknown split"):
        env.list_tasks("dev")


def test_full_file_splits_by_question_and_by_database(full_env):
    records = full_env.records
    assert len(records) == 1034
    by_q = split_records(records)
    assert len(by_q["test"]) == 200 and len(by_q["train"]) == 834  # the paper's 200 test questions
    by_db = split_records(records, "database")
    train_dbs = {records[i].db for i in by_db["train"]}
    test_dbs = {records[i].db for i in by_db["test"]}
    assert not train_dbs & test_dbs and len(by_db["test"]) >= 200  # unseen schemas at test time
    assert split_records(records, test_size=0.1)["test"] != by_q["test"] and len(split_records(records, test_size=0.1)["test"]) == 103
    hard = InterCodeSQLEnv(task_file=FULL_TASKS, cache_dir=full_env.backend.path.parents[1], hardness=["extra"])
    tasks = hard.list_tasks("test")
    assert tasks and all(t.meta["hardness"] == "extra" for t in tasks)
    assert {t.task_id for t in tasks} <= {t.task_id for t in full_env.list_tasks("test")}  # the filter does not move the split
    with pytest.raises(ValueError, match="hardness"):
        InterCodeSQLEnv(hardness=["trivial"])


# --- episodes and rewards ----------------------------------------------------------------------------


def test_sample_experts_reach_reward_one_and_replay_exactly(env):
    for task in env.list_tasks("train") + env.list_tasks("test"):
        plan = env.expert(task)
        assert plan and plan[0][1] == "SHOW TABLES" and plan[-1][1] == "submit" and len(plan) <= env.max_steps
        assert plan == env.expert(task)
        actions = [a for _, a in plan]
        results = _episode(env, task, actions)
        assert results[-1].done and results[-1].reward == 1.0 and results[-1].info["success"]
        assert all(r.reward == 0.0 and not r.done for r in results[:-1])
        for t in range(1, len(actions)):  # restoring any prefix reproduces its observations
            assert [r.observation for r in _episode(env, task, actions[:t])] == [r.observation for r in results[:t]]


def test_expert_describes_the_tables_of_the_gold_query(env, dump):
    task = next(t for t in env.list_tasks("train") if "Has_Pet" in t.meta["gold"])
    plan = env.expert(task)
    assert [a for _, a in plan][:4] == ["SHOW TABLES", "DESCRIBE student", "DESCRIBE has_pet", "DESCRIBE pets"]
    assert plan[1][0] == "The student table may hold what the question asks about. I should check its columns."
    assert tables_in_query(dump, "pets_1", "SELECT 'student' FROM pets") == ["pets"]  # literals are not tables


def test_reward_scores_the_last_query_at_submit(env):
    task = env.list_tasks("train", n=1)[0]
    gold = task.meta["gold"]
    assert _episode(env, task, [gold, "submit"])[-1].reward == 1.0
    assert _episode(env, task, [gold, "SELECT 1", "submit"])[-1].reward == 0.0  # the last result counts
    assert _episode(env, task, ["SELECT 1", gold, "```sql", "submit"])[-1].reward == 1.0  # an unparseable action runs nothing
    assert _episode(env, task, [gold, "SELECT nope FROM student", "submit"])[-1].reward == 0.0  # an error is the last result
    r = _episode(env, task, ["submit"])[-1]
    assert r.done and r.reward == 0.0 and r.observation == "No query was run before submit."
    results = _episode(env, task, [gold] * env.max_steps)
    assert results[-1].done and results[-1].info["truncated"] and results[-1].reward == 0.0  # never submitted
    with pytest.raises(RuntimeError, match="reset"):
        env.step("SHOW TABLES")
    env.expert(task)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("SHOW TABLES")


def test_errors_read_as_mysql_errors(env):
    task = env.list_tasks("train", n=1)[0]  # pets_1
    env.reset(task)
    assert env.step("SELECT * FROM nations").observation == "Error executing query: Table 'pets_1.nations' doesn't exist"
    assert env.step("SELECT nope FROM student").observation == "Error executing query: Unknown column 'nope' in 'field list'"
    assert env.step("DESCRIBE nations").observation == "Error executing query: Table 'pets_1.nations' doesn't exist"
    r = env.step("I think the answer is 3")
    assert r.observation.startswith("Error executing query: You have an error in your SQL syntax") and not r.info["invalid"]


def test_every_gold_query_reaches_reward_one_on_sqlite(full_env):
    """All 1,034 questions: reset, run the gold query, submit."""
    failing, not_one = [], []
    t0 = time.perf_counter()
    for task in full_env.list_tasks("train") + full_env.list_tasks("test"):
        gold = full_env.gold_result(full_env.record_of(task))
        if not gold.ok:
            failing.append((task.task_id, gold.error))
            continue
        r = _episode(full_env, task, [task.meta["gold"], "submit"])[-1]
        if r.reward != 1.0:
            not_one.append((task.task_id, r.reward))
    print(f"\nSQLite: {1034 - len(failing)}/1034 gold queries run, {len(not_one)} below reward 1, {time.perf_counter() - t0:.1f}s; failing: {failing}")
    assert not not_one
    assert not failing  # Spider's gold queries were written for SQLite: every one runs


# --- safety ---------------------------------------------------------------------------------------


def test_writes_multi_statements_and_slow_queries_are_refused_on_sqlite(full_env):
    files = list(full_env.backend.path.glob("*.sqlite"))
    before = _sha(files)
    task = next(t for t in full_env.list_tasks("train") if t.meta["db"] == "world_1")
    full_env.reset(task)
    for action in [
        "DROP TABLE city",
        "DELETE FROM city",
        "INSERT INTO city VALUES (9999, 'X', 'ABC', 'Y', 1)",
        "UPDATE city SET Population = 0",
        "CREATE TABLE t (x int)",
        "PRAGMA query_only = 0",
        "ATTACH DATABASE '/tmp/x.db' AS x",
        "SET @a = 1",
    ]:
        r = full_env.step(action)
        assert r.observation.startswith("Error executing query: the database is read-only") and r.info["refused"] and not r.done, action
        full_env.reset(task)
    r = full_env.step("SELECT 1; DROP TABLE city")
    assert "only one SQL statement per action" in r.observation and r.info["refused"]
    r = full_env.step("WITH x AS (SELECT 1) DELETE FROM city")  # past the keyword check: the authorizer stops it
    assert "read-only" in r.observation and r.info["refused"]
    r = full_env.step("SELECT 1 /*!50000 , (SELECT 2) */")
    assert "executable comments" in r.observation
    t0 = time.perf_counter()
    r = full_env.step(SLOW_QUERY)
    assert r.observation == "Error executing query: Query execution was interrupted (max_statement_time exceeded)" and r.info["timed_out"]
    assert time.perf_counter() - t0 < 3.0  # statement_timeout_s=0.5
    assert full_env.step("SELECT count(*) FROM city").observation == "[(4079,)]"
    assert _sha(files) == before  # the databases are untouched


# --- MariaDB ------------------------------------------------------------------------------------------


def test_mariadb_loads_the_dump_once_with_a_read_only_user(mariadb, mysql_env):
    assert mysql_env.backend.flavor == "mariadb"
    again = InterCodeSQLEnv(backend="mysql", mysql_url=mariadb.url)
    assert again.backend.load_s == 0.0  # the marker says this dump is already there
    again.close()
    import mysql.connector

    cnx = mysql.connector.connect(host="127.0.0.1", port=mariadb.port, user="ipr_agent", password="ipr_agent", database="pets_1", use_pure=True)
    cur = cnx.cursor()
    with pytest.raises(mysql.connector.Error, match="command denied"):
        cur.execute("DELETE FROM student")
    with pytest.raises(mysql.connector.Error, match="denied"):
        cur.execute("CREATE TABLE x (a int)")
    cur.execute("SELECT count(*) FROM Student")  # lower_case_table_names=1: Student = student
    assert cur.fetchall() == [(34,)]
    cnx.close()


def test_mariadb_experts_reach_reward_one(mysql_env):
    tasks = mysql_env.list_tasks("test", n=30)
    for task in tasks:
        plan = mysql_env.expert(task)
        if plan is None:
            assert not mysql_env.gold_result(mysql_env.record_of(task)).ok
            continue
        results = _episode(mysql_env, task, [a for _, a in plan])
        assert results[-1].reward == 1.0 and results[-1].info["success"], task.task_id


def test_every_gold_query_reaches_reward_one_on_mariadb(mysql_env):
    if len(mysql_env.records) < 1034:
        pytest.skip("needs the full task file")
    failing, not_one = [], []
    for task in mysql_env.list_tasks("train") + mysql_env.list_tasks("test"):
        gold = mysql_env.gold_result(mysql_env.record_of(task))
        if not gold.ok:
            failing.append((task.task_id, task.meta["gold"][-40:], gold.error[:70]))
            continue
        if _episode(mysql_env, task, [task.meta["gold"], "submit"])[-1].reward != 1.0:
            not_one.append(task.task_id)
    print(f"\nMariaDB: {1034 - len(failing)}/1034 gold queries run; failing (MySQL syntax, also broken in InterCode):")
    for f in failing:
        print("  ", f)
    assert not not_one
    # `FROM SHOW` (a reserved word), a derived table without an alias, `COUNT (*)` with a space: 3 queries x 2.
    assert len(failing) == 6


def test_mariadb_refuses_writes_times_out_and_resets_clean(mariadb, mysql_env):
    task = next(t for t in mysql_env.list_tasks("train") if t.meta["db"] == "world_1")
    mysql_env.reset(task)
    for action in ["DROP TABLE city", "DELETE FROM city", "SET SESSION max_statement_time = 0", "SELECT 1; DROP TABLE city"]:
        r = mysql_env.step(action)
        assert r.info["refused"] and "nothing was run" in r.observation, action
    # Past our keyword check, the server's privileges refuse it.
    assert mysql_env.backend.execute("world_1", "DELETE FROM city").refused
    r = mysql_env.step("SELECT * FROM city INTO OUTFILE '/tmp/ipr-city.txt'")
    assert r.info["refused"] and not Path("/tmp/ipr-city.txt").exists()
    t0 = time.perf_counter()
    r = mysql_env.step(SLOW_QUERY)
    assert r.observation == "Error executing query: Query execution was interrupted (max_statement_time exceeded)"
    assert time.perf_counter() - t0 < 3.0
    assert mysql_env.step("SELECT @a := 5").observation == "[(5,)]"
    mysql_env.reset(task)
    assert mysql_env.step("SELECT @a").observation == "[(None,)]"  # a reset leaves no session state
    assert mysql_env.step("SELECT count(*) FROM city").observation == "[(4079,)]"


def test_large_results_are_capped_on_both_backends(mariadb, cache_root):
    task = InterCodeSQLEnv(cache_dir=cache_root).list_tasks("train", n=1)[0]
    for kw in ({"cache_dir": cache_root}, {"backend": "mysql", "mysql_url": mariadb.url}):
        e = InterCodeSQLEnv(max_rows=100, **kw)
        e.reset(task)
        assert e.step("SELECT * FROM student AS a, student AS b, student AS c LIMIT 100000").observation == "Error executing query: the result has more than 100 rows"
        assert e.step("SELECT count(*) FROM student").observation == "[(34,)]"  # the session goes on
        e.close()


def test_a_killed_mariadb_connection_raises_env_error_and_reset_heals(mariadb, mysql_env):
    import mysql.connector

    from ipr_core.envs.base import EnvError

    task = mysql_env.list_tasks("train", n=1)[0]
    mysql_env.reset(task)
    admin = mysql.connector.connect(host="127.0.0.1", port=mariadb.port, user="root", use_pure=True)
    admin.cursor().execute(f"KILL {mysql_env.backend._cnx.connection_id}")
    admin.close()
    with pytest.raises(EnvError):
        for _ in range(3):  # the kill may land a moment later
            mysql_env.step("SELECT 1")
            time.sleep(0.05)
    mysql_env.reset(task)  # a fresh connection
    assert mysql_env.step("SELECT 1").observation == "[(1,)]"


def test_meta_commands_are_identical_on_both_backends(env, mysql_env):
    task = env.list_tasks("train", n=1)[0]
    for action in ["SHOW TABLES", "DESCRIBE student", "desc `Has_Pet`", "SHOW COLUMNS FROM pets", "SHOW TABLES LIKE 'p%'", "SELECT * FROM nations"]:
        env.reset(task)
        mysql_env.reset(task)
        a, b = env.step(action).observation, mysql_env.step(action).observation
        assert a == b, action


@pytest.mark.slow
def test_backend_agreement_over_all_questions(full_env, mysql_env):
    """Every gold query on SQLite and on MariaDB: how often the two return the same rows."""
    if len(mysql_env.records) < 1034:
        pytest.skip("needs the full task file")
    report = gold_agreement(full_env.records, full_env.backend, mysql_env.backend)
    print(f"\nSQLite vs MariaDB over {report['n']} gold queries: same rows {report['agree']} ({report['rate']:.1%}), mean cross reward {report['mean_cross_reward']:.3f}")
    for reason, count in sorted(report["reasons"].items(), key=lambda kv: -kv[1]):
        print(f"  {count:5d}  {reason}")
    for d in report["disagreements"]:
        print(f"  - {d['reason']}: [{d['db']}] {d['gold'][:110]}\n      sqlite: {d['first'][:90]}\n      mariadb: {d['second'][:90]}")
    assert report["rate"] >= 0.95


# --- benchmarking hooks ----------------------------------------------------------------------------------


def _bench_envs(monkeypatch):
    """bench/envs.py as a module (bench/ holds scripts, not a package)."""
    import importlib.util
    import sys

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_envs", ROOT / "bench" / "envs.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_envs", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_specs_cover_both_backends(monkeypatch, cache_root):
    monkeypatch.delenv("IPR_MYSQL_URL", raising=False)
    bench = _bench_envs(monkeypatch)
    specs = bench.intercode_sql_specs()
    assert [s.options["backend"] for s in specs] == ["sqlite", "mysql"]
    assert [s for s in bench.ENV_SPECS if s.env == "intercode_sql"] == specs
    with pytest.raises(ValueError, match="mysql_url"):
        make_env(specs[1].env, specs[1].options)
    assert bench.intercode_sql_specs("mysql://root@127.0.0.1:1")[1].options["mysql_url"] == "mysql://root@127.0.0.1:1"


def test_backends_need_no_more_than_a_few_ms_per_step(env, mysql_env):
    task = env.list_tasks("train", n=1)[0]
    for e in (env, mysql_env):
        e.reset(task)
        t0 = time.perf_counter()
        for _ in range(50):
            e.step(task.meta["gold"])
            e.reset(task)
        per_step = (time.perf_counter() - t0) / 50
        print(f"\n{e.backend_kind}: {per_step * 1e3:.2f} ms per gold step + reset")
        assert per_step < 0.25
    assert isinstance(mysql_env.backend, MySQLBackend) and isinstance(env.backend, SQLiteBackend)
