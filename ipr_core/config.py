"""One validated root config for an IPR run.

Every section is a frozen pydantic v2 model with ``extra="forbid"`` so that a
typo in a YAML file or a ``--set key.path=value`` override fails loudly, naming
the field and the bad value, instead of being silently ignored.

Defaults follow the paper (see docs/algorithm.md) where the paper gives a
number; CPU-friendly sizes are used where the paper's numbers assume 8xA100
(batch sizes, model size). ``configs/demo.yaml`` is the small embedded default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override is invalid; the message names field and value."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class EnvConfig(_Section):
    name: str = Field("babyai", description="Environment adapter name from the registry (babyai, textworld_express, scienceworld, intercode_sql).")
    options: dict[str, Any] = Field(default_factory=dict, description="Adapter-specific options (e.g. BabyAI level, ScienceWorld task names).")
    train_tasks: int = Field(64, ge=1, description="Number of training tasks (each gets one expert trajectory).")
    eval_tasks: int = Field(32, ge=1, description="Number of held-out tasks for evaluation.")
    eval_split: str = Field("test", description="Split of the held-out test tasks (the reported numbers).")
    val_tasks: int = Field(0, ge=0, description="Validation tasks (0 = none): the best iteration is chosen on them, never on the test tasks; without them it is chosen on the test tasks and reports say so.")
    val_split: str = Field("dev", description="Split of the validation tasks (babyai, textworld_express, scienceworld: dev).")
    max_steps: int | None = Field(None, ge=1, description="Episode step limit; None uses the adapter's default (paper: 10 WebShop/SQL, 20 ALFWorld).")
    workers: int = Field(4, ge=1, description="Threads stepping slow environments (JVM-backed) in the rollout runner.")
    concurrency: int | None = Field(None, ge=1, description="Episodes in flight (one environment instance each); None = sampling.batch_size. Keep small for JVM-backed environments (~0.5 GB each).")


class TinyModelConfig(_Section):
    arch: Literal["qwen2", "llama"] = Field("qwen2", description="Architecture of the locally built tiny model.")
    hidden_size: int = Field(128, ge=8, description="Hidden size of the tiny model.")
    num_layers: int = Field(4, ge=1, description="Transformer layers of the tiny model.")
    num_heads: int = Field(4, ge=1, description="Attention heads of the tiny model.")
    num_kv_heads: int = Field(2, ge=1, description="Key/value heads (GQA) of the tiny model.")
    intermediate_size: int = Field(384, ge=8, description="MLP width of the tiny model.")
    vocab_size: int = Field(1024, ge=300, description="Byte-level BPE vocabulary size trained locally.")
    max_position_embeddings: int = Field(1024, ge=64, description="Context length of the tiny model.")
    tokenizer_corpus_episodes: int = Field(200, ge=1, description="Expert episodes whose text trains the tokenizer.")
    tie_embeddings: bool = Field(True, description="Share the input embedding and output projection. vLLM's in-place weight reload (model.server.mode=reload) does not update a tied output layer, so reload mode needs false.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
        return self


class OpenAIBackendConfig(_Section):
    base_url: str = Field("http://127.0.0.1:8000/v1", description="Base URL of an OpenAI-compatible server (model.server.mode=external, when model.server.urls is empty).")
    model: str | None = Field(
        None,
        description="Not supported: a fixed model name would let every stage generate with whatever the server holds. Requests name the stage's "
        "checkpoint by its served name (ckpt-<content digest>), checked against the server's /v1/models (model.server).",
    )  # fmt: skip
    send_seed: bool = Field(True, description="Send each request's seed (reduced to 31 bits); off for servers that ignore or reject seed.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (empty key is allowed for local servers).")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    max_concurrency: int = Field(16, ge=1, description="Concurrent HTTP requests.")
    max_retries: int = Field(4, ge=0, description="Retries with exponential backoff on transient errors (timeouts, 429, 5xx).")
    backoff_s: float = Field(0.5, ge=0, description="Initial backoff in seconds, doubled per retry.")

    @model_validator(mode="after")
    def _no_fixed_name(self) -> "OpenAIBackendConfig":
        if self.model is not None:
            raise ValueError(
                f"model.openai.model={self.model!r} is not supported: every stage would generate with whatever that name serves. "
                "Use model.server.mode=managed (the pipeline serves each checkpoint), or external servers started with --served-model-name ckpt-<digest> (docs/models.md)"
            )
        return self


class ServerConfig(_Section):
    """Who serves each checkpoint to model.backend=openai (docs/models.md, "Serving with vLLM")."""

    mode: Literal["external", "managed", "reload", "lora"] = Field(
        "external",
        description="external: servers you run (model.server.urls); managed: the pipeline starts a vLLM server per checkpoint on 127.0.0.1 and stops it; "
        "reload: the pipeline's servers get each new checkpoint's weights in place (vLLM reload_weights + prefix-cache reset); "
        "lora: one managed server holds the base of the IPR iterations (the SFT model, also the scorer) and loads each iteration's LoRA adapter at run time, "
        "selected per request by name (needs training.ipr.lora=true).",
    )  # fmt: skip
    urls: list[str] = Field(default_factory=list, description="external: base URLs of your servers (one per role, e.g. scorer and policy); empty = [model.openai.base_url].")
    python: str | None = Field(None, description="managed/reload: the Python of vLLM's own environment; None = $IPR_VLLM_PYTHON, else python3 on PATH.")
    args: list[str] = Field(default_factory=list, description="managed/reload: extra server flags (on CPU: --gpu-memory-utilization 0.2 --no-enable-chunked-prefill --dtype float32).")
    env: dict[str, str] = Field(default_factory=dict, description="managed/reload: extra environment variables of the server process.")
    start_timeout_s: float = Field(900.0, gt=0, description="managed/reload: seconds a server may take to list its model.")
    max_servers: int = Field(2, ge=1, description="managed/reload/lora: servers one process keeps at once (the scorer and the policy); the least recently used idle one is stopped or reloaded.")
    max_lora_rank: Literal[8, 16, 32, 64, 128, 256, 320, 512] = Field(
        64, description="lora: the server's --max-lora-rank. Iteration k's adapter has rank k x training.ipr.lora_r (it holds every iteration's factors), "
        "so this must be at least pipeline.iterations x training.ipr.lora_r.",
    )  # fmt: skip
    max_loras: int = Field(2, ge=1, description="lora: adapters the server applies within one batch (--max-loras); more stay loaded and are swapped in.")


class ModelConfig(_Section):
    base: str = Field("tiny", description="'tiny' builds a tiny local model from the environment's text; otherwise a local checkpoint folder (copied into the store).")
    backend: Literal["transformers", "openai"] = Field("transformers", description="Generation backend: in-process transformers, or an OpenAI-compatible server (vLLM; model.server).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype; auto = bfloat16 on CUDA with bf16 support, else float32.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device for the in-process backend; auto = cuda if available.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the checkpoint (off unless you trust it).")
    replicas: int = Field(1, ge=1, description="Model replicas in worker processes (transformers backend): the lock-step runner gives each its own cohort of episodes, a plain generate call is split over them; one per GPU, or CPU cores shared out; 1 runs in-process.")
    replica_threads: int | None = Field(None, ge=1, description="Torch threads per replica on CPU; None = the cores divided by replicas.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Size of the locally built tiny model (base='tiny').")
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig, description="Settings of the OpenAI-compatible backend.")
    server: ServerConfig = Field(default_factory=ServerConfig, description="Which server generates for each checkpoint (model.backend=openai).")

    @model_validator(mode="before")
    @classmethod
    def _no_in_process_vllm(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("backend") == "vllm":
            # vLLM pins an older transformers than the project's: it can only run as a separate server
            raise ValueError("model.backend=vllm (in-process) was removed: vLLM cannot be installed beside ipr-flow's transformers. "
                             "Use model.backend=openai with model.server.mode=managed (a vLLM server in its own environment; docs/models.md)")
        return data


class SamplingConfig(_Section):
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per assistant turn.")
    batch_size: int = Field(32, ge=1, description="Conversations per generate call (the lock-step runner's concurrency).")
    history_turns: int | None = Field(2, ge=0, description="Past steps kept in the prompt; None keeps the full history (paper).")
    explore_temperature: float = Field(0.0, ge=0, description="Temperature of the agent's exploration and evaluation (paper: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling for sampled rollouts.")
    prefix_sharing: bool = Field(True, description="Reuse computed prompt prefixes (transformers backend): N samples of one state, the head a batch shares, and earlier turns' prompts and replies (KV kept across calls).")
    prefix_cache_mb: float = Field(512.0, ge=0, description="Memory for KV kept across generate calls, shared by every policy of the process (transformers backend; ~2 KB per token for the tiny model, ~56 KB for a 7B GQA model in bf16); 0 keeps none.")


class MCConfig(_Section):
    n_rollouts: int = Field(5, ge=1, description="Scorer rollouts per step (Eq. 3-5, paper N=5).")
    temperature: float = Field(1.0, gt=0, description="Scorer sampling temperature (paper 1.0).")
    shard_size: int = Field(16, ge=1, description="Trajectories per MC/exploration shard (the unit of caching and resume).")
    score_all_branches: bool = Field(
        False,
        description="Run agent MC on every exploration branch. Off (default): a branch that cannot make a step pair whatever its step reward "
        "(its outcome within pairs.tau_outcome of the expert's, pairs.step_pairs off, or, with mc.mode=rollouts, an expert step reward "
        "that leaves no pairs.tau_step margin to win in [0, 1]) gets no rollouts; exact for the pairs. "
        "On: every branch is scored (step-reward audits, training a reward model).",
    )  # fmt: skip
    expert_steps: Literal["paired", "all"] = Field(
        "paired",
        description="Which expert steps get MC step rewards. paired (default): each iteration rolls out only the expert steps its scored "
        "agent branches are compared with (Eq. 8-9's r(e_{1:j+1}) for the branch at prefix j), and an estimate an earlier iteration made "
        "comes from the memo; exact for the pairs. all: every expert step once, before iteration 1 (the reference code's order). "
        "mc.mode=reward_model or hybrid (the model's labels) and mc.score_all_branches always score every expert step up front.",
    )  # fmt: skip
    memo: bool = Field(
        True,
        description="Reuse step-reward estimates the scorer already made (the step-reward memo under the storage root's _memo/): an agent step "
        "equal to the expert's, a step an earlier iteration took, identical branches. Exact: rollout seeds derive from what decides the "
        "estimate, so a reused entry is the estimate a fresh run would make. Off: every target is rolled out (the naive cost).",
    )  # fmt: skip
    memo_ignores_thoughts: bool = Field(
        False,
        description="Approximation, off by default: reuse an estimate made at the same state and action whatever the thought text "
        "(the scorer is then conditioned on another thought than the one being scored).",
    )  # fmt: skip
    memo_flush: int = Field(32, ge=1, description="Write the memo every this many finished estimates (what a killed MC stage keeps).")
    mode: Literal["rollouts", "reward_model", "hybrid"] = Field(
        "rollouts",
        description="How agent branches get step rewards. rollouts: Eq. 3-5's scorer rollouts (the paper's main method). reward_model: "
        "from iteration mc.reward_model_from on, a learned step reward model (paper Table 5; training.reward_model) trained on the MC "
        "labels of the run so far (expert step rewards and the agent rewards of the earlier iterations) scores them, with no rollouts. "
        "hybrid: the model scores them, and rollouts replace its reward where the pair decision is within mc.hybrid_band of flipping.",
    )  # fmt: skip
    hybrid_band: float = Field(0.1, ge=0, description="mc.mode=hybrid: a target gets rollouts when, with the model's reward, Eq. 8-9's step margin is within this of tau_s.")
    reward_model_from: int = Field(2, ge=1, description="mc.mode=reward_model or hybrid: the first iteration scored by the model; iterations before it run rollouts and their labels train it (1: expert labels only).")
    reward_model_experts: bool = Field(
        False,
        description="mc.mode=reward_model: the pairs of the iterations the model scores also take the expert steps' rewards from it (both sides of "
        "Eq. 8-9's step comparison from one estimator) instead of the expert MC rewards. Expert MC still runs: its labels train the model.",
    )  # fmt: skip


class PairsConfig(_Section):
    tau_step: float = Field(0.1, ge=0, description="Step-reward margin tau_s (Eq. 8-9; paper 0.1 InterCodeSQL, 0.5 ALFWorld, 0.01 WebShop).")
    tau_outcome: float = Field(0.1, ge=0, description="Outcome-reward margin tau_o (Eq. 6-9).")
    step_variant: Literal["full", "single_action"] = Field("full", description="Step pair sides: full remainder (paper) or just the step's action (reference-code option).")
    outcome_pairs: bool = Field(True, description="Build outcome-level pairs from j=0 explorations (ETO-style).")
    step_pairs: bool = Field(True, description="Build step-level pairs from j>=1 explorations.")


class SFTConfig(_Section):
    epochs: float = Field(3.0, gt=0, description="SFT epochs (paper 3).")
    lr: float = Field(2e-5, gt=0, description="SFT learning rate (paper 2e-5; tiny models from scratch need ~1e-3).")
    batch_size: int = Field(8, ge=1, description="Per-device batch size.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Warmup fraction (paper 0.03).")
    scheduler: str = Field("cosine", description="LR schedule (paper cosine).")
    max_length: int = Field(1024, ge=16, description="Max tokens per sample (paper 4096).")
    # The budget is steps (epochs, max_steps), not time (IPRTrainConfig's are the same).
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps at most; None = from epochs. The LR schedule spans exactly min(the epochs' steps, max_steps).")
    min_steps: int = Field(1, ge=0, description="Training cut by max_time_s before this many optimizer steps is an error (0 = never).")
    max_time_s: float | None = Field(
        None, gt=0,
        description="Wall-clock safety cap, None = off: training stops between steps once reached, and the manifest says cut_by_time. "
        "A safety net only: where it cuts depends on the machine's speed, so results become machine-dependent; size training with epochs / max_steps.",
    )  # fmt: skip
    expert_episodes_multiplier: int = Field(1, ge=1, description="Extra expert episodes per training task for SFT data (more data for tiny models).")


class IPRTrainConfig(_Section):
    epochs: float = Field(3.0, gt=0, description="Epochs over the pairs per iteration (paper 3).")
    lr: float = Field(3e-6, gt=0, description="Learning rate (reference 3e-6).")
    batch_size: int = Field(8, ge=1, description="Pairs per micro-batch per process (a step sees batch_size x grad_accum x processes pairs).")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Warmup fraction (reference: constant with warmup 0.1).")
    beta: float = Field(0.1, gt=0, description="DPO beta (paper 0.1).")
    w_outcome: float = Field(1.0, ge=0, description="Weight of the outcome-DPO term (Eq. 10).")
    w_step: float = Field(1.0, ge=0, description="Weight of the step-DPO term (Eq. 10).")
    w_sft: float = Field(1.0, ge=0, description="Weight of the SFT term (Eq. 10).")
    sft_target: Literal["expert", "chosen"] = Field("expert", description="SFT term on expert trajectories (paper) or on every pair's chosen side (reference code).")
    reference: Literal["sft", "previous"] = Field("sft", description="Reference model: the SFT model, fixed (reference code), or the previous iteration's (ETO).")
    max_length: int = Field(1024, ge=16, description="Max tokens per sample.")
    lora: bool = Field(False, description="Train LoRA adapters via peft instead of full weights.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    # Per iteration, as SFTConfig's: the budget is steps (epochs, max_steps), not time.
    max_steps: int | None = Field(None, ge=1, description="Per iteration. " + SFTConfig.model_fields["max_steps"].description)
    min_steps: int = Field(1, ge=0, description="Per iteration. " + SFTConfig.model_fields["min_steps"].description)
    max_time_s: float | None = Field(None, gt=0, description="Per iteration. " + SFTConfig.model_fields["max_time_s"].description)


class RewardModelConfig(_Section):
    """The learned step reward model (paper Table 5): a scalar head on the scorer's backbone, MSE on MC step rewards."""

    epochs: float = Field(3.0, gt=0, description="Epochs over the training labels.")
    lr: float = Field(1e-4, gt=0, description="Learning rate (head and backbone).")
    batch_size: int = Field(16, ge=1, description="Labels per micro-batch per process.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Warmup fraction.")
    scheduler: str = Field("cosine", description="LR schedule.")
    max_length: int = Field(1024, ge=16, description="Max tokens of a scored context (its last tokens are kept: the step is at the end).")
    held_out: float = Field(0.2, ge=0, lt=1, description="Fraction of tasks whose labels are held out (the reported error is on them).")
    max_steps: int | None = Field(None, ge=1, description=SFTConfig.model_fields["max_steps"].description)
    min_steps: int = Field(1, ge=0, description=SFTConfig.model_fields["min_steps"].description)
    max_time_s: float | None = Field(None, gt=0, description=SFTConfig.model_fields["max_time_s"].description)


