"""InterCode-SQL: answer Spider questions by querying a database (the IPR paper's SQL benchmark).

An episode is one question about one of the 20 Spider-dev databases. Each
action is one read-only SQL statement (plain SQL, a ```sql block or
``execute[...]`` on the Action line) whose result rows, or error, come back
as the observation (InterCode's ``str`` of a list of tuples, cut to 350
characters as in the IPR reference code); ``submit`` ends the episode and
scores the result of the LAST query run (``intercode_reward``: InterCode's
intersection-over-union of result rows scaled by their order agreement).
Paper settings: at most 10 turns, success only at reward 1.0.

Two backends serve the same databases (``sql_backends.py``): an embedded
read-only SQLite copy of InterCode's MySQL dump (default, no server) and a
MariaDB/MySQL server (InterCode's own setting). ``SHOW TABLES`` and
``DESCRIBE <table>`` are answered from the dump's schema on both, in MySQL 8's
format (InterCode's server), so the expert's exploration and the agent's
observations do not depend on the backend. ``docs/intercode_sql.md`` lists
every deviation from InterCode and where the two backends disagree.

Splits: the paper trained on 1,500 Spider-train questions and tested on 200;
only the 1,034 dev questions ship here, so train/test are a deterministic
split of the task file, by question (default) or by database (a harder test
of generalisation to unseen schemas).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from ipr_core.envs.base import StepResult
from ipr_core.envs.sql_backends import (
    Dump,
    MySQLBackend,
    QueryResult,
    SQLBackend,
    SQLiteBackend,
    default_dump_path,
    has_executable_comment,
    mysql_string_value,
    parse_dump,
    split_statements,
    strip_comments,
    tokenize,
)
from ipr_core.seeding import derive_seed
from ipr_core.types import Task

NAME = "intercode_sql"
DEFAULT_MAX_STEPS = 10  # paper: 10 turns for InterCode-SQL
OBS_LIMIT = 350  # IPR reference: observations longer than 350 characters are cut (+ "...")
PAPER_TEST_SIZE = 200
HARDNESS = ("easy", "medium", "hard", "extra")
SPLITS = ("train", "test")
ERROR_PREFIX = "Error executing query: "  # InterCode's wording
NO_OUTPUT = "[Executed Successfully with No Output]"  # IPR reference's wording
MAX_DESCRIBED_TABLES = 3  # expert exploration: DESCRIBE at most this many tables


# --- task records --------------------------------------------------------------------------


@dataclass(frozen=True)
class SQLRecord:
    index: int  # position in the task file
    db: str
    question: str
    gold: str
    hardness: str | None = None


def default_task_file() -> Path:
    """intercode-bench's 23-question sample (the full 1,034-question file is given by path)."""
    return default_dump_path().with_name("sql_queries.csv")


def load_records(path: str | Path) -> tuple[SQLRecord, ...]:
    """InterCode task files: JSON (a list of {db, query, gold, hardness?}), JSON lines or CSV (query, gold, db)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        rows: list[Mapping[str, Any]] = list(csv.DictReader(text.splitlines()))
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)
    out = []
    for i, r in enumerate(rows):
        missing = [k for k in ("db", "query", "gold") if not r.get(k)]
        if missing:
            raise ValueError(f"{path.name} row {i} lacks {missing}")
        out.append(SQLRecord(i, str(r["db"]), str(r["query"]).strip(), str(r["gold"]).strip(), r.get("hardness") or None))
    return tuple(out)


def resolve_test_size(test_size: int | float | None, n: int) -> int:
    """Questions in the test split: an int is a count, a float in (0, 1) a fraction;
    None = the paper's 200, capped at 20% of the file (5 of the 23-question sample)."""
    if test_size is None:
        k = min(PAPER_TEST_SIZE, round(0.2 * n))
    elif isinstance(test_size, float):
        if not 0 < test_size < 1:
            raise ValueError(f"a fractional test_size must be in (0, 1), got {test_size}")
        k = round(test_size * n)
    else:
        k = int(test_size)
    if not 0 <= k < n:
        raise ValueError(f"test_size={test_size!r} gives {k} test questions out of {n}: need 0 <= k < {n}")
    return k


