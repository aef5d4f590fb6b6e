"""The protocol both SQL backends implement.

A backend serves the dump's databases and runs one already vetted statement
(``sandbox.py``) at a time, within its ``Limits``, returning rows normalised
with ``plain_value`` (``results.py``) so that tasks, observations and rewards
agree across backends (``docs/intercode_sql.md`` lists where they cannot).
Backends know nothing about episodes or rewards: see ``intercode_sql.py``.
"""

from __future__ import annotations

from typing import Protocol

from ipr_core.envs.sql.dump import Dump
from ipr_core.envs.sql.results import QueryResult
from ipr_core.envs.sql.sandbox import Limits


class SQLBackend(Protocol):
    kind: str  # "sqlite" | "mysql"
    dump: Dump
    limits: Limits

    def execute(self, db: str, sql: str) -> QueryResult:
        """Run one (already vetted) statement in database ``db``; errors come back in the result."""

    def reset_session(self, db: str) -> None:
        """Start a clean session on ``db`` (no state left from earlier statements)."""

    def close(self) -> None: ...