class TrainingConfig(_Section):
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Stage 0 supervised fine-tuning.")
    ipr: IPRTrainConfig = Field(default_factory=IPRTrainConfig, description="Stage 4 mixed-loss training.")
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig, description="The learned step reward model (mc.mode=reward_model).")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="Training precision; auto = bf16 on supporting GPUs, fp32 on CPU.")
    max_forward_tokens: int = Field(
        16384,
        ge=0,
        description="Padded tokens one training forward pass holds activations for: a micro-batch above it runs in length-sorted chunks under activation "
        "checkpointing (same gradients up to float rounding, one extra forward per chunk); 0 = one pass per micro-batch. Memory only: changing it reuses finished models.",
    )  # fmt: skip
    processes: int = Field(
        1,
        ge=1,
        description="Processes one SFT or IPR training stage runs on (torchrun on the node the stage runs on; DDP): one per GPU on a multi-GPU node, "
        "gloo on CPU. batch_size is per process, so a step sees batch_size x grad_accum x processes examples. The reward model trains on one.",
    )  # fmt: skip
    activation_checkpointing: bool = Field(
        True,
        description="Recompute each decoder layer's activations in the backward pass instead of keeping them (transformers' activation checkpointing): "
        "the same gradients bit for bit, one extra forward per layer, a fraction of the training memory. Memory only: changing it reuses finished models.",
    )  # fmt: skip


