"""Policies: one protocol (``base.Policy``), many generation backends."""

from ipr_core.policies.base import Policy, PolicyError, SamplingParams

__all__ = ["Policy", "PolicyError", "SamplingParams"]
