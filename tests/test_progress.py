"""Log lines and progress bars share a terminal without breaking each other."""

import io
import logging

from ipr_core.progress import bar, logs_above_bars


def _log_and_draw(fix: bool) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test_progress.{fix}")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    if fix:
        assert logs_above_bars([handler]) == 1
        assert logs_above_bars([handler]) == 0  # idempotent: wrapped once
    from tqdm import tqdm

    b = tqdm(total=4, desc="sft/model", file=out, leave=False, mininterval=0, ascii=True)
    b.update(2)
    logger.info("step 2/4 loss 0.5")
    b.update(2)
    b.close()
    return out.getvalue()


def _line_of(text: str, needle: str) -> str:
    line = next(ln for ln in text.split("\n") if needle in ln)
    return line.split("\r")[-1]  # what the terminal shows after the last carriage return


def test_log_line_lands_on_its_own_line_with_the_fix():
    assert _line_of(_log_and_draw(True), "step 2/4").startswith("INFO step 2/4")


def test_without_the_fix_the_log_line_runs_into_the_bar():
    # The check above can fail: the same drawing without the wrapper glues the
    # record onto the bar's line.
    shown = _line_of(_log_and_draw(False), "step 2/4")
    assert shown.startswith("sft/model") and shown.endswith("INFO step 2/4 loss 0.5")


def test_bar_without_a_name_is_disabled():
    assert bar(10, None, "ep").disable and not bar(10, "x", "ep", disable=False).disable


def test_cli_turns_client_telemetry_off_with_analytics(monkeypatch):
    from ipr_cli.pipeline import _prefect_env

    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    _prefect_env()
    import os

    assert os.environ["DO_NOT_TRACK"] == "1"
    monkeypatch.delenv("DO_NOT_TRACK")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")  # a user who wants telemetry keeps it
    _prefect_env()
    assert "DO_NOT_TRACK" not in os.environ
