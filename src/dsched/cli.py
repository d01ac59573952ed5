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
from typing import TYPE_CHECKING, Any

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

    sched = commands.add_parser(
        "scheduler",
        help="run a Dask-compatible scheduler",
        usage="%(prog)s [options] [PRELOAD_ARGV ...]",
        epilog="Arguments it does not know are the preloads' argv (PRELOAD_ARGV), as with "
        "`dask scheduler`; put them after `--` when they look like its own flags.",
    )
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
    # Deprecated in dask scheduler and without effect there: accepted and ignored.
    sched.add_argument("--show", dest="show", action="store_true", help=argparse.SUPPRESS)
    sched.add_argument("--no-show", dest="show", action="store_false", help=argparse.SUPPRESS)
    sched.add_argument("--use-xheaders", help=argparse.SUPPRESS)
    sched.add_argument("--jupyter", action="store_true", help="not supported (refused)")
    sched.add_argument("--no-jupyter", dest="jupyter", action="store_false", help=argparse.SUPPRESS)
    sched.add_argument("--idle-timeout", help="shut down after this long without clients/work")
    sched.add_argument("--pid-file", help="write the process id to this file")
    sched.add_argument(
        "--preload",
        action="append",
        default=[],
        help="module, /path/to/file.py or code to run in the scheduler (its dask_setup and "
        "dask_teardown get the scheduler); repeatable (config: distributed.scheduler.preload)",
    )
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

    if "," in interface:
        raise SystemExit(
            f"dsched: --interface {interface!r}: one interface only (dsched listens once)"
        )

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


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse; what ``dsched scheduler`` does not know is its preloads' argv, as click's
    ``ignore_unknown_options`` makes it for ``dask scheduler``."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if "--" in extra:
        extra.remove("--")  # the first one only separates; later ones belong to the argv
    if extra and args.command != "scheduler":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.preload_argv = extra
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    logging.basicConfig(
        level=os.environ.get("DSCHED_LOG_LEVEL", "INFO"),
        format="%(asctime)s - %(name)s - %(levelname)s - %(message)s",
    )
    if args.command == "scheduler":
        run_scheduler(args)
    else:
        args.func(args)


# distributed.scheduler.* keys dsched does not implement, whose silent neglect would change
# what the user asked for: a value other than Dask's default stops the scheduler.
UNSUPPORTED_CONFIG: dict[str, str] = {
    "distributed.scheduler.blocked-handlers": "dsched cannot block handlers",
    "distributed.scheduler.contact-address": "dsched advertises the address it listens on",
    "distributed.scheduler.no-workers-timeout": "dsched keeps tasks without workers waiting",
}


def refuse_unsupported_config() -> None:
    import dask

    for key, why in UNSUPPORTED_CONFIG.items():
        value = dask.config.get(key, None)
        if value:
            raise SystemExit(f"dsched: {key} = {value!r} is not supported: {why} (unset it)")


def run_scheduler(args: argparse.Namespace) -> None:
    import dask
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
    if args.jupyter:
        raise SystemExit("dsched: --jupyter is not supported (dsched starts no Jupyter server)")
    check_preload_argv(args.preload, args.preload_argv)
    policy_name = args.policy or os.environ.get("DSCHED_POLICY", DEFAULT_POLICY)
    policy_process = None
    if args.policy_process:
        policy = policy_process = PolicyProcess(policy_name, dask_policy_config())
    else:
        policy = make_policy(policy_name, dask_policy_config())
    # As distributed.Scheduler: the flag, else the configuration.
    idle = args.idle_timeout or dask.config.get("distributed.scheduler.idle-timeout", None)
    idle_timeout = parse_timedelta(idle) if idle else None
    args.validate = args.validate or bool(dask.config.get("distributed.scheduler.validate", False))
    refuse_unsupported_config()
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


def check_preload_argv(preload: list[str], argv: list[str]) -> None:
    """Dask's check of ``--preload`` and PRELOAD_ARGV at parse time
    (``distributed.preloading.validate_preload_argv``): it imports the preloads, so a
    missing or broken module stops the scheduler before it starts; argv without a preload,
    or for a preload whose ``dask_setup`` takes no options, is a usage error (status 2)."""
    if not preload and not argv:
        return
    from types import SimpleNamespace

    import click
    from distributed.preloading import validate_preload_argv

    from dsched.server.preload import preload_named

    try:
        context = SimpleNamespace(params={"preload": preload})
        validate_preload_argv(context, None, tuple(argv))  # type: ignore[no-untyped-call]
    except click.ClickException as error:
        print(f"dsched scheduler: error: {error.format_message()}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as error:
        logger.debug("loading the preloads failed", exc_info=True)
        raise SystemExit(
            f"dsched: cannot load preload {preload_named(error, preload)}: "
            f"{type(error).__name__}: {error}"
        ) from None


def _load_preloads(scheduler: Any, args: argparse.Namespace) -> Any:
    """The scheduler's preloads (the command line's, else the Dask configuration's),
    imported before it listens, as Dask's Scheduler does; None without any."""
    from dsched.server.preload import PreloadError, configured_preloads, load_preloads

    names, argv = configured_preloads(args.preload, args.preload_argv)
    if not names:
        return None
    try:
        return load_preloads(scheduler.plugins.facade, names, argv)
    except PreloadError as error:
        raise SystemExit(f"dsched: {error}") from None


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
    preloads = _load_preloads(scheduler, args)
    await scheduler.start()
    logger.info("  Scheduler at:   %s", scheduler.address)
    if args.scheduler_file:
        scheduler.write_scheduler_file(args.scheduler_file)
    if preloads is not None:
        scheduler.close_hooks.append(preloads.teardown)
        try:
            await preloads.start()
        except SystemExit as exit_request:
            # A dask_setup that calls sys.exit ends the scheduler with that status, as in
            # Dask (SystemExit is not an Exception: PreloadManager lets it through).
            logger.error("a preload's dask_setup exited (status %s)", exit_request.code)
            await scheduler.close(reason="preload-exit")
            raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(
            sig, lambda s=sig: asyncio.ensure_future(scheduler.close(f"signal {s.name}"))
        )
    await scheduler.finished()
    logger.info("End scheduler")


if __name__ == "__main__":
    main(sys.argv[1:])
