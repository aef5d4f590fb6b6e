"""InterCode task files: questions with their database and gold query, and the train/test split.

Only the 1,034 Spider-dev questions ship with InterCode-SQL, so train and test
are a deterministic split of the task file, by question (default) or by
database (whole schemas held out).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from ipr_core.envs.sql.dump import default_dump_path
from ipr_core.seeding import derive_seed

PAPER_TEST_SIZE = 200
HARDNESS = ("easy", "medium", "hard", "extra")
SplitBy = Literal["question", "database"]


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


def split_records(records: Sequence[SQLRecord], split_by: SplitBy = "question", test_size: int | float | None = None, split_seed: int = 0) -> dict[str, tuple[int, ...]]:
    """Deterministic train/test split of record indices.

    By question: a seeded permutation, the first ``k`` are test. By database:
    whole databases (in a seeded order) go to test until it holds at least
    ``k`` questions, so test schemas never appear in training; at least one
    database stays in train.
    """
    n = len(records)
    k = resolve_test_size(test_size, n)
    rng = random.Random(derive_seed("intercode_sql", "split", split_by, split_seed))
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