def split_records(records: Sequence[SQLRecord], split_by: Literal["question", "database"] = "question", test_size: int | float | None = None, split_seed: int = 0) -> dict[str, tuple[int, ...]]:
    """Deterministic train/test split of record indices.

    By question: a seeded permutation, the first ``k`` are test. By database:
    whole databases (in a seeded order) go to test until it holds at least
    ``k`` questions, so test schemas never appear in training; at least one
    database stays in train.
    """
    n = len(records)
    k = resolve_test_size(test_size, n)
    rng = random.Random(derive_seed(NAME, "split", split_by, split_seed))
    if split_by == "question":
        perm = list(range(n))
        rng.shuffle(perm)
        test = set(perm[:k])
    elif split_by == "database":
        dbs = sorted({r.db for r in records})
        rng.shuffle(dbs)
        test = set()
        for db in dbs[:-1]:
            if len(test) >= k:
                break
            test |= {r.index for r in records if r.db == db}
    else:
        raise ValueError(f"split_by must be 'question' or 'database', got {split_by!r}")
    return {"train": tuple(i for i in range(n) if i not in test), "test": tuple(sorted(test))}


# --- InterCode's reward ------------------------------------------------------------------------


def _count_inversions(seq: list[int]) -> int:
    """Pairs i < j with seq[i] > seq[j] (merge sort, O(n log n))."""
    if len(seq) < 2:
        return 0
    inv = 0
    width = 1
    a = list(seq)
    n = len(a)
    while width < n:
        out = []
        for lo in range(0, n, 2 * width):
            left, right = a[lo : lo + width], a[lo + width : lo + 2 * width]
            i = j = 0
            while i < len(left) and j < len(right):
                if right[j] < left[i]:
                    inv += len(left) - i
                    out.append(right[j])
                    j += 1
                else:
                    out.append(left[i])
                    i += 1
            out.extend(left[i:])
            out.extend(right[j:])
        a = out
        width *= 2
    return inv


