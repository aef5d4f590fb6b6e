"""What each stage asks a Ray or Dask cluster for (pipeline.resources, 'auto'
resolved against the cluster's nodes), and the checks made before the first
submission: requests no node can meet, and storage the workers cannot share.
Pure functions: the clusters themselves are in test_clusters.py."""

from __future__ import annotations

import pytest

from ipr_core.config import ConfigError, load_config
from ipr_core.pipeline import stages
from ipr_core.pipeline.placement import Node, Request, check_feasible, check_shared_storage, external_cluster, request
from ipr_core.pipeline.stage import NEEDS, Stage

CPU_NODES = (Node(4), Node(2))
GPU_NODES = (Node(16, 8), Node(8))


def cfg(*sets: str):
    return load_config(overrides=list(sets))


def test_every_stage_declares_a_known_group_and_heavy_stages_are_not_light():
    by_name = {st.name: st.needs for st in vars(stages).values() if isinstance(st, Stage)}
    assert len(by_name) > 10 and set(by_name.values()) <= set(NEEDS)
    assert by_name["sft"] == by_name["train"] == "training"
    assert by_name["expert-mc"] == by_name["agent-mc"] == by_name["explore"] == by_name["evaluate"] == "generation"
    assert by_name["experts"] == "environment"


def test_auto_asks_a_cpu_cluster_for_cpus_and_a_gpu_cluster_for_gpus():
    c = cfg("env.workers=3")
    assert request(c, "generation", CPU_NODES) == Request(1.0, 0.0)
    assert request(c, "environment", CPU_NODES) == Request(3.0)
    assert request(c, "training", CPU_NODES) == Request(4.0)  # the largest node's CPUs
    assert request(c, "light", CPU_NODES) == Request(1.0)
    # model.device=auto on a cluster with GPUs: generation and training take GPUs, environments none
    assert request(c, "generation", GPU_NODES) == Request(1.0, 1.0)
    assert request(c, "training", GPU_NODES) == Request(1.0, 1.0)
    assert request(c, "environment", GPU_NODES).gpus == 0.0
    # one GPU per training process, and one per replica for generation
    g = cfg("training.processes=4", "model.replicas=2", "model.device=cuda")
    assert request(g, "training", CPU_NODES) == Request(1.0, 4.0)
    assert request(g, "generation", CPU_NODES) == Request(1.0, 2.0)


def test_a_served_model_needs_no_gpu_in_the_generation_stage_and_explicit_values_win():
    served = cfg("model.backend=openai", "model.openai.base_url=http://127.0.0.1:1/v1")
    assert request(served, "generation", GPU_NODES) == Request(1.0, 0.0)
    managed = cfg("model.backend=openai", "model.server.mode=managed")  # the stage starts its server where it runs
    assert request(managed, "generation", GPU_NODES) == Request(1.0, 1.0)
    fixed = cfg("pipeline.resources.training.cpus=2", "pipeline.resources.training.gpus=0", "pipeline.resources.generation.gpus=0.5")
    assert request(fixed, "training", GPU_NODES) == Request(2.0, 0.0)
    assert request(fixed, "generation", GPU_NODES) == Request(1.0, 0.5)


def test_a_request_no_node_can_meet_is_refused_with_the_field_and_the_nodes():
    c = cfg("pipeline.resources.training.cpus=6")
    with pytest.raises(ConfigError, match=r"pipeline\.resources\.training asks each stage for 6 CPU, but no Dask node .*nodes: 4 CPU, 2 CPU"):
        check_feasible(c, CPU_NODES, "Dask")
    with pytest.raises(ConfigError, match="2 GPU"):  # a GPU stage never goes to a node without GPUs
        check_feasible(cfg("model.device=cuda", "training.processes=2"), (Node(8, 1), Node(8)), "Ray")
    with pytest.raises(ConfigError, match="no live worker"):
        check_feasible(c, (), "Ray")
    assert set(check_feasible(cfg(), CPU_NODES, "Ray")) == set(NEEDS)


@pytest.mark.parametrize(
    "sets, refused",
    [
        (("pipeline.task_runner=ray", "pipeline.ray_address=ray://10.0.0.1:10001"), True),
        (("pipeline.task_runner=dask", "pipeline.dask_address=tcp://10.0.0.1:8786"), True),
        (("pipeline.task_runner=dask", "pipeline.dask_address=tcp://10.0.0.1:8786", "storage.shared_local_root=true"), False),
        (("pipeline.task_runner=dask", "pipeline.dask_address=tcp://10.0.0.1:8786", "storage.root=s3://bucket/runs"), False),
        (("pipeline.task_runner=ray",), False),  # a local Ray instance shares this machine's disk
        (("pipeline.task_runner=dask",), False),  # and so does a LocalCluster
    ],
)
def test_local_storage_is_refused_only_when_stages_leave_the_machine(sets, refused):
    c = cfg(*sets)
    assert (external_cluster(c) is not None) == any("address" in s for s in sets)
    if refused:
        with pytest.raises(ConfigError, match=r"storage\.root=.* is local to this machine.*s3://"):
            check_shared_storage(c)
    else:
        check_shared_storage(c)
