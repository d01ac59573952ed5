"""Scheduler extensions: pure features plugged into the core (see ``protocol``)."""

from dsched.ext.protocol import (
    NO_EFFECTS,
    CancelTimer,
    Effect,
    Effects,
    Extension,
    Fail,
    Log,
    Observe,
    Reply,
    Request,
    Rpc,
    SetTimer,
    Stimulus,
    ToClient,
    ToWorker,
)

__all__ = [
    "NO_EFFECTS",
    "CancelTimer",
    "Effect",
    "Effects",
    "Extension",
    "Fail",
    "Log",
    "Observe",
    "Reply",
    "Request",
    "Rpc",
    "SetTimer",
    "Stimulus",
    "ToClient",
    "ToWorker",
]
