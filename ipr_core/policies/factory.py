"""Build the configured generation backend: one place that knows them all."""

from __future__ import annotations

import os

from ipr_core.config import ModelConfig, SamplingConfig
from ipr_core.policies.base import Policy
from ipr_core.policies.serving import Served


def make_policy(model_cfg: ModelConfig, sampling_cfg: SamplingConfig, model_path: str, served: Served | None = None) -> Policy:
    """A Policy for ``model_cfg.backend``.

    ``model_path``: a local checkpoint folder for ``transformers``. For
    ``openai``, ``served`` says which server and name generate (the pipeline
    resolves it with ``serving.connect``, checked against what the server
    lists); without it, requests go to ``model.openai.base_url`` under the
    name ``model_path``, unchecked (for calls outside the pipeline).
    """
    backend = model_cfg.backend
    if model_cfg.replicas > 1 and backend != "transformers":
        raise ValueError(f"model.replicas={model_cfg.replicas} needs model.backend=transformers (a {backend} server batches and parallelises on its side)")
    if backend == "transformers":
        from ipr_core.policies.hf import TransformersPolicy

        kwargs = dict(
            device=model_cfg.device,
            dtype=model_cfg.dtype,
            batch_size=sampling_cfg.batch_size,
            prefix_sharing=sampling_cfg.prefix_sharing,
            prefix_cache_mb=sampling_cfg.prefix_cache_mb,
            trust_remote_code=model_cfg.trust_remote_code,
        )
        if model_cfg.replicas > 1:
            from functools import partial

            from ipr_core.policies.replicated import ReplicatedPolicy, build_transformers_replica, default_threads

            threads = model_cfg.replica_threads or default_threads(model_cfg.replicas)
            return ReplicatedPolicy(partial(build_transformers_replica, str(model_path), kwargs), model_cfg.replicas, threads=threads)
        return TransformersPolicy(model_path, **kwargs)
    if backend == "openai":
        from ipr_core.policies.openai_http import OpenAIChatPolicy

        o = model_cfg.openai
        return OpenAIChatPolicy(
            served.base_url if served else o.base_url,
            served.model if served else model_path,
            api_key=os.environ.get(o.api_key_env) or None,
            timeout_s=o.timeout_s,
            max_concurrency=o.max_concurrency,
            max_retries=o.max_retries,
            backoff_s=o.backoff_s,
            send_seed=o.send_seed,
        )
    raise ValueError(f"unknown model.backend {backend!r}; expected transformers or openai")
