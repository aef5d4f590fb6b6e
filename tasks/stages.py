"""One Prefect task per declared stage (ipr_core.pipeline.STAGES), derived, never written by hand."""

from __future__ import annotations

from ipr_core.pipeline import STAGES
from tasks.common import stage_task

TASKS = {name: stage_task(st) for name, st in STAGES.items()}
