"""InterCode-SQL: answer Spider questions by querying a database (the IPR paper's SQL benchmark).

An episode is one question about one of the 20 Spider-dev databases. Each
action is one read-only SQL statement (plain SQL, a ```sql block or
``execute[...]`` on the Action line) whose result rows, or error, come back
as the observation (InterCode's ``str`` of a list of tuples, cut to 350
characters as in the IPR reference code); ``submit`` ends the episode and
scores the result of the LAST query run (``intercode_reward``: InterCode's
intersection-over-union of result rows scaled by their order agreement).
Paper settings: at most 10 turns, success only at reward 1.0.

Two backends serve the same databases (the ``ipr_core.envs.sql`` package): an
embedded read-only SQLite copy of InterCode's MySQL dump (default, no server)
and a MariaDB/MySQL server (InterCode's own setting). ``SHOW TABLES`` and
``DESCRIBE <table>`` are answered from the dump's schema on both, in MySQL 8's
format (InterCode's server), so the expert's exploration and the agent's
observations do not depend on the backend. ``docs/intercode_sql.md`` lists
every deviation from InterCode and where the two backends disagree.

Splits: the paper trained on 1,500 Spider-train questions and tested on 200;
only the 1,034 dev questions ship here, so train/test are a deterministic
split of the task file (``sql/tasks.py``), by question (default) or by
database (a harder test of generalisation to unseen schemas).
"""

from __future__ import annotations

import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

from pydantic import BeforeValidator, Field, field_validator

from ipr_core.envs.base import ConfiguredEnv, StepResult, check_split, first_n, require_episode
from ipr_core.envs.registry import EnvOptions, comma_separated, subset_of
from ipr_core.envs.sql import (  # noqa: F401  (re-exported: the adapter's public names)
    ERROR_PREFIX,
    HARDNESS,
    NO_OUTPUT,
    OBS_LIMIT,
    PAPER_TEST_SIZE,
    Limits,
    MySQLBackend,
    MySQLURL,
    QueryResult,
    ReadOnlyAccount,
    SQLBackend,
    SQLiteBackend,
    SQLRecord,
    default_dump_path,
    default_task_file,
    format_observation,
    keyword_verdict,
    load_records,
    meta_command,
    parse_dump,
    resolve_test_size,
    single_statement,
    split_records,
    split_statements,
    strip_comments,
    tables_in_query,
)
from ipr_core.seeding import derive_seed
from ipr_core.types import Task

NAME = "intercode_sql"
DEFAULT_MAX_STEPS = 10  # paper: 10 turns for InterCode-SQL
SPLITS = ("train", "test")
MAX_DESCRIBED_TABLES = 3  # expert exploration: DESCRIBE at most this many tables


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


# --- the environment --------------------------------------------------------------------------


