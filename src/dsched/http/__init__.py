"""The scheduler's HTTP server (Dask's ``distributed.http``): health, JSON, Prometheus
metrics, the opt-in ``/api/v1`` and ``/sitemap.json``, on the scheduler's event loop."""

from dsched.http.server import HttpServer

__all__ = ["HttpServer"]
