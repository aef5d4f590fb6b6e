"""Environments: one protocol (``base.Environment``), many adapters, one registry."""

from ipr_core.envs.base import Environment, EnvError, StepResult, available_envs, env_factory, make_env, register_env, replay

__all__ = ["Environment", "EnvError", "StepResult", "available_envs", "env_factory", "make_env", "register_env", "replay"]