class InterCodeSQLOptions(EnvOptions):
    """Options of ``intercode_sql`` (``docs/intercode_sql.md``, "Options")."""

    task_file: Path | None = Field(None, description="InterCode task file (.json list, .jsonl or .csv); None: intercode-bench's 23-question sample. The full 1,034-question file: see docs/intercode_sql.md.")
    split_by: Literal["question", "database"] = Field("question", description="'question' (random questions) or 'database' (whole databases held out: unseen schemas).")
    hardness: Annotated[tuple[str, ...] | None, BeforeValidator(comma_separated), subset_of("hardness", HARDNESS)] = Field(
        None, description=f"Keep only these Spider hardness levels ({', '.join(HARDNESS)}), applied after the split; files without hardness keep all."
    )
    test_size: int | float | None = Field(None, description="Test questions: an int count, a float fraction in (0, 1); None: 200 capped at 20% of the file.")
    split_seed: int = Field(0, description="Seed of the train/test split (not of list_tasks' order).")
    backend: Literal["sqlite", "mysql"] = Field("sqlite", description="'sqlite' (embedded, read-only cached copies of the dump) or 'mysql' (a MariaDB/MySQL server).")
    mysql_url: str | None = Field(None, description="mysql://user:password@host:port of an account that may create databases and users; None: $IPR_MYSQL_URL.")
    statement_timeout_s: float = Field(5.0, gt=0, description="Per-statement time limit on both backends.")
    dump_path: Path | None = Field(None, description="The MySQL dump; None: intercode-bench's.")
    cache_dir: Path | None = Field(None, description="The SQLite cache root; None: $IPR_CACHE_DIR or ~/.cache/ipr-flow.")
    tables_in_prompt: bool = Field(False, description="Also list the database's tables in the first message.")
    obs_limit: int = Field(OBS_LIMIT, ge=1, description="Observation length cut (IPR: 350).")
    max_rows: int = Field(100_000, ge=1, description="Larger results are an error.")
    max_cell_bytes: int = Field(Limits.max_cell_bytes, ge=1, description="A result holding a larger value (text or blob bytes) is an error; SQLite does not even build it.")
    max_result_bytes: int = Field(Limits.max_result_bytes, ge=1, description="A result whose values weigh more bytes in all is an error.")
    max_columns: int = Field(Limits.max_columns, ge=1, description="A result with more columns is an error.")
    readonly_user: str = Field("ipr_agent", description="The server account the agent's queries run as.")
    readonly_password: str = Field("ipr_agent", description="Its password.")

    @field_validator("test_size")
    @classmethod
    def _test_size(cls, test_size: int | float | None) -> int | float | None:
        if isinstance(test_size, float) and not 0 < test_size < 1:
            raise ValueError(f"a fractional test_size must be in (0, 1), got {test_size}")
        if isinstance(test_size, int) and test_size < 0:
            raise ValueError(f"test_size must be >= 0, got {test_size}")
        return test_size

    @field_validator("mysql_url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is not None:
            MySQLURL.parse(url)  # the scheme; the password never reaches the message
        return url


class InterCodeSQLEnv(ConfiguredEnv, name=NAME, options=InterCodeSQLOptions):
    """InterCode-SQL on SQLite (default) or a MariaDB/MySQL server (``backend="mysql"``)."""

    def _configure(self, o: InterCodeSQLOptions) -> None:
        self.max_steps = int(o.max_steps or DEFAULT_MAX_STEPS)
        self.obs_limit = o.obs_limit
        self.tables_in_prompt = o.tables_in_prompt
        self._load_tasks(o)
        self._load_dump(o)
        self.backend_kind = o.backend
        self.backend: SQLBackend = self._open_backend(o)
        self._record: SQLRecord | None = None
        self._last: QueryResult | None = None

    def _load_tasks(self, o: InterCodeSQLOptions) -> None:
        """The task file's questions and their train/test split."""
        self.task_file = o.task_file.expanduser() if o.task_file is not None else default_task_file()
        self.records = load_records(self.task_file)
        self.split_by = o.split_by
        self.hardness = o.hardness or None
        self.splits = split_records(self.records, o.split_by, o.test_size, o.split_seed)

    def _load_dump(self, o: InterCodeSQLOptions) -> None:
        """The dump's databases, which must hold every database the questions use."""
        self.dump = parse_dump(o.dump_path or default_dump_path())
        unknown = sorted({r.db for r in self.records if r.db.lower() not in self.dump.databases})
        if unknown:
            raise ValueError(f"{self.task_file.name} uses databases the dump lacks: {unknown}")

    def _open_backend(self, o: InterCodeSQLOptions) -> SQLBackend:
        limits = Limits(o.statement_timeout_s, o.max_rows, o.max_cell_bytes, o.max_result_bytes, o.max_columns)
        if o.backend == "sqlite":
            return SQLiteBackend(self.dump, o.cache_dir, limits)
        url = o.mysql_url or os.environ.get("IPR_MYSQL_URL")
        if not url:
            raise ValueError("backend='mysql' needs mysql_url (mysql://user:password@host:port) or $IPR_MYSQL_URL")
        return MySQLBackend(self.dump, url, limits, ReadOnlyAccount(o.readonly_user, o.readonly_password))

    # --- tasks ---------------------------------------------------------------------------

    def list_tasks(self, split: str, n: int | None = None, seed: int = 0) -> list[Task]:
        """``n`` questions of ``split`` (after the hardness filter) in a seeded, prefix-stable order."""
        check_split(self.name, split, SPLITS)
        idx = [i for i in self.splits[split] if self.hardness is None or self.records[i].hardness in self.hardness or self.records[i].hardness is None]
        random.Random(derive_seed(NAME, self.task_file.name, split, seed)).shuffle(idx)
        idx = first_n(idx, n, f"{split} questions in {self.task_file.name} (split_by={self.split_by}, hardness={self.hardness})")
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
        stmt, refusal = single_statement(sql)
        if refusal is not None:
            return refusal, True
        meta = meta_command(self.dump, self._record.db, stmt)
        if meta is not None:
            return meta, False
        verdict = keyword_verdict(stmt)
        if verdict is not None:
            return verdict
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
        require_episode(self._done or self._record is None)
        assert self._record is not None
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
