"""The route modules of ``distributed.scheduler.http.routes``, served by dsched.

Dask's config lists modules whose ``routes`` it imports; dsched maps each module name it
knows to its own handlers (same paths, same replies). ``/health`` is served whatever the
list says. A module dsched does not serve (``proxy``, a user's own module, whose handlers
expect a Dask ``Scheduler``) is skipped with a log line; of ``info`` dsched serves
``/individual-plots.json`` only. The dashboard's pages and data (``dashboard.py``) are the
module ``DASHBOARD``, added unless ``--no-dashboard``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tornado import web

from dsched.http import api, dashboard, metrics

if TYPE_CHECKING:
    from dsched.http.server import HttpServer

logger = logging.getLogger("dsched.http")

# What tornado sends for a dict written (Dask's json routes do that).
TORNADO_JSON = "application/json; charset=UTF-8"

Route = tuple[str, type[web.RequestHandler], dict[str, Any]]


class Handler(web.RequestHandler):
    def initialize(self, http: HttpServer) -> None:
        self.http = http

    def write_json(self, value: Any, content_type: str = "application/json") -> None:
        self.set_header("Content-Type", content_type)
        self.write(json.dumps(value, default=str))


class HealthHandler(web.RequestHandler):
    def get(self) -> None:
        self.write("ok")
        self.set_header("Content-Type", "text/plain; charset=utf-8")


class CountsJSON(Handler):
    def get(self) -> None:
        self.write_json(api.counts(self.http.scheduler), TORNADO_JSON)


class IdentityJSON(Handler):
    def get(self) -> None:
        self.write_json(self.http.scheduler.identity(), TORNADO_JSON)


class MetricsHandler(Handler):
    def get(self) -> None:
        self.write(metrics.render(self.http.registry))
        self.set_header("Content-Type", "text/plain; version=0.0.4")


class APIHandler(Handler):
    def get(self) -> None:
        self.write("API V1")
        self.set_header("Content-Type", "text/plain; charset=utf-8")


class BadRequest(ValueError):
    pass


def _retire_arguments(body: bytes, scheduler: Any) -> list[str]:
    try:
        params = json.loads(body or b"{}")
    except ValueError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise BadRequest('expected a JSON object: {"n": k} or {"workers": [address, ...]}')
    n = params.get("n", 0)
    if n:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise BadRequest(f"'n' must be a non-negative integer, got {n!r}")
        return api.workers_to_close(scheduler, n)
    workers = params.get("workers", [])
    if not isinstance(workers, list) or not all(isinstance(w, str) for w in workers):
        raise BadRequest(f"'workers' must be a list of addresses, got {workers!r}")
    return workers


class RetireWorkersHandler(Handler):
    async def post(self) -> None:
        scheduler = self.http.scheduler
        try:
            workers = _retire_arguments(self.request.body, scheduler)
        except BadRequest as exc:
            self.set_status(400)
            self.write_json({"Error": str(exc)})
            return
        try:
            retired = await scheduler.reactor.request(
                "retire_workers",
                "http",
                {"workers": workers, "close_workers": False, "remove": True},
            )
        except Exception as exc:
            logger.warning("retire_workers from HTTP failed: %r", exc)
            self.set_status(500)
            self.write_json({"Error": "Internal Server Error"})
            return
        self.write_json(retired)


class GetWorkersHandler(Handler):
    def get(self) -> None:
        workers = self.http.scheduler.state.workers
        self.write_json(
            {
                "num_workers": len(workers),
                "workers": [{"name": ws.name, "address": ws.address} for ws in workers.values()],
            }
        )


class AdaptiveTargetHandler(Handler):
    def get(self) -> None:
        self.write_json({"workers": api.adaptive_target(self.http.scheduler)})


class CheckIdleHandler(Handler):
    def get(self) -> None:
        self.write_json({"idle_since": self.http.idle.check()})


class NoDashboard(Handler):
    """Dask without bokeh (``distributed.http.scheduler.missing_bokeh``) serves an install
    hint at ``/status``; dsched serves it only when that module is listed and the
    dashboard is off."""

    def get(self) -> None:
        self.write(
            "<p>The dsched dashboard is off (<code>--no-dashboard</code>).</p>"
            "<p>JSON and metrics: <a href='json/identity.json'>json/identity.json</a>, "
            "<a href='json/counts.json'>json/counts.json</a>, "
            "<a href='metrics'>metrics</a>, <a href='sitemap.json'>sitemap.json</a>.</p>"
        )


def _redirect(path: str) -> type[web.RequestHandler]:
    class Redirect(web.RequestHandler):
        def get(self) -> None:
            self.redirect(path)

    return Redirect


def _statics() -> list[Route]:
    from distributed.http.statics import routes

    return [(url, cls, dict(kwargs)) for url, cls, kwargs in routes]


HEALTH = "distributed.http.health"
MISSING_BOKEH = "distributed.http.scheduler.missing_bokeh"
DASHBOARD = "dsched.http.dashboard"


def _dashboard(http: HttpServer) -> list[Route]:
    if http.board is None:
        return [("/", _redirect("status"), {}), ("status", NoDashboard, {})]
    return [("/", _redirect("status"), {}), *dashboard.page_routes(http.board)]


# Module name -> its routes (some need the server: the dashboard's state).
MODULES: dict[str, Callable[[HttpServer], list[Route]]] = {
    "distributed.http.scheduler.prometheus": lambda http: [("/metrics", MetricsHandler, {})],
    "distributed.http.scheduler.json": lambda http: [
        ("json/counts.json", CountsJSON, {}),
        ("json/identity.json", IdentityJSON, {}),
    ],
    HEALTH: lambda http: [("/health", HealthHandler, {})],
    "distributed.http.scheduler.api": lambda http: [
        ("/api/v1", APIHandler, {}),
        ("/api/v1/retire_workers", RetireWorkersHandler, {}),
        ("/api/v1/get_workers", GetWorkersHandler, {}),
        ("/api/v1/adaptive_target", AdaptiveTargetHandler, {}),
        ("/api/v1/check_idle", CheckIdleHandler, {}),
    ],
    "distributed.http.scheduler.info": lambda http: [
        ("individual-plots.json", dashboard.IndividualPlotsHandler, {"dashboard": http.board})
    ],
    "distributed.http.statics": lambda http: _statics(),
    MISSING_BOKEH: _dashboard,
    DASHBOARD: _dashboard,
}


def handlers(http: HttpServer, modules: list[str], prefix: str) -> list[Route]:
    """Dask's ``get_handlers``: every route of every listed module, under ``prefix``."""
    prefix = "/" + (prefix or "").strip("/")
    if not prefix.endswith("/"):
        prefix += "/"
    if HEALTH not in modules:
        modules = [*modules, HEALTH]
    routes: list[Route] = []
    for name in dict.fromkeys(modules):
        make = MODULES.get(name)
        if make is None:
            logger.debug("HTTP route module %r is not served by dsched: skipped", name)
            continue
        for url, cls, kwargs in make(http):
            extra = {"http": http} if issubclass(cls, Handler) else {}
            routes.append((prefix + url.lstrip("/"), cls, {**kwargs, **extra}))
    return routes