def kendall_tau_b(x: Sequence[Any], y: Sequence[Any]) -> float:
    """Kendall's tau-b of paired sequences, NaN when either is constant: what
    ``scipy.stats.kendalltau`` returns (InterCode's reward calls it), without scipy."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"kendall_tau_b needs equal lengths, got {n} and {len(y)}")
    if n == 0:
        return math.nan
    rank_x = {v: i for i, v in enumerate(sorted(set(x)))}
    rank_y = {v: i for i, v in enumerate(sorted(set(y)))}
    pairs = sorted((rank_x[a], rank_y[b]) for a, b in zip(x, y))
    tot = n * (n - 1) // 2

    def ties(counts: Counter) -> int:
        return sum(c * (c - 1) // 2 for c in counts.values())

    xtie = ties(Counter(p[0] for p in pairs))
    ytie = ties(Counter(p[1] for p in pairs))
    ntie = ties(Counter(pairs))
    if xtie == tot or ytie == tot:
        return math.nan
    # Sorted by (x, y): every strict inversion of y is a discordant pair; equal-x
    # pairs are in y order and add none.
    dis = _count_inversions([p[1] for p in pairs])
    tau = (tot - xtie - ytie + ntie - 2 * dis) / math.sqrt(tot - xtie) / math.sqrt(tot - ytie)
    return min(1.0, max(-1.0, tau))


def _intersect_items(items: list[str], budget: Counter) -> list[str]:
    budget = Counter(budget)
    out = []
    for it in items:
        if budget[it] > 0:
            budget[it] -= 1
            out.append(it)
    return out


def intercode_reward(agent: Sequence[tuple] | None, gold: Sequence[tuple]) -> float:
    """InterCode-SQL's reward (``SqlEnv.get_reward``), reimplemented.

    Rows are compared as their ``str``. Reward = |A ∩ G| / |A ∪ G| over the
    multisets of rows (1.0 when both are empty), then, when the intersection is
    non-empty and the order statistic is defined, multiplied by Kendall's tau
    between the shared rows in the agent's order and in the gold order and
    rounded to 2 decimals. ``agent`` is None when the last query failed or
    there was none: reward 0. Deviation: InterCode's score goes negative for a
    reversed order (tau < 0); ours is clipped at 0 to stay in [0, 1].
    """
    if agent is None:
        return 0.0
    list_agent = [str(r) for r in agent]
    list_gold = [str(r) for r in gold]
    ca, cg = Counter(list_agent), Counter(list_gold)
    inter = ca & cg
    union = ca | cg  # max count per row: InterCode's groupby/max union
    if not union:
        return 1.0
    reward = sum(inter.values()) / sum(union.values())
    if inter:
        tau = kendall_tau_b(_intersect_items(list_agent, inter), _intersect_items(list_gold, inter))
        if not math.isnan(tau):
            reward = round(tau * reward, 2)
    return min(1.0, max(0.0, reward))


# --- actions -------------------------------------------------------------------------------------

_SUBMIT = re.compile(r"^submit\s*(?:\[\s*\]|\(\s*\))?\s*\.?$", re.I)
_FENCE = re.compile(r"```[ \t]*(?:sql|mysql|sqlite)?[ \t]*\n?(.*?)```", re.I | re.S)
_FENCE_OPEN = re.compile(r"^```[ \t]*(?:sql|mysql|sqlite)?\b[ \t]*(.*)$", re.I | re.S)
_EXECUTE = re.compile(r"^execute\s*\[(.*)\]$", re.I | re.S)

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
class SQLAction:
    kind: Literal["submit", "sql", "invalid"]
    sql: str = ""
    message: str = ""  # why it is invalid


def parse_action(action: str) -> SQLAction:
    """``submit``, or the SQL in a ```sql block, ``execute[...]`` or the plain text."""
    text = action.strip()
    if _SUBMIT.match(text):
        return SQLAction("submit")
    m = _FENCE.search(text)
    if m:
        sql = m.group(1)
    else:
        m = _FENCE_OPEN.match(text)  # a block cut after its first line (parse_react keeps one line)
        sql = m.group(1) if m else text
        m = _EXECUTE.match(sql.strip())
        if m:
            sql = m.group(1)
    sql = sql.strip()
    if not strip_comments(sql).strip(" ;"):
        return SQLAction("invalid", message="no SQL query found in the action. Write one SQL query on the Action line (e.g. Action: SELECT name FROM singer), or Action: submit")
    return SQLAction("sql", sql)


def first_keyword(stmt: str) -> str:
    m = re.match(r"[\s(]*([A-Za-z_]+)", strip_comments(stmt))
    return m.group(1).upper() if m else ""


_SHOW_TABLES = re.compile(r"^SHOW\s+(FULL\s+)?TABLES(?:\s+(?:FROM|IN)\s+`?([\w$]+)`?)?(?:\s+LIKE\s+('(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\"))?$", re.I)
_DESCRIBE = re.compile(r"^(?:DESC|DESCRIBE|EXPLAIN)\s+(?:`?([\w$]+)`?\s*\.\s*)?`?([\w$]+)`?(?:\s+`?([\w$]+)`?)?$", re.I)
_SHOW_COLUMNS = re.compile(r"^SHOW\s+(?:FULL\s+)?(?:COLUMNS|FIELDS)\s+(?:FROM|IN)\s+(?:`?([\w$]+)`?\s*\.\s*)?`?([\w$]+)`?(?:\s+(?:FROM|IN)\s+`?([\w$]+)`?)?$", re.I)


def _like_regex(pattern: str) -> re.Pattern[str]:
    out = "".join(".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in pattern)
    return re.compile(f"^{out}$", re.I | re.S)


def meta_command(dump: Dump, db: str, stmt: str) -> QueryResult | None:
    """SHOW TABLES / DESCRIBE <table> / SHOW COLUMNS FROM <table>, answered from the dump's
    schema in MySQL 8's format (identical on both backends); None for any other statement."""
    s = strip_comments(stmt).rstrip(" ;\t\n")
    m = _SHOW_TABLES.match(s)
    if m:
        name = m.group(2) or db
        if name.lower() not in dump.databases:
            return QueryResult(error=f"Unknown database '{name.lower()}'")
        names = dump.database(name).table_names()
        if m.group(3):
            rx = _like_regex(mysql_string_value(m.group(3)))
            names = [t for t in names if rx.match(t)]
        return QueryResult(rows=tuple((t, "BASE TABLE") if m.group(1) else (t,) for t in names))
    m = _DESCRIBE.match(s)
    column = None
    if m:
        schema, table, column = m.group(1), m.group(2), m.group(3)
    else:
        m = _SHOW_COLUMNS.match(s)
        if not m:
            return None
        schema, table = m.group(1) or m.group(3), m.group(2)
    name = schema or db
    if name.lower() not in dump.databases:
        return QueryResult(error=f"Unknown database '{name.lower()}'")
    t = dump.database(name).table(table)
    if t is None:
        return QueryResult(error=f"Table '{name.lower()}.{table.lower()}' doesn't exist")
    rows = t.describe_rows()
    if column:
        rows = tuple(r for r in rows if _like_regex(column).match(r[0]))
    return QueryResult(rows=rows)


def tables_in_query(dump: Dump, db: str, sql: str) -> list[str]:
    """Tables of ``db`` that ``sql`` names (outside string literals), lowercased, in order of first mention."""
    names = {t.lower() for t in dump.database(db).table_names()}
    found: list[str] = []
    for kind, text in tokenize(sql):
        if kind == "ident":
            words = [text.strip("`")]
        elif kind == "other":
            words = re.findall(r"[A-Za-z_$][\w$]*", text)
        else:
            continue
        for w in words:
            if w.lower() in names and w.lower() not in found:
                found.append(w.lower())
    return found


