"""Environments: one protocol (``base.Environment``), many adapters, one registry (``registry.py``)."""

from ipr_core.envs.base import Environment, EnvError, StepResult, replay
from ipr_core.envs.registry import EnvOptions, available_envs, env_factory, env_options, make_env, options_model, register_env, validate_env

__all__ = ["Environment", "EnvError", "EnvOptions", "StepResult", "available_envs", "env_factory", "env_options", "make_env", "options_model", "register_env", "replay", "validate_env"]
