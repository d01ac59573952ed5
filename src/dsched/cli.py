"""``dsched`` command line: ``dsched scheduler`` takes the flags of ``dask scheduler``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

import dsched

if TYPE_CHECKING:
    from dsched.comm import TLSSettings

logger = logging.getLogger("dsched.cli")

# Further subcommands: name -> module with ``add_parser(subparsers, name)``, which registers
# the subcommand and sets ``func`` (called with the parsed arguments) as its default.
# Allocations between young-generation collections (Python's default is 700).
GC_YOUNG_THRESHOLD = 50_000

SUBCOMMANDS: dict[str, str] = {
    "zero-worker": "dsched.tools.zero_worker",
    "bench": "dsched.bench.cli",
    "trace": "dsched.tools.trace.report",
    "simulate": "dsched.sim.cli",
    "soak": "dsched.tools.soak",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsched", description=dsched.__doc__)
    parser.add_argument("--version", action="version", version=f"dsched {dsched.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    sched = commands.add_parser("scheduler", help="run a Dask-compatible scheduler")
    sched.add_argument("--version", action="version", version=f"dsched {dsched.__version__}")
    sched.add_argument(
        "--host", default="", help="address to listen on: 127.0.0.1, tls://10.0.0.1 (default: all)"
    )
    sched.add_argument("--port", type=int, default=None, help="port (0 picks a free one; 8786)")
    sched.add_argument("--interface", help="network interface to listen on, e.g. 'eth0'")
    sched.add_argument(
        "--protocol",
        default=None,
        help="tcp or tls (default: tls if TLS files are given or encryption is required)",
    )
    sched.add_argument("--tls-ca-file", help="CA certificate(s) for TLS, PEM")
    sched.add_argument("--tls-cert", help="the scheduler's TLS certificate, PEM")
    sched.add_argument("--tls-key", help="the scheduler's TLS private key, PEM")
    sched.add_argument("--scheduler-file", help="write the address here as dask does (JSON)")
    sched.add_argument(
        "--dashboard-address",
        default=":8787",
        help="address of the HTTP server (health, metrics, JSON; default :8787)",
    )
    sched.add_argument("--dashboard", dest="dashboard", action="store_true", default=True)
    sched.add_argument("--no-dashboard", dest="dashboard", action="store_false")
    sched.add_argument("--dashboard-prefix", default="", help="prefix of every HTTP route")
    sched.add_argument("--show", action="store_true", help=argparse.SUPPRESS)
    sched.add_argument("--jupyter", action="store_true", help=argparse.SUPPRESS)
    sched.add_argument("--idle-timeout", help="shut down after this long without clients/work")
    sched.add_argument("--pid-file", help="write the process id to this file")
    sched.add_argument("--preload", action="append", default=[], help="not supported")
    sched.add_argument(
        "--policy", default=None, help="scheduling policy: a name or 'package.module:Class'"
    )
    sched.add_argument(
        "--policy-process",
        action="store_true",
        help="run the policy in a separate process (same messages, pickled)",
    )
    sched.add_argument(
        "--validate", action="store_true", help="check every state invariant after each step"
    )
    sched.add_argument(
        "--max-message-size",
        help="cut off peers sending a larger message, e.g. 64MiB (config: dsched.max-message-size)",
    )
    sched.add_argument(
        "--trace", metavar="FILE", help="record per-task timings here (see `dsched trace report`)"
    )
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_parser(commands, name)
    return parser


def _interface_address(interface: str) -> str:
    import psutil

    for addr in psutil.net_if_addrs().get(interface, ()):
        if addr.family == socket.AF_INET:
            return str(addr.address)
    raise SystemExit(f"dsched: interface {interface!r} has no IPv4 address")


def _listen_address(args: argparse.Namespace) -> tuple[str | None, str, int]:
    """(protocol or None, host, port) from --host, --port, --protocol and --interface, as
    dask accepts them: --host may carry a scheme and a port (tls://10.0.0.1:8786)."""
    from dsched.comm import split_address

    protocol, host, port = args.protocol, args.host, args.port
    if "://" in host:
        scheme, _, location = host.partition("://")
        if protocol is not None and protocol.removesuffix("://") != scheme:
            raise SystemExit(f"dsched: --host {host!r} contradicts --protocol {protocol!r}")
        protocol, host = scheme, location
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [::1] without a port
    elif host.startswith("[") or host.count(":") == 1:
        try:
            _, host, host_port = split_address(host)
        except ValueError as error:
            raise SystemExit(f"dsched: --host: {error}") from None
        if port is not None and port != host_port:
            raise SystemExit(f"dsched: port given twice: --host {args.host} and --port {port}")
        port = host_port
    if args.interface:
        host = _interface_address(args.interface)
    return protocol, host, 8786 if port is None else port


def _max_message_bytes(args: argparse.Namespace) -> int | None:
    if not getattr(args, "max_message_size", None):
        return None  # the scheduler reads dsched.max-message-size from the Dask config
    from dask.utils import parse_bytes

    return int(parse_bytes(args.max_message_size))


def tune_garbage_collector() -> None:
    """The scheduler keeps many small long-lived records (tasks, sets of tasks), and imports
    dask, distributed and pandas: with the default thresholds the cyclic collector re-walks
    all of that every few hundred allocations, about 30% of the state machine's CPU at 100k
    tasks. Freeze what exists at start-up (modules never die) and collect the young
    generation less often; records the state machine forgets are freed by reference
    counting, it breaks their cycles itself."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("DSCHED_LOG_LEVEL", "INFO"),
        format="%(asctime)s - %(name)s - %(levelname)s - %(message)s",
    )
    if args.command == "scheduler":
        run_scheduler(args)
    else:
        args.func(args)


def run_scheduler(args: argparse.Namespace) -> None:
    from dask.utils import parse_timedelta

    from dsched.comm import TLSSettings
    from dsched.policy import DEFAULT_POLICY, make_policy
    from dsched.server.policy_process import PolicyProcess, dask_policy_config
    from dsched.server.scheduler import Scheduler

    protocol, host, port = _listen_address(args)
    try:
        tls = TLSSettings.from_options(args.tls_ca_file, args.tls_cert, args.tls_key)
        protocol = tls.listen_protocol(protocol)
    except ValueError as error:
        raise SystemExit(f"dsched: {error}") from None
    args.protocol, args.port = protocol, port
    if args.preload:
        raise SystemExit("dsched: --preload is not supported (dsched has no Scheduler plugins)")
    policy_name = args.policy or os.environ.get("DSCHED_POLICY", DEFAULT_POLICY)
    policy_process = None
    if args.policy_process:
        policy = policy_process = PolicyProcess(policy_name, dask_policy_config())
    else:
        policy = make_policy(policy_name, dask_policy_config())
    idle_timeout = parse_timedelta(args.idle_timeout) if args.idle_timeout else None
    if args.pid_file:
        with open(args.pid_file, "w") as f:
            f.write(str(os.getpid()))
    try:
        tune_garbage_collector()
        asyncio.run(_serve(Scheduler, policy, host, args, idle_timeout, tls=tls))
    finally:
        if policy_process is not None:
            policy_process.close()
        if args.pid_file:
            with contextlib.suppress(FileNotFoundError):
                os.remove(args.pid_file)


async def _serve(
    scheduler_class: type,
    policy: object,
    host: str,
    args: argparse.Namespace,
    idle: float | None,
    *,
    tls: TLSSettings | None = None,
) -> None:
    from dsched.http import HttpServer

    http = HttpServer(
        args.dashboard_address, prefix=args.dashboard_prefix or "", dashboard=args.dashboard
    )
    scheduler = scheduler_class(
        policy,
        host=host,
        port=args.port,
        idle_timeout=idle,
        validate=args.validate,
        max_message_bytes=_max_message_bytes(args),
        protocol=args.protocol,
        tls=tls,
        http=http,
    )
    if getattr(args, "trace", None):
        from dsched.tools.trace.record import TraceRecorder

        scheduler.trace = TraceRecorder(args.trace, scheduler.state)
    await scheduler.start()
    logger.info("  Scheduler at:   %s", scheduler.address)
    if args.scheduler_file:
        scheduler.write_scheduler_file(args.scheduler_file)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(
            sig, lambda s=sig: asyncio.ensure_future(scheduler.close(f"signal {s.name}"))
        )
    await scheduler.finished()
    logger.info("End scheduler")


if __name__ == "__main__":
    main(sys.argv[1:])
