"""What a statement produced, one representation on both backends, and how an
observation prints it."""

from __future__ import annotations

import datetime as _dt
import decimal
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

OBS_LIMIT = 350  # IPR reference: observations longer than 350 characters are cut (+ "...")
ERROR_PREFIX = "Error executing query: "  # InterCode's wording
NO_OUTPUT = "[Executed Successfully with No Output]"  # IPR reference's wording


def plain_value(v: Any) -> Any:
    """One representation per value on both backends (what observations and rewards compare).

    MySQL's DECIMAL results (SUM of ints, AVG, DECIMAL columns) become int when
    they carry no fraction digits (``Decimal('15')`` from SUM) and float
    otherwise (``Decimal('3.5000')`` from AVG), which is what SQLite computes
    for the same expressions; dates and times become the strings SQLite stores.
    """
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, decimal.Decimal):
        exponent = v.as_tuple().exponent
        if isinstance(exponent, int) and exponent >= 0:
            return int(v)
        return float(v)
    if isinstance(v, _dt.datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, (_dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        total = int(v.total_seconds())
        sign, total = ("-" if total < 0 else ""), abs(total)
        return f"{sign}{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", errors="replace")
    if isinstance(v, set):
        return ",".join(sorted(v))
    return str(v)


@dataclass(frozen=True)
class QueryResult:
    """What one statement produced: rows (normalised with ``plain_value``) or an error message."""

    rows: tuple[tuple[Any, ...], ...] | None = None  # None: no result set (or an error)
    error: str | None = None  # the database's message, MySQL wording where translated
    timed_out: bool = False
    refused: bool = False  # the database refused it as a write or a privilege violation

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def of_rows(cls, rows: Iterable[Sequence[Any]]) -> "QueryResult":
        """A result set as a driver returned it, every value through ``plain_value``."""
        return cls(rows=tuple(tuple(plain_value(v) for v in r) for r in rows))


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