def format_observation(result: QueryResult | None, limit: int = OBS_LIMIT) -> str:
    """Rows as InterCode prints them (``str`` of a list of tuples) or ``Error executing query: ...``, cut to ``limit`` characters + '...'."""
    if result is None:
        text = "No query was run."
    elif result.error is not None:
        text = ERROR_PREFIX + result.error
    elif result.rows is None:
        text = NO_OUTPUT
    else:
        text = str(list(result.rows))
    return text[:limit] + "..." if len(text) > limit else text


# --- the environment --------------------------------------------------------------------------


class InterCodeSQLEnv:
    """InterCode-SQL on SQLite (default) or a MariaDB/MySQL server (``backend="mysql"``)."""

    name = NAME

    def __init__(
        self,
        task_file: str | Path | None = None,
        split_by: Literal["question", "database"] = "question",
        hardness: Sequence[str] | None = None,
        test_size: int | float | None = None,
        split_seed: int = 0,
        backend: Literal["sqlite", "mysql"] = "sqlite",
        mysql_url: str | None = None,
        statement_timeout_s: float = 5.0,
        max_steps: int | None = None,
        dump_path: str | Path | None = None,
        cache_dir: str | Path | None = None,
        tables_in_prompt: bool = False,
        obs_limit: int = OBS_LIMIT,
        max_rows: int = 100_000,
        readonly_user: str = "ipr_agent",
        readonly_password: str = "ipr_agent",
    ):
        """
        task_file: InterCode task file (.json list, .jsonl or .csv); default: intercode-bench's 23-question
            sample. The full set: ../shared/data/intercode_sql/ic_spider_dev.json (1,034 questions).
        split_by: "question" (random questions) or "database" (whole databases held out: unseen schemas).
        hardness: keep only these Spider hardness levels (easy, medium, hard, extra); applied after the
            split, so the split itself does not depend on it. Files without hardness (the CSV) keep all.
        test_size / split_seed: test questions (int count, float fraction; None = 200 capped at 20%) and
            the seed of the split (not of list_tasks' order).
        backend: "sqlite" (embedded, read-only cached copies of the dump) or "mysql" (MariaDB/MySQL server).
        mysql_url: mysql://user:password@host:port of an account that may create databases and users (the
            dump is loaded once, the agent runs as ``readonly_user``); default: $IPR_MYSQL_URL.
        statement_timeout_s: per-statement time limit on both backends.
        max_steps: turn limit (paper: 10); the episode ends unscored (reward 0) when reached without submit.
        dump_path / cache_dir: the MySQL dump (default: intercode-bench's) and the SQLite cache root
            (default: $IPR_CACHE_DIR or ~/.cache/ipr-flow).
        tables_in_prompt: also list the database's tables in the first message.
        obs_limit: observation length cut (IPR: 350). max_rows: larger results are an error.
        """
        if backend not in ("sqlite", "mysql"):
            raise ValueError(f"backend must be 'sqlite' or 'mysql', got {backend!r}")
        if split_by not in ("question", "database"):
            raise ValueError(f"split_by must be 'question' or 'database', got {split_by!r}")
        if isinstance(hardness, str):  # a single level from a key=value override
            hardness = [hardness]
        bad = sorted(set(hardness or ()) - set(HARDNESS))
        if bad:
            raise ValueError(f"unknown hardness {bad}; choose from {list(HARDNESS)}")
        if statement_timeout_s <= 0:
            raise ValueError(f"statement_timeout_s must be > 0, got {statement_timeout_s}")
        self.max_steps = int(max_steps or DEFAULT_MAX_STEPS)
        self.task_file = Path(task_file).expanduser() if task_file is not None else default_task_file()
        self.records = load_records(self.task_file)
        self.split_by = split_by
        self.hardness = tuple(hardness) if hardness else None
        self.splits = split_records(self.records, split_by, test_size, split_seed)
        self.obs_limit = int(obs_limit)
        self.tables_in_prompt = bool(tables_in_prompt)
        self.dump = parse_dump(dump_path or default_dump_path())
        unknown = sorted({r.db for r in self.records if r.db.lower() not in self.dump.databases})
        if unknown:
            raise ValueError(f"{self.task_file.name} uses databases the dump lacks: {unknown}")
        self.backend_kind = backend
        self.backend: SQLBackend
        if backend == "sqlite":
            self.backend = SQLiteBackend(self.dump, cache_dir, statement_timeout_s, max_rows)
        else:
            url = mysql_url or os.environ.get("IPR_MYSQL_URL")
            if not url:
                raise ValueError("backend='mysql' needs mysql_url (mysql://user:password@host:port) or $IPR_MYSQL_URL")
            self.backend = MySQLBackend(self.dump, url, statement_timeout_s, max_rows, readonly_user, readonly_password)
        self._record: SQLRecord | None = None
        self._last: QueryResult | None = None
        self._t = 0
        self._done = True

    # --- tasks ---------------------------------------------------------------------------

    def list_tasks(self, split: str, n: int | None = None, seed: int = 0) -> list[Task]:
        """``n`` questions of ``split`` (after the hardness filter) in a seeded, prefix-stable order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for intercode_sql; choose from {list(SPLITS)}")
        idx = [i for i in self.splits[split] if self.hardness is None or self.records[i].hardness in self.hardness or self.records[i].hardness is None]
        random.Random(derive_seed(NAME, self.task_file.name, split, seed)).shuffle(idx)
        if n is not None:
            if n > len(idx):
                raise ValueError(f"{self.task_file.name} has {len(idx)} {split} questions (split_by={self.split_by}, hardness={self.hardness}), {n} requested")
            idx = idx[:n]
        return [self._task(self.records[i], split) for i in idx]

    def _task(self, r: SQLRecord, split: str) -> Task:
        meta = {"db": r.db, "question": r.question, "gold": r.gold, "hardness": r.hardness, "index": r.index, "task_file": self.task_file.name}
        return Task(f"{self.task_file.stem}-{r.index:04d}", self.name, split, 0, meta)

    @staticmethod
    def record_of(task: Task) -> SQLRecord:
        try:
            m = task.meta
            return SQLRecord(int(m.get("index", -1)), m["db"], m["question"], m["gold"], m.get("hardness"))
        except KeyError as e:
            raise ValueError(f"task {task.task_id} lacks meta[{e.args[0]!r}]: list it with InterCodeSQLEnv.list_tasks") from None

    # --- episode -------------------------------------------------------------------------

    def system_prompt(self) -> str:
        return (
            "You are a helpful assistant assigned with the task of problem-solving. To achieve this, you will "
            "interact with a MySQL database system using SQL queries to answer a question.\n"
            "At each turn, first think step by step, then act. Reply in this format:\n"
            "Thought: <your reasoning>\n"
            "Action: <one SQL query on a single line, or submit>\n"
            "Each query runs on the database and its result rows (or the error) come back as the observation, e.g. "
            "Action: SELECT AVG(GNP), SUM(population) FROM country WHERE governmentform = 'US Territory'\n"
            "SHOW TABLES lists the tables and DESCRIBE <table> lists a table's columns. The database is read-only: "
            "one SELECT, SHOW TABLES or DESCRIBE statement per action.\n"
            "When the result of your last query answers the question, reply with: Action: submit\n"
            "Your answer is the result of the last query you ran before submitting."
        )

    def reset(self, task: Task) -> str:
        if task.env != self.name:
            raise ValueError(f"task {task.task_id} is for {task.env!r}, not {self.name}")
        rec = self.record_of(task)
        db = self.dump.database(rec.db)  # unknown database: ValueError
        self.backend.reset_session(rec.db)
        self._record, self._last, self._t, self._done = rec, None, 0, False
        first = f"Question: {rec.question}\nDatabase: {rec.db}"
        if self.tables_in_prompt:
            first += "\nTables: " + ", ".join(db.table_names())
        return first

    def _run(self, sql: str) -> tuple[QueryResult, bool]:
        """(result, refused): one vetted statement, refusals explained in the error text."""
        assert self._record is not None
        stmts = split_statements(sql)
        if len(stmts) > 1:
            return QueryResult(error=f"only one SQL statement per action is allowed (found {len(stmts)} separated by ';'); nothing was run"), True
        stmt = stmts[0]
        if has_executable_comment(stmt):
            return QueryResult(error="executable comments (/*! ... */) are not allowed; nothing was run"), True
        meta = meta_command(self.dump, self._record.db, stmt)
        if meta is not None:
            return meta, False
        kw = first_keyword(stmt)
        if kw in WRITE_KEYWORDS:
            return QueryResult(error=f"the database is read-only: {kw} statements are not allowed (only SELECT, SHOW TABLES and DESCRIBE <table>); nothing was run"), True
        if kw in META_KEYWORDS:
            return QueryResult(error=f"this {kw} form is not supported: use SHOW TABLES or DESCRIBE <table>"), True
        if kw not in READ_KEYWORDS:
            # What MySQL answers to prose or unknown statements, without running them.
            near = strip_comments(stmt)[:80].replace("'", "\\'")
            return QueryResult(error=f"You have an error in your SQL syntax; check the manual that corresponds to your MySQL server version for the right syntax to use near '{near}' at line 1"), False
        return self.backend.execute(self._record.db, stmt), False

    def gold_result(self, record: SQLRecord) -> QueryResult:
        """The gold query's result on this backend, run afresh like InterCode does at each
        submit: a cached result could disagree with the agent's run of the same query
        when an engine breaks ``ORDER BY ... LIMIT`` ties differently after a plan change."""
        stmts = split_statements(record.gold)
        if len(stmts) != 1:
            return QueryResult(error=f"the gold query has {len(stmts)} statements")
        return self.backend.execute(record.db, stmts[0])

    def step(self, action: str) -> StepResult:
        if self._done or self._record is None:
            raise RuntimeError("step() called without a running episode: call reset(task) first")
        self._t += 1
        parsed = parse_action(action)
        info: dict[str, Any] = {"success": False, "invalid": False, "truncated": False, "steps": self._t, "error": False, "refused": False, "submitted": False}
        reward = 0.0
        if parsed.kind == "submit":
            gold = self.gold_result(self._record)
            agent_rows = self._last.rows if self._last is not None and self._last.ok else None
            reward = intercode_reward(agent_rows, gold.rows or ()) if gold.ok else 0.0
            info.update(submitted=True, success=reward == 1.0, gold_error=gold.error)
            self._done = True
            obs = format_observation(self._last, self.obs_limit) if self._last is not None else "No query was run before submit."
        elif parsed.kind == "invalid":
            # Nothing reached the database: the last executed query stays the answer.
            info.update(invalid=True, error=True)
            obs = ERROR_PREFIX + parsed.message
        else:
            result, refused = self._run(parsed.sql)
            refused = refused or result.refused
            self._last = result
            info.update(error=not result.ok, refused=refused, invalid=refused, timed_out=result.timed_out)
            obs = format_observation(result, self.obs_limit)
        if not self._done and self._t >= self.max_steps:
            self._done = True
            info["truncated"] = True  # not submitted: unscored, as in the IPR reference (reward 0)
        return StepResult(obs, reward, self._done, info)

    # --- expert --------------------------------------------------------------------------

    def expert(self, task: Task) -> list[tuple[str, str]] | None:
        """SHOW TABLES, DESCRIBE the tables the gold query uses (at most 3, within the turn
        limit), the gold query, submit; templated thoughts. None when the gold query
        fails on this backend (no demonstration can reach reward 1)."""
        rec = self.record_of(task)
        self._done = True  # like the other adapters: an expert request ends any running episode
        if self.max_steps < 2 or not self.gold_result(rec).ok:
            return None
        gold = " ".join(split_statements(rec.gold)[0].split("\n"))
        tables = tables_in_query(self.dump, rec.db, gold)
        n_desc = max(0, min(len(tables), MAX_DESCRIBED_TABLES, self.max_steps - 3))
        plan: list[tuple[str, str]] = []
        if self.max_steps >= 3:
            plan.append((f"I should first find out which tables the {rec.db} database has.", "SHOW TABLES"))
        for i, t in enumerate(tables[:n_desc]):
            lead = "may hold what the question asks about" if i == 0 else "is also needed to answer the question"
            plan.append((f"The {t} table {lead}. I should check its columns.", f"DESCRIBE {t}"))
        if tables:
            names = ", ".join(tables[:-1]) + (" and " if len(tables) > 1 else "") + tables[-1]
            plural = "tables" if len(tables) > 1 else "table"
            plan.append((f"The {names} {plural} hold the columns I need, so I can write the query that answers the question.", gold))
        else:
            plan.append(("I can answer the question with one query.", gold))
        plan.append(("The query ran without errors and its result answers the question, so I submit it.", "submit"))
        return plan[-self.max_steps :] if len(plan) > self.max_steps else plan

    def close(self) -> None:
        self.backend.close()
        self._done = True


# --- backend agreement and benchmarking ---------------------------------------------------------


def _rows_close(a: Sequence[tuple], b: Sequence[tuple], rel: float = 1e-6) -> bool:
    def close(x: Any, y: Any) -> bool:
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            return math.isclose(float(x), float(y), rel_tol=rel, abs_tol=1e-9)
        return x == y

    key = lambda r: str(r)  # noqa: E731
    sa, sb = sorted(a, key=key), sorted(b, key=key)
    if len(sa) != len(sb):
        return False
    if all(len(r) == len(s) and all(close(x, y) for x, y in zip(r, s)) for r, s in zip(sa, sb)):
        return True
    # Sorting by str can misalign rows that differ only in float digits: try row order as given.
    return all(len(r) == len(s) and all(close(x, y) for x, y in zip(r, s)) for r, s in zip(a, b))


def compare_results(a: QueryResult, b: QueryResult, sql: str = "") -> str:
    """Why two results of the same query differ: "same", "same rows, other order", or a reason."""
    if not a.ok or not b.ok:
        if not a.ok and not b.ok:
            return "both fail"
        return "fails on first" if not a.ok else "fails on second"
    ra, rb = list(a.rows or ()), list(b.rows or ())
    if [str(r) for r in ra] == [str(r) for r in rb]:
        return "same"
    if Counter(map(str, ra)) == Counter(map(str, rb)):
        return "same rows, other order"
    if len(ra) != len(rb):
        return "different row count"
    if _rows_close(ra, rb):
        return "float rounding"
    low = lambda rows: Counter(str(tuple(v.lower() if isinstance(v, str) else v for v in r)) for r in rows)  # noqa: E731
    if low(ra) == low(rb):
        return "letter case"
    if re.search(r"\border\s+by\b.*\blimit\b", sql, re.I | re.S):
        return "tie under ORDER BY ... LIMIT"  # the order leaves several rows equal: each engine keeps another
    return "different values"


def gold_agreement(records: Sequence[SQLRecord], first: SQLBackend, second: SQLBackend) -> dict[str, Any]:
    """Run every gold query on two backends and compare: counts per reason, the
    agreement rate (same rows, any order) and InterCode's reward of one backend's
    result against the other's (mean), plus the disagreeing questions."""
    reasons: Counter = Counter()
    rewards = []
    examples: list[dict[str, Any]] = []
    for r in records:
        stmt = split_statements(r.gold)[0]
        a, b = first.execute(r.db, stmt), second.execute(r.db, stmt)
        why = compare_results(a, b, stmt)
        reasons[why] += 1
        rewards.append(intercode_reward(a.rows if a.ok else None, b.rows or ()) if b.ok else float(not a.ok))
        if why not in ("same", "same rows, other order"):
            examples.append({"index": r.index, "db": r.db, "gold": r.gold, "reason": why, "first": str(list(a.rows or ()) if a.ok else a.error)[:160], "second": str(list(b.rows or ()) if b.ok else b.error)[:160]})
    n = len(records)
    agree = reasons["same"] + reasons["same rows, other order"]
    return {"n": n, "agree": agree, "rate": agree / n if n else 1.0, "mean_cross_reward": sum(rewards) / n if n else 1.0, "reasons": dict(reasons), "disagreements": examples}


def bench_specs(mysql_url: str | None = None, task_file: str | Path | None = None, n_tasks: int = 20) -> list[dict[str, Any]]:
    """Entries for bench/envs.py: per-step latency of each backend on the same tasks.

    Each entry is {"label", "env", "options", "n_tasks"}. The MySQL entry takes
    ``mysql_url`` (else $IPR_MYSQL_URL); without one, building it raises
    ValueError, which the benchmark reports as skipped. A throwaway server:
    ``with LocalMariaDB() as server: bench_specs(server.url)``.
    """
    common: dict[str, Any] = {"task_file": str(task_file)} if task_file else {}
    url = mysql_url or os.environ.get("IPR_MYSQL_URL")
    return [
        {"label": "intercode_sql sqlite", "env": NAME, "options": {**common, "backend": "sqlite"}, "n_tasks": n_tasks},
        {"label": "intercode_sql mariadb", "env": NAME, "options": {**common, "backend": "mysql", **({"mysql_url": url} if url else {})}, "n_tasks": n_tasks},
    ]