class ResourceRequest(_Section):
    cpus: Annotated[float, Field(gt=0)] | Literal["auto"] = Field("auto", description="CPUs the stage asks the cluster for ('auto': see the stage group).")
    gpus: Annotated[float, Field(ge=0)] | Literal["auto"] = Field("auto", description="GPUs the stage asks the cluster for ('auto': see the stage group).")


class StageResources(_Section):
    """What each group of stages asks a Ray or Dask cluster for (the threads runner ignores it).
    'auto' resolves against the cluster the run connects to (docs/scaling.md)."""

    generation: ResourceRequest = Field(
        default_factory=ResourceRequest,
        description="Stages that generate with a model (expert and agent MC, exploration, evaluation, reward-model scoring). "
        "auto: 1 CPU; model.replicas GPUs when model.device is cuda, or auto and the cluster has GPUs (none with external servers).",
    )  # fmt: skip
    environment: ResourceRequest = Field(
        default_factory=ResourceRequest,
        description="Stages that only step environments (expert trajectories). auto: env.workers CPUs (at most the largest node's), no GPU.",
    )  # fmt: skip
    training: ResourceRequest = Field(
        default_factory=ResourceRequest,
        description="SFT, IPR training, the reward model. auto: training.processes GPUs (on one node) when model.device is cuda, or auto and "
        "the cluster has GPUs, and 1 CPU; on a cluster without GPUs the CPUs of the largest node.",
    )  # fmt: skip
    light: ResourceRequest = Field(
        default_factory=ResourceRequest,
        description="Bookkeeping stages (task lists, the tiny base model, reward tables, pairs). auto: 1 CPU, no GPU.",
    )  # fmt: skip


