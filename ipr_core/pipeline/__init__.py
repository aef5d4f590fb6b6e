"""The pipeline's stages, declared once, and everything derived from them.

- ``stage``: the ``@stage`` declaration, stage identity (recipe -> identity);
- ``stages``: the IPR stages themselves (``STAGES``);
- ``view``: the config view that rejects undeclared reads;
- ``runner``: compute / reuse / copy a stage's artifact (the only writer);
- ``dag``: the run's nodes in order (flow, status, report, explain);
- ``summary``: the per-model result rows; ``explain``: why a stage would rerun.

``run_local`` executes a whole run in this process, without Prefect (the
benchmarks' baseline and the learning test use it).
"""

from __future__ import annotations

import json

from ipr_core import store
from ipr_core.config import IPRConfig
from ipr_core.pipeline.dag import Node, plan, run_plan, shard_count
from ipr_core.pipeline.placement import check_shared_storage, external_cluster
from ipr_core.pipeline.runner import Call, execute
from ipr_core.pipeline.stage import Context, Folder, Rows, Stage, stage
from ipr_core.pipeline.stages import STAGES
from ipr_core.pipeline.view import UndeclaredRead

__all__ = ["STAGES", "Call", "Context", "Folder", "Node", "Rows", "Stage", "UndeclaredRead", "check", "client_options", "execute", "plan", "run_local", "run_plan", "run_uri", "save_config", "shard_count", "stage"]


def run_uri(cfg: IPRConfig) -> str:
    """The run folder: ``{storage.root}/{run_name}``."""
    return store.join(store.normalize_uri(cfg.storage.root), cfg.run_name)


def client_options(cfg: IPRConfig) -> store.ClientOptions:
    """The object-store timeouts and retries of ``storage``; a run's flow and each
    of its tasks call the store under them (``with store.client_options(...)``)."""
    s = cfg.storage
    return store.ClientOptions(s.connect_timeout_s, s.read_timeout_s, s.max_attempts)


def check(cfg: IPRConfig) -> None:
    """What can be checked before any work starts (a ConfigError or StoreError naming
    the field): the environment and its options, a user base model's folder, the
    storage root (writable; an object store's credentials and endpoint; shared
    when stages run on an external cluster), the Dask scheduler or Ray cluster,
    and the task counts against what the environment offers."""
    from pathlib import Path

    from ipr_core.config import ConfigError
    from ipr_core.envs.registry import validate_env

    validate_env(cfg.env.name, cfg.env.options, cfg.env.max_steps)
    base = cfg.model.base
    if base != "tiny" and not (Path(base) / "config.json").is_file():
        raise ConfigError(f"model.base={base!r} is neither 'tiny' nor a local checkpoint folder (no {Path(base) / 'config.json'})")
    check_shared_storage(cfg)
    with store.client_options(client_options(cfg)):
        store.check_root(cfg.storage.root, cfg.storage.check_timeout_s)
    cluster = external_cluster(cfg)
    if cluster is not None and cluster[1] != "auto":  # ray's "auto": the cluster this machine belongs to
        _reachable(*cluster)
    _task_counts(cfg)
    _reward_model_used(cfg)
    _lora_serving(cfg)
    if cfg.model.backend == "openai":
        from ipr_core.policies.serving import check_servers

        check_servers(cfg.model)


def _reward_model_used(cfg: IPRConfig) -> None:
    """mc.mode=reward_model or hybrid in a run where no iteration would use the model is a mistake, said up front."""
    from ipr_core.config import ConfigError

    mc = cfg.mc
    if mc.reward_model_experts and mc.mode != "reward_model":
        raise ConfigError(f"mc.reward_model_experts=true needs mc.mode=reward_model (got {mc.mode!r}): only then does the model score the agent side it is compared with")
    if mc.mode == "rollouts":
        return
    if not cfg.pairs.step_pairs:
        raise ConfigError(f"mc.mode={mc.mode} needs pairs.step_pairs=true: without step pairs no step reward is used")
    if mc.reward_model_from > cfg.pipeline.iterations:
        raise ConfigError(f"mc.reward_model_from={mc.reward_model_from} is past the last iteration (pipeline.iterations={cfg.pipeline.iterations}): no iteration would use the reward model")


