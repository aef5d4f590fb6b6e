"""Progress bars for long loops, and log lines that do not break them.

One bar per long stage (episodes of a rollout stage, optimizer steps of a
training stage). Log records written to the same terminal while a bar is drawn
would land in the middle of the bar's line ("...| 12/238 [00:03<...]09:36:19
INFO ..."); `logs_above_bars` makes console handlers clear the bars, write the
record on its own line and redraw them, as `tqdm.write` does.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterable
from typing import Any

_MARK = "_ipr_logs_above_bars"


def bar(total: int, desc: str | None, unit: str, disable: bool = False) -> Any:
    """A tqdm bar over ``total`` units named ``desc`` (None: no bar); it leaves no trace when done."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=disable or not desc)


def _emit_above_bars(emit, stream, record: logging.LogRecord) -> None:
    from tqdm import tqdm

    with tqdm.external_write_mode(file=stream):
        emit(record)


def _console_handlers() -> Iterable[logging.Handler]:
    std = {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__}
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in std:
                yield h


def logs_above_bars(handlers: Iterable[logging.Handler] | None = None) -> int:
    """Make ``handlers`` (default: every handler of a logger that writes to stdout or
    stderr, Prefect's console handler included) write between progress bars.
    Idempotent; returns how many handlers it changed."""
    n = 0
    for h in list(_console_handlers() if handlers is None else handlers):
        if getattr(h, _MARK, False):
            continue
        h.emit = functools.partial(_emit_above_bars, h.emit, getattr(h, "stream", None))  # type: ignore[method-assign]
        setattr(h, _MARK, True)
        n += 1
    return n
