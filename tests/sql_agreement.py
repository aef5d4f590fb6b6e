"""How far the two InterCode-SQL backends agree: every gold query on both, compared.

``gold_agreement`` is what the slow parity test (and ``docs/intercode_sql.md``,
"Parity between the backends") reports: counts per reason, the agreement rate
(same rows, any order) and InterCode's reward of one backend's result against
the other's.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Sequence

from ipr_core.envs.intercode_sql import intercode_reward
from ipr_core.envs.sql import QueryResult, SQLBackend, SQLRecord, split_statements


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
