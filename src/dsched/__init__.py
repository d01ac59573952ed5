"""dsched: a fast drop-in replacement for the Dask distributed scheduler."""

__version__ = "0.1.0"