class PipelineConfig(_Section):
    iterations: int = Field(3, ge=0, description="IPR iterations K (paper: up to 4).")
    early_stop: bool = Field(False, description="Stop when held-out reward falls below the best so far.")
    task_runner: Literal["threads", "dask", "ray"] = Field("threads", description="Prefect task runner for mapped shards.")
    max_workers: int = Field(2, ge=1, description="Thread-pool / local-cluster workers.")
    torch_threads: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto",
        description="Torch intra-op threads of each stage (set where the stage runs; every stage's manifest records what it ran with). "
        "'auto': the cores in the CPU affinity mask divided among the stages that can run at once on this machine (pipeline.max_workers; "
        "on an external Ray cluster, the CPUs the stage asked for (Ray's OMP_NUM_THREADS); on an external Dask worker, that worker's cores). None: torch's own default. On a shared host, the cores "
        "this run may use: a team wider than its share of the cores spins against other processes' threads (bench/contention.py). "
        "A speed setting: another thread count may round floats differently.",
    )  # fmt: skip
    dask_address: str | None = Field(None, description="Existing Dask scheduler address (tcp://host:8786); None starts a LocalCluster of max_workers processes.")
    ray_address: str | None = Field(None, description="Existing Ray cluster (host:6379 or ray://host:10001); None starts a local Ray instance on this machine.")
    resources: StageResources = Field(default_factory=StageResources, description="Per-stage resource requests on a Ray or Dask cluster.")
    worker_env: list[str] = Field(
        default_factory=list,
        description="Names (or fnmatch patterns, e.g. AWS_*) of this process's environment variables that Ray workers get (runtime_env); "
        "the Prefect API URL and key always go. Dask workers keep the environment they were started with.",
    )  # fmt: skip
    retries: int = Field(2, ge=0, description="Retries for transient errors (I/O, model server, env crash).")
    retry_delay_s: float = Field(2.0, ge=0, description="Initial retry delay, doubled per retry.")
    eval_base: bool = Field(True, description="Evaluate the untrained base model too (for the per-iteration table).")


