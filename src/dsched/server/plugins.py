"""Plugins: worker and nanny plugins (stored bytes, shipped and broadcast) and scheduler
plugins (Dask ``SchedulerPlugin`` objects run in the scheduler process).

Theory of operation
-------------------
*Worker and nanny plugins* are opaque pickled bytes, as in Dask (scheduler.py
``register_worker_plugin`` ... ``unregister_nanny_plugin``): ``Plugins`` stores them by
name, ships them to every worker that registers later (the ``register-worker`` reply's
``"worker-plugins"``) and every nanny (``register_nanny``'s ``"nanny-plugins"``), and
broadcasts ``plugin-add`` / ``plugin-remove`` (``plugin_add`` / ``plugin_remove`` with
``nanny=True`` for nannies) to those already there; the reply is ``{worker address:
reply}``. Registering an existing name with ``idempotent`` does nothing and replies
``{}``; unregistering an unknown name raises ValueError. A nanny plugin waits for nannies
in the middle of registering (as Dask's ``_starting_nannies_cond``), so none misses it.
Like Dask's (whose shuffle plugin registers it at start), the registry starts with
distributed's ``ShuffleWorkerPlugin`` under ``"shuffle"``: P2P tasks need it on every worker.

*Scheduler plugins* are user code and live here, in the shell, never in the pure core.
``register_scheduler_plugin`` unpickles the plugin, awaits its ``start(facade)`` (the
``SchedulerFacade`` of ``facade.py``) and adds it. Hooks reach plugins through
``PluginHooks``, an extension of the core that observes nothing until a plugin needs it:
every add or remove recomputes, per hook, the plugins whose class overrides it (compared
with ``SchedulerPlugin``'s method), and tells the core which state events and whether
transitions to fan out (``Core.set_observations``). A hook no plugin overrides costs
nothing; the state machine records transitions only while some plugin overrides
``transition``. ``log_event`` hooks are called by the pub/sub extension's listener.

Hooks get Dask's arguments. Transitions arrive once per flush round, in order, as
``transition(key, start, finish, stimulus_id=..., **kwargs)`` with Dask's state names
(dsched's ``ready`` reads ``queued``); ``erred`` carries ``exception``, ``traceback`` and
``exception_text``, ``memory`` carries ``nbytes`` and ``worker``. A hook that raises is
logged (``logger.info`` for transition and log_event, ``logger.exception`` for the rest,
as Dask) and never breaks the scheduler; an async ``add_worker`` / ``remove_worker`` is run
in the background. ``remove_client`` / ``remove_worker`` run once per departure (a client's
``close-client`` and then its stream ending both disconnect it; Dask ignores the second).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from distributed.protocol.pickle import dumps
from distributed.shuffle._worker_plugin import ShuffleWorkerPlugin

from dsched.ext.p2p import P2PShuffles
from dsched.ext.protocol import NO_EFFECTS, Effects, Extension, Transition
from dsched.ext.pubsub import PubSub
from dsched.server.facade import SchedulerFacade, dask_state, takes_comm
from dsched.server.ops import RpcOp, call
from dsched.state import events as ev
from dsched.state.edges import ERRED, FORGOTTEN, MEMORY
from dsched.state.records import Key

logger = logging.getLogger("dsched.scheduler")

# The hooks of SchedulerPlugin that the core's observations drive, and the event types.
EVENT_HOOKS: dict[type, str] = {
    ev.WorkerConnected: "add_worker",
    ev.WorkerDisconnected: "remove_worker",
    ev.ClientConnected: "add_client",
    ev.ClientDisconnected: "remove_client",
    ev.Restart: "restart",
    ev.GraphReceived: "update_graph",
}
# How many departed clients and workers PluginHooks remembers (to call remove_* once).
DEPARTED_REMEMBERED = 1000
HOOKS = (
    *EVENT_HOOKS.values(),
    "transition",
    "log_event",
    "valid_workers_downscaling",
    "before_close",
    "close",
)


def overrides(plugin: Any, hook: str) -> bool:
    """Whether ``plugin`` has its own ``hook`` (not SchedulerPlugin's no-op)."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    if hook in getattr(plugin, "__dict__", {}):
        return True
    own = getattr(type(plugin), hook, None)
    return own is not None and own is not getattr(SchedulerPlugin, hook, None)


class PluginHooks(Extension):
    """The core's side of scheduler plugins: fans observed events and transitions out to
    the plugins that override the matching hook (see the module docstring)."""

    name = "scheduler-plugins"

    def __init__(self, plugins: Plugins) -> None:
        self.plugins = plugins
        # Clients and workers whose remove hook ran, newest last (bounded): a client's
        # close-client message and then its stream ending both disconnect it, and Dask
        # calls remove_client once.
        self._departed: dict[tuple[str, str], None] = {}
        # The earlier parts of each client's big graph (``dsched.state.slicing``): Dask
        # calls update_graph once per graph, so the hook runs on the last part, with all.
        self._graph_parts: dict[str, list[ev.GraphReceived]] = {}

    def _first_departure(self, kind: str, name: str) -> bool:
        if (kind, name) in self._departed:
            return False
        self._departed[kind, name] = None
        if len(self._departed) > DEPARTED_REMEMBERED:
            del self._departed[next(iter(self._departed))]
        return True

    def on_event(self, event: ev.Event, now: float) -> Effects:
        hook = EVENT_HOOKS.get(type(event))
        if hook is None:
            return NO_EFFECTS
        if isinstance(event, ev.ClientConnected):
            self._departed.pop(("client", event.client), None)
        elif isinstance(event, ev.WorkerConnected):
            self._departed.pop(("worker", event.address), None)
        elif isinstance(event, ev.ClientDisconnected):
            self._graph_parts.pop(event.client, None)
            if not self._first_departure("client", event.client):
                return NO_EFFECTS
        elif isinstance(event, ev.Restart):
            self._graph_parts.clear()  # (a restart drops every graph in progress)
        elif isinstance(event, ev.GraphReceived):
            with_hook = self.plugins.with_hook(hook)
            if event.part == 0 or not with_hook:
                # (a first part, whole graphs too: an earlier graph's parts stopped coming)
                self._graph_parts.pop(event.client, None)
            if with_hook and (event.part or event.hold is not None):
                self._graph_parts.setdefault(event.client, []).append(event)
            if event.hold is not None:
                return NO_EFFECTS
        elif isinstance(event, ev.WorkerDisconnected) and not self._first_departure(
            "worker", event.address
        ):
            return NO_EFFECTS
        facade = self.plugins.facade
        kwargs: dict[str, Any]
        if isinstance(event, ev.WorkerConnected):
            kwargs = {"scheduler": facade, "worker": event.address}
        elif isinstance(event, ev.WorkerDisconnected):
            kwargs = {
                "scheduler": facade,
                "worker": event.address,
                "stimulus_id": event.stimulus_id or f"remove-worker-{now}",
            }
        elif isinstance(event, ev.ClientConnected | ev.ClientDisconnected):
            kwargs = {"scheduler": facade, "client": event.client}
        elif isinstance(event, ev.Restart):
            kwargs = {"scheduler": facade}
        else:
            assert isinstance(event, ev.GraphReceived)
            parts = self._graph_parts.pop(event.client, None) if event.part else None
            kwargs = self._update_graph_arguments(parts or [event], now)
        for plugin in self.plugins.with_hook(hook):
            try:
                if hook == "update_graph":  # the scheduler is positional, as Dask passes it
                    result = plugin.update_graph(facade, **kwargs)
                elif hook == "restart":
                    result = plugin.restart(facade)
                else:
                    result = getattr(plugin, hook)(**kwargs)
                if inspect.isawaitable(result):
                    self.plugins.spawn_hook(result)
            except Exception as exc:
                logger.exception(exc)
        return NO_EFFECTS

    def _update_graph_arguments(self, parts: list[ev.GraphReceived], now: float) -> dict[str, Any]:
        """Dask's arguments for a graph received whole or in ``parts``. Its ``tasks`` are
        the tasks Dask's ``_generate_taskstates`` touches: the graph's (culled) and the
        known tasks they depend on."""
        event = parts[-1]
        tasks = self.state.tasks
        annotations: dict[str, dict[Any, Any]] = {}
        keys: dict[Key, None] = {}
        for spec in (spec for part in parts for spec in part.tasks):
            keys[spec.key] = None
            for name, value in (spec.annotations or {}).items():
                annotations.setdefault(name, {})[spec.key] = value
        known = [
            dep
            for spec in (spec for part in parts for spec in part.tasks)
            for dep in spec.dependencies
            if dep not in keys
        ]
        keys.update(dict.fromkeys(known))
        return {
            "client": event.client,
            "keys": set(event.keys),
            "tasks": list(keys),
            "annotations": annotations,
            "priority": {k: tasks[k].priority for k in keys if k in tasks},
            "stimulus_id": event.stimulus_id or f"update-graph-{now}",
        }

    def on_transitions(self, transitions: Sequence[Transition], now: float) -> Effects:
        tasks = self.state.tasks
        forgotten = self.plugins.facade.tasks.forgotten
        with_hook = self.plugins.with_hook
        forgotten.update(key for key, _, finish, _ in transitions if finish == FORGOTTEN)
        try:
            for key, start, finish, stimulus_id in transitions:
                if start == finish:
                    continue  # a steal: Dask has no transition for it
                plugins = with_hook("transition")
                if not plugins:
                    break
                kwargs: dict[str, Any] = {}
                ts = tasks.get(key)
                if ts is not None:
                    if finish == ERRED:
                        kwargs = {
                            "exception": ts.exception,
                            "traceback": ts.traceback,
                            "exception_text": ts.exception_text,
                        }
                    elif finish == MEMORY:
                        holder = next(iter(ts.who_has), None)
                        kwargs = {
                            "nbytes": ts.nbytes,
                            "worker": None if holder is None else holder.address,
                        }
                dask_start, dask_finish = dask_state(start), dask_state(finish)
                for plugin in plugins:
                    try:
                        plugin.transition(
                            key, dask_start, dask_finish, stimulus_id=stimulus_id, **kwargs
                        )
                    except Exception:
                        logger.info("Plugin failed with exception", exc_info=True)
        finally:
            forgotten.clear()
        return NO_EFFECTS


class Plugins:
    """The op provider of plugin RPCs and the registry of every kind of plugin."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.reactor = scheduler.reactor
        self.core = scheduler.core
        # P2P shuffles and rechunks (dsched.ext.p2p) need the worker side on every worker.
        # (distributed's pickle module is not annotated: no-untyped-call.)
        shuffle = dumps(ShuffleWorkerPlugin())  # type: ignore[no-untyped-call]
        self.worker_plugins: dict[str, bytes] = {"shuffle": shuffle}
        self.nanny_plugins: dict[str, bytes] = {}
        self.scheduler_plugins: dict[str, Any] = {}
        self._by_hook: dict[str, list[Any]] = {}
        self._starting_nannies = 0
        self._nannies_started = asyncio.Condition()
        self._facade: SchedulerFacade | None = None
        self._closed = False
        self.hooks = PluginHooks(self)
        self.core.add_extension(self.hooks)
        pubsub = self.core.extensions.get("pubsub")
        self.pubsub = pubsub if isinstance(pubsub, PubSub) else None

    @property
    def facade(self) -> SchedulerFacade:
        if self._facade is None:
            self._facade = SchedulerFacade(self.scheduler, self)
        return self._facade

    def rpc_ops(self) -> dict[str, RpcOp]:
        return {
            "register_worker_plugin": call(self.register_worker_plugin),
            "unregister_worker_plugin": call(self.unregister_worker_plugin),
            "register_nanny_plugin": call(self.register_nanny_plugin),
            "unregister_nanny_plugin": call(self.unregister_nanny_plugin),
            "register_scheduler_plugin": call(self.register_scheduler_plugin),
            "unregister_scheduler_plugin": call(self.unregister_scheduler_plugin),
        }

    # ------------------------------------------------------------------ worker plugins
    async def register_worker_plugin(
        self, plugin: bytes, name: str, idempotent: bool = False, **_: Any
    ) -> dict[str, Any]:
        logger.info("Registering Worker plugin %s", name)
        if name in self.worker_plugins and idempotent:
            return {}
        self.worker_plugins[name] = plugin
        return await self._broadcast({"op": "plugin-add", "plugin": plugin, "name": name})

    async def unregister_worker_plugin(self, name: str, **_: Any) -> dict[str, Any]:
        if self.worker_plugins.pop(name, None) is None:
            raise ValueError(f"The worker plugin {name} does not exist")
        return await self._broadcast({"op": "plugin-remove", "name": name})

    async def register_nanny_plugin(
        self, plugin: bytes, name: str, idempotent: bool = False, **_: Any
    ) -> dict[str, Any]:
        logger.info("Registering Nanny plugin %s", name)
        if name in self.nanny_plugins and idempotent:
            return {}
        self.nanny_plugins[name] = plugin
        async with self._nannies_started:
            await self._nannies_started.wait_for(lambda: not self._starting_nannies)
            return await self._broadcast(
                {"op": "plugin_add", "plugin": plugin, "name": name}, nanny=True
            )

    async def unregister_nanny_plugin(self, name: str, **_: Any) -> dict[str, Any]:
        if self.nanny_plugins.pop(name, None) is None:
            raise ValueError(f"The nanny plugin {name} does not exist")
        return await self._broadcast({"op": "plugin_remove", "name": name}, nanny=True)

    async def _broadcast(self, msg: dict[str, Any], nanny: bool = False) -> dict[str, Any]:
        return await self.scheduler.data.broadcast(msg, nanny=nanny)  # type: ignore[no-any-return]

    @contextlib.asynccontextmanager
    async def nanny_starting(self) -> AsyncIterator[dict[str, bytes]]:
        """Around ``register_nanny``: yields the plugins to ship; nanny plugin broadcasts
        wait until the nanny's worker has registered (then it is a broadcast target)."""
        async with self._nannies_started:
            self._starting_nannies += 1
        try:
            yield self.nanny_plugins
        finally:
            async with self._nannies_started:
                self._starting_nannies -= 1
                self._nannies_started.notify_all()

    # ------------------------------------------------------------------ scheduler plugins
    async def register_scheduler_plugin(
        self, plugin: Any, name: str | None = None, idempotent: bool = False, **_: Any
    ) -> None:
        from distributed.diagnostics.plugin import SchedulerPlugin, _get_plugin_name
        from distributed.protocol.pickle import loads

        if not isinstance(plugin, SchedulerPlugin):
            plugin = loads(plugin)  # type: ignore[no-untyped-call]
            if not isinstance(plugin, SchedulerPlugin):
                raise TypeError(f"expected a SchedulerPlugin, got {type(plugin).__name__}")
        if name is None:
            name = _get_plugin_name(plugin)
        if name in self.scheduler_plugins and idempotent:
            return
        if hasattr(plugin, "start"):
            result = plugin.start(self.facade)  # type: ignore[arg-type]  # duck-typed
            if inspect.isawaitable(result):
                await result
        self.add_plugin(plugin, name=name, idempotent=idempotent)

    async def unregister_scheduler_plugin(self, name: str, **_: Any) -> None:
        self.remove_plugin(name)

    def add_plugin(self, plugin: Any, *, idempotent: bool = False, name: str | None = None) -> None:
        """``Scheduler.add_plugin``: replaces a plugin of the same name (with a warning)."""
        import warnings

        from distributed.diagnostics.plugin import _get_plugin_name

        if name is None:
            name = _get_plugin_name(plugin)
        if name in self.scheduler_plugins:
            if idempotent:
                return
            warnings.warn(
                f"Scheduler already contains a plugin with name {name}; overwriting.",
                category=UserWarning,
                stacklevel=2,
            )
        self.scheduler_plugins[name] = plugin
        self._subscribe()

    def remove_plugin(self, name: str | None = None) -> None:
        assert name is not None
        if self.scheduler_plugins.pop(name, None) is None:
            raise ValueError(f"Could not find plugin {name!r} among the current scheduler plugins")
        self._subscribe()

    def _subscribe(self) -> None:
        """Recompute who overrides what; observe only what some plugin needs."""
        by_hook: dict[str, list[Any]] = {}
        for plugin in self.scheduler_plugins.values():
            for hook in HOOKS:
                if overrides(plugin, hook):
                    by_hook.setdefault(hook, []).append(plugin)
        self._by_hook = by_hook
        observed = {t for t, hook in EVENT_HOOKS.items() if hook in by_hook}
        # A remove hook needs the connects too: a client reconnecting under its id (as a
        # Client does after losing its connection) may be removed again.
        if "remove_client" in by_hook:
            observed.add(ev.ClientConnected)
        if "remove_worker" in by_hook:
            observed.add(ev.WorkerConnected)
        self.core.set_observations(self.hooks, frozenset(observed), "transition" in by_hook)
        if self.pubsub is not None:
            listeners = [f for f in self.pubsub.listeners if f != self._on_log_event]
            if "log_event" in by_hook:
                listeners.append(self._on_log_event)
            self.pubsub.listeners = listeners

    def with_hook(self, hook: str) -> list[Any]:
        return self._by_hook.get(hook, [])

    def spawn_hook(self, awaitable: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await awaitable
            except Exception as exc:
                logger.exception(exc, exc_info=exc)

        self.reactor.spawn(run())

    # ------------------------------------------------------------------ hooks called here
    def _on_log_event(self, topic: str, msg: Any) -> None:
        for plugin in self.with_hook("log_event"):
            try:
                plugin.log_event(topic, msg)
            except Exception:
                logger.info("Plugin failed with exception", exc_info=True)

    def valid_workers_downscaling(self, workers: list[Any]) -> list[Any]:
        """Filter retirement candidates (views of workers) through every plugin, as
        ``Scheduler.workers_to_close`` does; the first is P2P's (participants of a running
        shuffle stay), as Dask's shuffle plugin is."""
        p2p = self.core.extensions.get("p2p")
        if isinstance(p2p, P2PShuffles) and p2p.active:
            busy = p2p.participating_workers()
            workers = [view for view in workers if view.address not in busy]
        for plugin in self.with_hook("valid_workers_downscaling"):
            workers = plugin.valid_workers_downscaling(self.facade, workers)
        return workers

    async def close(self) -> None:
        """``before_close`` then ``close`` of every plugin (errors logged), once."""
        if self._closed:
            return
        self._closed = True
        for hook in ("before_close", "close"):
            for plugin in list(self.with_hook(hook)):
                try:
                    result = getattr(plugin, hook)()
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    logger.exception("scheduler plugin %s failed", hook)

    # ------------------------------------------------------------------ facade services
    def log_event(self, topic: str | list[str], msg: Any) -> None:
        """Publish an event from scheduler-side code through the pub/sub extension."""
        self.reactor.spawn(
            self.reactor.request("log_event", "scheduler", {"topic": topic, "msg": msg})
        )

    def handler_op(self, handler: Callable[..., Any]) -> RpcOp:
        """An RPC op for ``scheduler.handlers[op] = handler`` (Dask's calling convention)."""
        if not takes_comm(handler):
            return call(handler)

        async def op(comm: Any, args: dict[str, Any]) -> Any:
            result = handler(comm, **args)
            if inspect.isawaitable(result):
                result = await result
            return result

        return op
