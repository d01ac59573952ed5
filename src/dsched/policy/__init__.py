"""Scheduling policies: which worker runs a ready task. See ``protocol`` for the messages."""

from __future__ import annotations

import importlib

from dsched.policy.locality import LocalityPolicy
from dsched.policy.protocol import Policy

POLICIES = {"locality": LocalityPolicy}
DEFAULT_POLICY = "locality"


def make_policy(name: str) -> Policy:
    """A policy by registered name, or a user's class by dotted path ``pkg.module:Class``."""
    if name in POLICIES:
        return POLICIES[name]()
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        policy_class = getattr(importlib.import_module(module_name), class_name)
        policy: Policy = policy_class()
        return policy
    known = ", ".join(sorted(POLICIES))
    raise ValueError(f"unknown policy {name!r}: use one of {known} or 'package.module:Class'")
