"""The ``ipr-experiment`` flow: every (seed, variant) of an experiment as an
``ipr-pipeline`` subflow, then the experiment's table, plot and report.

Runs go seed-major, one at a time: a seed's first variant computes the stages
its variants share (experts, SFT, expert MC, base/SFT evaluations), the others
copy them. Rerunning a killed experiment reuses every finished stage of every
run (manifests and identities), so it recomputes only what did not finish.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from ipr_core import report as rep
from ipr_core import store
from ipr_core.audit import run_audit
from ipr_core.lease import Lease
from ipr_core.experiment import audited, expand, experiment_from_json, experiment_uri, results, save_experiment
from ipr_core.pipeline import check, client_options
from flows.clusters import task_runner
from flows.ipr_pipeline import artifact_key, ipr_pipeline


def _run_name() -> str:
    exp = (flow_run.parameters or {}).get("experiment") or {}
    name = exp.get("name", "experiment") if isinstance(exp, dict) else getattr(exp, "name", "experiment")
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


@flow(name="ipr-experiment", flow_run_name=_run_name, log_prints=True)
def ipr_experiment(experiment: dict, command: str | None = None, take_over: bool = False) -> dict:
    """Run every variant x seed of ``experiment`` (an ExperimentConfig as a mapping) and report.
    The experiment holds a lease on its folder, each run on its own (``take_over``: dead holders')."""
    exp = experiment_from_json(experiment)
    runs = expand(exp)
    for r in runs:
        check(r.cfg)
    with store.client_options(client_options(runs[0].cfg)), Lease(experiment_uri(exp), take_over):
        return _experiment(exp, runs, command, take_over)


def _experiment(exp, runs, command: str | None, take_over: bool) -> dict:
    save_experiment(exp)
    logger = get_run_logger()
    for i, r in enumerate(runs, 1):
        logger.info("experiment %s: run %d/%d: %s (seed %d)", exp.name, i, len(runs), r.variant, r.seed)
        ipr_pipeline.with_options(task_runner=task_runner(r.cfg))(r.cfg, take_over)
    for r in audited(exp, runs):
        if store.read_manifest(store.join(r.uri, "audit", "iter-01")) is None:  # done once; a rerun keeps it
            logger.info("step-reward audit of %s: %d reference rollouts per step, %d step pairs", r.uri, exp.audit_rollouts, exp.audit_sample)
            run_audit(r.cfg, r.uri, 1, exp.audit_rollouts, exp.audit_sample)
    res = results(exp, runs)
    md, md_uri = rep.write_experiment_report(experiment_uri(exp), res, command)
    create_markdown_artifact(md, key=artifact_key(exp.name, "experiment-report"), description=f"Experiment report ({md_uri})")
    create_table_artifact([rep.rounded(r) for r in res["table"]], key=artifact_key(exp.name, "experiment-results"), description="Test numbers per variant and model: mean over seeds, 95% intervals")
    table = rep.experiment_table(res)
    logger.info("experiment results:\n%s", table)
    return {"folder": experiment_uri(exp), "table": table, "report": md_uri, "results": res}
