"""Deployment entrypoint: the pipeline with a config file path as its parameter.

Deployments (prefect.yaml) run this flow so the schedule can point at a YAML
config in the pulled project, with per-deployment overrides.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow

from flows.clusters import task_runner
from flows.ipr_pipeline import ipr_pipeline
from ipr_core.config import ConfigError, load_config


def _file(path: str, what: str) -> str:
    """``path`` (relative to the run's working directory, the checkout) or a ConfigError
    naming it and IPR_FLOW_HOME, before any work."""
    if Path(path).is_file():
        return path
    home = os.environ.get("IPR_FLOW_HOME")
    hint = f"IPR_FLOW_HOME={home}" if home else "IPR_FLOW_HOME is not set"
    raise ConfigError(f"{what} {path!r} not found in the run's working directory {os.getcwd()} ({hint}; deployments run from the ipr-flow checkout that IPR_FLOW_HOME names: export it before `prefect deploy` or on the worker)")


@flow(name="ipr-from-config", log_prints=True)
def ipr_from_config(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None) -> dict:
    """Load a YAML config (+ key.path=value overrides) and run the IPR pipeline."""
    cfg = load_config(_file(config_path, "config_path"), overrides or [])
    return ipr_pipeline.with_options(task_runner=task_runner(cfg))(cfg)


@flow(name="ipr-experiment-from-file", log_prints=True)
def ipr_experiment_from_file(experiment_path: str = "configs/experiment-gotoobj.yaml", overrides: list[str] | None = None) -> dict:
    """Load an experiment YAML (+ overrides for every run) and run the ``ipr-experiment`` flow."""
    from flows.ipr_experiment import ipr_experiment
    from ipr_core.experiment import load_experiment

    exp = load_experiment(_file(experiment_path, "experiment_path"), overrides or [])
    # the flow checks every run before any work
    return ipr_experiment(exp.model_dump(mode="json"), f"ipr experiment -c {experiment_path}")
