"""Scheduling policies: which worker runs a ready task. See ``protocol`` for the messages."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from dsched.policy.blevel import BLevelPolicy
from dsched.policy.common import PolicyConfig
from dsched.policy.dask_like import DaskPolicy
from dsched.policy.locality import LocalityPolicy
from dsched.policy.protocol import Policy
from dsched.policy.random import RandomPolicy
from dsched.policy.workstealing import WorkStealingPolicy


def _locality(config: PolicyConfig) -> Policy:
    return LocalityPolicy(bandwidth=config.bandwidth)


POLICIES: dict[str, Callable[[PolicyConfig], Policy]] = {
    "locality": _locality,
    "random": RandomPolicy,
    "workstealing": WorkStealingPolicy,
    "blevel": BLevelPolicy,
    "dask": DaskPolicy,
}
# dask: root-task queuing bounds memory, and on a quiet machine it beat locality on merge-10k
# and map-10k and over the benchmark set (docs/policies.md, "Cost per task and the default").
DEFAULT_POLICY = "dask"

__all__ = ["DEFAULT_POLICY", "POLICIES", "PolicyConfig", "make_policy"]


def make_policy(name: str, config: PolicyConfig | None = None) -> Policy:
    """A policy by registered name, or a user's class by dotted path ``pkg.module:Class``.

    Built-in policies get ``config``; a user's class is called with no arguments.
    """
    config = config if config is not None else PolicyConfig()
    if name in POLICIES:
        return POLICIES[name](config)
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        policy_class = getattr(importlib.import_module(module_name), class_name)
        policy: Policy = policy_class()
        return policy
    known = ", ".join(sorted(POLICIES))
    raise ValueError(f"unknown policy {name!r}: use one of {known} or 'package.module:Class'")