class StorageConfig(_Section):
    root: str = Field("./artifacts", description="Artifact root: a local directory, s3://bucket/prefix or any fsspec URL.")
    part_rows: int = Field(50_000, ge=1, description="Rows per Parquet part file.")
    link_template: str | None = Field(
        None,
        description="How the UI links an object-store artifact: a URL with {bucket} and {key} (e.g. https://s3.console.aws.amazon.com/s3/buckets/{bucket}?prefix={key}/ "
        "or a MinIO console URL); None: artifacts are described by their URI and the command that loads them (local roots always are: a browser cannot open a local path).",
    )  # fmt: skip
    # Object stores (s3://): one call waits at most ~max_attempts x (connect + read) before it fails.
    connect_timeout_s: float = Field(5.0, gt=0, description="Object stores: seconds to wait for a connection per attempt.")
    read_timeout_s: float = Field(60.0, gt=0, description="Object stores: seconds to wait for a response per attempt (a stalled endpoint fails after max_attempts of these).")
    max_attempts: int = Field(3, ge=1, description="Object stores: attempts per call (botocore's standard retry mode: timeouts, throttling, 5xx).")
    check_timeout_s: float = Field(15.0, gt=0, description="Object stores: how long the check before a run waits for the bucket to answer.")
    shared_local_root: bool = Field(
        False,
        description="A local root that every cluster worker mounts at the same path (NFS, a shared volume): allows a local root with an external Ray or Dask cluster, which is refused otherwise.",
    )  # fmt: skip


