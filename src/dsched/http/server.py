"""``HttpServer``: a tornado HTTP server on the scheduler's event loop, as Dask's
``ServerNode.start_http_server`` (distributed/node.py) starts one.

It always starts, with or without a dashboard (``--no-dashboard`` drops only the
dashboard's pages and their data routes, ``dashboard.py``, as Dask drops its Bokeh apps).
``dashboard_address`` is Dask's: a port, ``:port``, ``host:port`` or a comma-separated
list; an empty host with an address given means all interfaces, no address at all the
scheduler's host; a taken port falls back to a free one with a warning. Routes come from
``distributed.scheduler.http.routes`` (``routes.py``), under ``prefix``
(``--dashboard-prefix``).
"""

from __future__ import annotations

import logging
import socket
import ssl
import warnings
from typing import TYPE_CHECKING, Any

import dask
from distributed.http.routing import RoutingApplication
from distributed.utils import clean_dashboard_address
from tornado.httpserver import HTTPServer

from dsched.http import routes
from dsched.http.api import IdleTracker
from dsched.http.dashboard import Dashboard
from dsched.http.metrics import ConnectionCounts, make_registry

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from dsched.server.scheduler import Scheduler

logger = logging.getLogger("dsched.http")

DEFAULT_PORT = 8787
_RETRIES = 3


def _bound_addresses(server: HTTPServer) -> list[tuple[str, int]]:
    """Where ``server`` listens, IPv4 first (distributed.comm.utils.get_tcp_server_addresses)."""
    sockets: list[socket.socket] = list(server._sockets.values())
    sockets.sort(key=lambda sock: sock.family != socket.AF_INET)
    return [(str(sock.getsockname()[0]), int(sock.getsockname()[1])) for sock in sockets]


class HttpServer:
    def __init__(
        self,
        dashboard_address: str | int | None = None,
        *,
        prefix: str = "",
        dashboard: bool = True,
    ) -> None:
        self.dashboard_address = dashboard_address
        self.prefix = prefix or ""
        self.dashboard = dashboard
        self.port: int | None = None
        self.host: str | None = None
        self._server: HTTPServer | None = None
        # The dashboard's shared state, made on start unless ``dashboard`` is false.
        self.board: Dashboard | None = None

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    async def start(self, scheduler: Scheduler) -> int:
        """Listen; the port bound (the first one if several addresses are given)."""
        self._scheduler = scheduler
        self.counts = ConnectionCounts()
        scheduler.core.add_extension(self.counts)
        self.registry: CollectorRegistry = make_registry(scheduler, self.counts)
        self.idle = IdleTracker(scheduler)
        modules = list(dask.config.get("distributed.scheduler.http.routes"))
        if self.dashboard:
            self.board = Dashboard(scheduler)
            modules.append(routes.DASHBOARD)
        application = RoutingApplication(  # type: ignore[no-untyped-call]
            routes.handlers(self, modules, self.prefix)
        )
        self._server = server = HTTPServer(application, ssl_options=self._ssl_context())
        addresses = clean_dashboard_address(self.dashboard_address or DEFAULT_PORT)
        for address in addresses:
            if self.dashboard_address is not None and address["address"] == "":
                address["address"] = "0.0.0.0"
            if not address["address"]:
                address["address"] = scheduler.host or None
            self._listen(server, address)
        bound = _bound_addresses(server)
        self.host, self.port = bound[0][0], int(bound[0][1])
        for expected, actual in zip(
            (a["port"] for a in addresses), (b[1] for b in bound), strict=False
        ):
            if expected and expected != actual:
                warnings.warn(
                    f"Port {expected} is already in use.\n"
                    "Perhaps you already have a cluster running?\n"
                    f"Hosting the HTTP server on port {actual} instead",
                    stacklevel=1,
                )
                logger.warning(
                    "HTTP port %s is already in use: serving on port %s instead", expected, actual
                )
        logger.info("  HTTP server at:  %s:%s%s", self.host, self.port, self.prefix or "")
        return self.port

    @staticmethod
    def _listen(server: HTTPServer, address: dict[str, Any]) -> None:
        retries = _RETRIES
        port = address["port"]
        while True:
            try:
                server.listen(port, address["address"] or "")
                return
            except OSError:
                port = 0  # taken: a free one
                retries -= 1
                if retries < 1:
                    raise

    @staticmethod
    def _ssl_context() -> ssl.SSLContext | None:
        cert = dask.config.get("distributed.scheduler.dashboard.tls.cert")
        if not cert:
            return None
        context = ssl.create_default_context(
            cafile=dask.config.get("distributed.scheduler.dashboard.tls.ca-file"),
            purpose=ssl.Purpose.CLIENT_AUTH,
        )
        key = dask.config.get("distributed.scheduler.dashboard.tls.key")
        context.load_cert_chain(cert, keyfile=key)
        return context

    async def stop(self) -> None:
        if self.board is not None:
            self.board.stop()
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
