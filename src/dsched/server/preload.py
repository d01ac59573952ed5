"""Scheduler preloads: ``--preload`` modules run in the scheduler process, as Dask runs them.

Theory of operation
-------------------
A preload is a module name, a ``.py`` file or the text of a script (anything with a space),
or an ``http(s)://`` address to download it from, with optional ``dask_setup(scheduler)``
and ``dask_teardown(scheduler)`` functions; a ``dask_setup`` that is a ``click.Command``
parses the preload's argv (``dask scheduler --preload mod --mod-flag 1``). Loading,
argument parsing and calling are ``distributed.preloading``'s own code, so the rules are
Dask's; what it gets as "the scheduler" is the ``SchedulerFacade`` (``facade.py``):
``add_plugin``, ``handlers``, ``address``, ``loop``, ``workers``, ``services``, the
adaptive queries and ``retire_workers``, ...

The timeline follows ``distributed.Scheduler`` (scheduler.py ``__init__``, ``start_unsafe``
and ``close``):

* ``load_preloads`` imports every module when the scheduler is built, before it listens:
  a missing module or one that raises on import stops the scheduler from starting
  (``PreloadError``; the command line exits non-zero with its message);
* ``Preloads.start`` runs each ``dask_setup`` once the scheduler listens and its scheduler
  file is written. A ``dask_setup`` that raises is logged ("Failed to start preload") and
  the scheduler goes on, exactly as Dask's ``PreloadManager`` does; one that calls
  ``sys.exit`` ends the scheduler with that status (``SystemExit`` is not an
  ``Exception``), as dask-gateway's preload does when its environment is missing;
* ``Preloads.teardown`` runs each ``dask_teardown``, last first, when the scheduler
  closes (before the scheduler plugins' ``before_close``; Dask runs it between their
  ``before_close`` and ``close``).

The preloads named on the command line win; without any, ``distributed.scheduler.preload``
and ``distributed.scheduler.preload-argv`` from the Dask configuration are used, as Dask's
``Scheduler`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import dask
from distributed import preloading

logger = logging.getLogger("dsched.scheduler")

PreloadArgv = str | Sequence[str] | Sequence[Sequence[str]]


class PreloadError(Exception):
    """A preload could not be loaded: the scheduler does not start."""


def configured_preloads(names: Sequence[str], argv: PreloadArgv) -> tuple[list[str], PreloadArgv]:
    """The preloads to run: those given, else ``distributed.scheduler.preload`` (and its
    ``preload-argv``) from the Dask configuration."""
    if not names:
        configured = dask.config.get("distributed.scheduler.preload", default=[]) or []
        names = [configured] if isinstance(configured, str) else list(configured)
    if not argv:
        argv = dask.config.get("distributed.scheduler.preload-argv", default=[]) or []
    if isinstance(argv, str):
        argv = [argv]
    return list(names), argv


class Preloads:
    """The loaded preloads of one scheduler (``distributed.preloading.PreloadManager``)."""

    def __init__(self, manager: preloading.PreloadManager) -> None:
        self.manager = manager

    def __len__(self) -> int:
        return len(self.manager)

    async def start(self) -> None:
        await self.manager.start()

    async def teardown(self) -> None:
        await self.manager.teardown()


def load_preloads(facade: Any, names: Sequence[str], argv: PreloadArgv) -> Preloads:
    """Import every preload for ``facade`` (the scheduler they will see)."""
    try:
        manager = preloading.process_preloads(facade, list(names), argv)
    except Exception as exc:
        raise PreloadError(
            f"cannot load preload {preload_named(exc, names)}: {type(exc).__name__}: {exc}"
        ) from exc
    return Preloads(manager)


def preload_named(exc: BaseException, names: Sequence[str]) -> str:
    """The preload the error is about, when it says so (a missing module's name)."""
    missing = getattr(exc, "name", None)
    for name in names:
        if missing and (name == missing or name.startswith(f"{missing}.")):
            return repr(name)
    return ", ".join(repr(name) if " " not in name else "(code)" for name in names)