class IPRConfig(_Section):
    """Root config of an IPR run (the Prefect flow parameter)."""

    run_name: str = Field("ipr-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name: the artifact folder under storage.root.")
    seed: int = Field(0, description="Run seed; every other seed derives from it via hashlib.")
    env: EnvConfig = Field(default_factory=EnvConfig, description="Environment and task counts.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model and generation backend.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Generation settings.")
    mc: MCConfig = Field(default_factory=MCConfig, description="Monte Carlo step rewards (Stage 1).")
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="Contrastive pair construction (Stage 3).")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="SFT and IPR training.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Orchestration.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Artifact storage.")

    def digest(self) -> str:
        """Stable content digest of the config (order-independent JSON)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _format_validation_error(err: ValidationError, source: str, what: str = "config") -> str:
    """The first problem on the first line (the CLI's one-line error), any others below it."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{loc}: {e['msg']} (got {shown})")
    more = f" (and {len(lines) - 1} more below)" if len(lines) > 1 else ""
    return "\n".join([f"invalid {what} ({source}): {lines[0]}{more}", *(f"  {x}" for x in lines[1:])])


def _parse_value(text: str) -> Any:
    # YAML scalars: "3" -> 3, "true" -> True, "null" -> None, "[1,2]" -> list.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a nested dict (a copy is returned)."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = _parse_value(raw)
    return out


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (empty file: {}); a ConfigError naming ``what`` and
    the file when it is missing, not YAML, or not a mapping at the top level."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {p} must hold a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), base: Mapping[str, Any] | None = None) -> IPRConfig:
    """Load a YAML config (or the defaults), apply overrides, validate."""
    data: dict[str, Any] = dict(base or {})
    source = "defaults"
    if path is not None:
        data.update(read_yaml_mapping(path, "config file"))
        source = str(path)
    data = apply_overrides(data, overrides)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return IPRConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def config_from_json(data: Mapping[str, Any] | IPRConfig) -> IPRConfig:
    """Validate a config given as a mapping (e.g. a Prefect parameter)."""
    if isinstance(data, IPRConfig):
        return data
    try:
        return IPRConfig.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, "parameters")) from None
