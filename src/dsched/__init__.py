"""dsched: a fast drop-in replacement for the Dask distributed scheduler."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``dsched.LocalCluster``, imported on first use (PEP 562): importing dsched stays
    cheap (no dask, no distributed)."""
    if name == "LocalCluster":
        from dsched.deploy import LocalCluster

        return LocalCluster
    raise AttributeError(f"module 'dsched' has no attribute {name!r}")