def _lora_serving(cfg: IPRConfig) -> None:
    """LoRA training needs peft; model.server.mode=lora serves the iterations as adapters:
    they must be trained as adapters, and the last iteration's (rank iterations x lora_r) must fit the server."""
    import importlib.util

    from ipr_core.config import ConfigError

    sv, t = cfg.model.server, cfg.training.ipr
    if t.lora and importlib.util.find_spec("peft") is None:
        raise ConfigError("training.ipr.lora=true needs peft, which is not installed: pip install 'ipr-flow[lora]'")
    if sv.mode != "lora":
        return
    if cfg.model.backend != "openai":
        raise ConfigError(f"model.server.mode=lora needs model.backend=openai (got {cfg.model.backend!r}): only a server applies adapters")
    if not t.lora:
        raise ConfigError("model.server.mode=lora needs training.ipr.lora=true: the server applies each iteration's LoRA adapter to the SFT model")
    rank = t.lora_r * cfg.pipeline.iterations
    if rank > sv.max_lora_rank:
        raise ConfigError(
            f"model.server.max_lora_rank={sv.max_lora_rank} is below the last iteration's adapter rank {rank} "
            f"(pipeline.iterations={cfg.pipeline.iterations} x training.ipr.lora_r={t.lora_r}); raise it or lower training.ipr.lora_r"
        )


def _task_counts(cfg: IPRConfig) -> None:
    """A ConfigError naming the field when the environment cannot offer the tasks the
    run asks for (the same listings the experts and eval-tasks stages make, done early)."""
    from ipr_core.config import ConfigError
    from ipr_core.envs.base import make_env

    e = cfg.env
    mult = cfg.training.sft.expert_episodes_multiplier
    train = f"env.train_tasks={e.train_tasks}" + (f" x training.sft.expert_episodes_multiplier={mult}" if mult > 1 else "")
    asked = [(train, "train", e.train_tasks * mult), (f"env.eval_tasks={e.eval_tasks} (env.eval_split={e.eval_split!r})", e.eval_split, e.eval_tasks)]
    if e.val_tasks:
        asked.append((f"env.val_tasks={e.val_tasks} (env.val_split={e.val_split!r})", e.val_split, e.val_tasks))
    env = make_env(e.name, e.options, e.max_steps)
    try:
        for what, split, n in asked:
            try:
                env.list_tasks(split, n=n, seed=cfg.seed)
            except ValueError as err:
                raise ConfigError(f"{what}: {err}") from None
    finally:
        env.close()


def _reachable(field: str, address: str, timeout_s: float = 5.0) -> None:
    """A ConfigError naming ``field`` unless a TCP connection to ``address`` ("tcp://host:port") opens."""
    import socket
    from urllib.parse import urlsplit

    from ipr_core.config import ConfigError

    u = urlsplit(address if "://" in address else f"tcp://{address}")
    if not u.hostname or not u.port:
        raise ConfigError(f"{field}={address!r} is not an address of the form tcp://host:port")
    try:
        socket.create_connection((u.hostname, u.port), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"{field}={address!r} is not reachable within {timeout_s:.0f} s: {e}") from None


def save_config(cfg: IPRConfig) -> str:
    """Write the run's config (what ``ipr resume`` reloads) into its folder."""
    return store.write_bytes(store.join(run_uri(cfg), "config.json"), json.dumps(cfg.model_dump(mode="json"), indent=2).encode())


def run_local(cfg: IPRConfig, *, until: str | None = None) -> list[Node]:
    """Execute every node of the run in order in this process (no Prefect);
    stop after the node whose key is ``until``. Returns the nodes executed."""
    from ipr_core.lease import Lease

    check(cfg)
    run, root = run_uri(cfg), store.normalize_uri(cfg.storage.root)
    with Lease(run):
        return _run_nodes(cfg, run, root, until)


def _run_nodes(cfg: IPRConfig, run: str, root: str, until: str | None) -> list[Node]:
    save_config(cfg)
    first = plan(cfg, 1)[0]  # the experts decide the shard count
    execute(first.call(run), cfg, root)
    done = []
    for n in run_plan(cfg, run):
        execute(n.call(run), cfg, root)
        done.append(n)
        if n.key == until:
            break
    return done
