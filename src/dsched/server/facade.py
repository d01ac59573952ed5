"""The scheduler compatibility facade: what scheduler plugins, ``run_on_scheduler``
functions, ``feed`` closures and preload-style code see as "the scheduler".

Theory of operation
-------------------
Third-party code written against ``distributed.Scheduler`` reads a handful of its
attributes (``tasks``, ``workers``, ``clients``, ``address``, ``plugins``, ...). dsched's
state lives in the pure core's records (``dsched.state.records``), so ``SchedulerFacade``
exposes them through thin *views*: a ``TaskView`` / ``WorkerView`` holds one record and
reads every attribute through it on access, so nothing is copied and a view is never
stale. Views compare and hash by the record they wrap, so ``ts.who_has`` (a set of
worker views) and ``ts.dependencies`` behave like Dask's sets of states. The mappings
(``facade.tasks``, ``facade.workers``, ``facade.clients``) are read-only ``Mapping``
views over the state's dicts.

Supported (read-only unless said otherwise):

* ``tasks[key]``: ``key``, ``state`` (dsched's ``ready``, a task offered to the policy and
  not yet placed, reads as Dask's ``queued``), ``who_has`` (set of worker views),
  ``processing_on``, ``dependencies``, ``dependents``, ``waiters``, ``waiting_on``,
  ``who_wants`` (set of client views), ``nbytes``, ``priority``, ``type``, ``exception``,
  ``traceback``, ``exception_text``, ``exception_blame``, ``retries``, ``annotations``,
  ``prefix`` (the key's name, a string), ``worker_restrictions``, ``resource_restrictions``,
  ``loose_restrictions``. While transition hooks run, a key forgotten in that batch still
  resolves (state ``forgotten``, no relations), as Dask puts it back for its plugins.
* ``workers[address]``: ``address``, ``name``, ``nthreads``, ``memory_limit``, ``status``
  (a string), ``host``, ``resources``, ``processing`` and ``has_what`` (sets of task
  views), ``nanny``, ``local_directory``, ``nbytes``.
* ``clients[id]``: ``client_key``, ``wants_what`` (set of task views).
* ``address``, ``id``, ``loop`` (tornado's ``IOLoop.current()``), ``local_directory``,
  ``identity()``, ``log_event(topic, msg)``, ``plugins`` with ``add_plugin`` /
  ``remove_plugin``, ``worker_plugins`` / ``nanny_plugins`` (name -> pickled bytes),
  ``handlers`` (setting ``handlers["op"] = f`` serves RPC ``op`` with ``f(**fields)``,
  sync or async; dsched's comm is passed first when ``f``'s first parameter is ``comm``,
  as Dask does; its ``write`` is not awaitable),
  ``upload_file``, ``register_worker_plugin`` / ``register_nanny_plugin`` / their
  ``unregister_`` twins, ``broadcast(msg=..., workers=..., nanny=..., on_error=...)``,
  ``valid_workers_downscaling(workers)``.
* What preloads (dask-gateway's, ``server/preload.py``) and adaptive code use:
  ``services`` (``services["dashboard"].port``; a preload may add its own service object,
  whose ``port`` ``identity()`` then reports), ``time_started``, ``unrunnable`` (the tasks
  waiting for a worker, as task views; dsched keeps no "since" time, so the values are
  the scheduler's start time), ``transition_log`` (the bounded log of
  ``(key, start, finish, stimulus_id, time)``: ``transition_log[-1][-1]`` is the time of
  the last transition, as in Dask), ``adaptive_target(target_duration=None)``,
  ``workers_to_close(...)`` (Dask's keywords), ``check_idle()`` and
  ``await retire_workers(workers=..., names=..., remove=..., close_workers=..., n=...)``.

Not supported: anything that writes the task state (``transitions``, ``set_restrictions``,
``stimulus_*``, ``send_all``, ``run_spec`` objects: dsched keeps only the pickled run_spec,
exposed as ``run_spec`` as it is stored), ``task_groups`` / ``task_prefixes``, ``extensions``,
the dashboard and every other attribute; reading one raises AttributeError. ``monitor``
has only ``count``, always 0: dsched keeps no system monitor samples (``performance_report``
reads it).
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from dsched.state.edges import FORGOTTEN, READY
from dsched.state.records import ClientState, TaskState, WorkerState

if TYPE_CHECKING:
    from dsched.server.plugins import Plugins

# dsched's state name -> Dask's, where they differ.
DASK_STATE = {READY: "queued"}


def dask_state(state: str) -> str:
    return DASK_STATE.get(state, state)


class _View:
    """A read-through view of one record; equal to another view of the same record."""

    __slots__ = ("_record",)

    def __init__(self, record: Any) -> None:
        self._record = record

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _View) and other._record is self._record

    def __hash__(self) -> int:
        return id(self._record)


class TaskView(_View):
    __slots__ = ()
    _record: TaskState

    def __repr__(self) -> str:
        return f"<TaskState {self._record.key!r} {self.state}>"

    key = property(lambda self: self._record.key)
    state = property(lambda self: dask_state(self._record.state))
    nbytes = property(lambda self: self._record.nbytes)
    priority = property(lambda self: self._record.priority)
    type = property(lambda self: self._record.type)
    exception = property(lambda self: self._record.exception)
    traceback = property(lambda self: self._record.traceback)
    exception_text = property(lambda self: self._record.exception_text)
    retries = property(lambda self: self._record.retries)
    annotations = property(lambda self: self._record.annotations or {})
    prefix = property(lambda self: self._record.prefix)
    run_spec = property(lambda self: self._record.run_spec)
    worker_restrictions = property(lambda self: self._record.worker_restrictions)
    resource_restrictions = property(lambda self: self._record.resource_restrictions)
    loose_restrictions = property(lambda self: self._record.loose_restrictions)

    @property
    def who_has(self) -> set[WorkerView]:
        return {WorkerView(ws) for ws in self._record.who_has}

    @property
    def processing_on(self) -> WorkerView | None:
        ws = self._record.processing_on
        return None if ws is None else WorkerView(ws)

    @property
    def dependencies(self) -> set[TaskView]:
        return {TaskView(ts) for ts in self._record.dependencies}

    @property
    def dependents(self) -> set[TaskView]:
        return {TaskView(ts) for ts in self._record.dependents}

    @property
    def waiters(self) -> set[TaskView]:
        return {TaskView(ts) for ts in self._record.waiters}

    @property
    def waiting_on(self) -> set[TaskView]:
        return {TaskView(ts) for ts in self._record.waiting_on}

    @property
    def who_wants(self) -> set[ClientView]:
        return {ClientView(cs) for cs in self._record.who_wants}

    @property
    def exception_blame(self) -> TaskView | None:
        blame = self._record.exception_blame
        return None if blame is None else TaskView(blame)


class ForgottenTask:
    """A key forgotten in the transition batch being dispatched to plugins (Dask puts a
    forgotten task back into ``tasks`` while its plugins see the transition): state
    ``forgotten``, no relations, no exception."""

    __slots__ = ("key",)
    state = FORGOTTEN
    who_has: frozenset[Any] = frozenset()
    dependencies: frozenset[Any] = frozenset()
    dependents: frozenset[Any] = frozenset()
    exception = None
    traceback = None
    exception_text = ""
    exception_blame = None
    nbytes = 0

    def __init__(self, key: Any) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"<TaskState {self.key!r} forgotten>"


class WorkerView(_View):
    __slots__ = ()
    _record: WorkerState

    def __repr__(self) -> str:
        return f"<WorkerState {self._record.address!r} status: {self._record.status}>"

    address = property(lambda self: self._record.address)
    name = property(lambda self: self._record.name)
    nthreads = property(lambda self: self._record.nthreads)
    memory_limit = property(lambda self: self._record.memory_limit or 0)
    status = property(lambda self: self._record.status)
    host = property(lambda self: self._record.host)
    resources = property(lambda self: self._record.resources)
    nanny = property(lambda self: self._record.info.get("nanny"))
    local_directory = property(lambda self: self._record.info.get("local_directory", ""))

    @property
    def processing(self) -> set[TaskView]:
        return {TaskView(ts) for ts in self._record.processing}

    @property
    def has_what(self) -> set[TaskView]:
        return {TaskView(ts) for ts in self._record.has_what}

    @property
    def nbytes(self) -> int:
        return sum(ts.nbytes for ts in self._record.has_what)

    def clean(self) -> WorkerView:
        return self


class ClientView(_View):
    __slots__ = ()
    _record: ClientState

    def __repr__(self) -> str:
        return f"<Client {self._record.id!r}>"

    client_key = property(lambda self: self._record.id)

    @property
    def wants_what(self) -> set[TaskView]:
        return {TaskView(ts) for ts in self._record.wants}


class _RecordsView(Mapping[Any, Any]):
    """A read-only mapping over one of the state's dicts, wrapping values in views."""

    def __init__(self, records: Mapping[Any, Any], view: Callable[[Any], Any]) -> None:
        self._records = records
        self._view = view

    def __getitem__(self, key: Any) -> Any:
        return self._view(self._records[key])

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def __iter__(self) -> Iterator[Any]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


class _TasksView(_RecordsView):
    """``facade.tasks``, which also resolves the keys forgotten in the transition batch
    being dispatched to plugins."""

    def __init__(self, records: Mapping[Any, TaskState]) -> None:
        super().__init__(records, TaskView)
        self.forgotten: set[Any] = set()

    def __getitem__(self, key: Any) -> Any:
        ts = self._records.get(key)
        if ts is not None:
            return TaskView(ts)
        if key in self.forgotten:
            return ForgottenTask(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self._records or key in self.forgotten


class Handlers(MutableMapping[str, Callable[..., Any]]):
    """``scheduler.handlers``: adding an entry serves that RPC op (preload scripts and
    scheduler plugins do ``scheduler.handlers["op"] = f``). Built-in ops are listed but
    cannot be replaced or removed."""

    def __init__(self, rpc_ops: MutableMapping[str, Any], make_op: Callable[[Any], Any]) -> None:
        self._rpc_ops = rpc_ops
        self._make_op = make_op
        self._added: dict[str, Callable[..., Any]] = {}

    def __getitem__(self, op: str) -> Callable[..., Any]:
        if op in self._added:
            return self._added[op]
        return self._rpc_ops[op]  # type: ignore[no-any-return]

    def __setitem__(self, op: str, handler: Callable[..., Any]) -> None:
        if op in self._rpc_ops and op not in self._added:
            raise ValueError(f"RPC op {op!r} is a built-in of dsched and cannot be replaced")
        self._added[op] = handler
        self._rpc_ops[op] = self._make_op(handler)

    def __delitem__(self, op: str) -> None:
        del self._added[op]
        del self._rpc_ops[op]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rpc_ops)

    def __len__(self) -> int:
        return len(self._rpc_ops)


def takes_comm(handler: Callable[..., Any]) -> bool:
    """Dask passes the comm to a handler whose first parameter is named ``comm``."""
    try:
        params = list(inspect.signature(handler).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "comm"


class BackgroundTasks:
    """``_ongoing_background_tasks.call_soon(f, *args, **kwargs)``, which
    ``distributed.worker.run`` uses for ``run_on_scheduler(..., wait=False)``."""

    def __init__(self, spawn: Callable[[Any], None]) -> None:
        self._spawn = spawn

    def call_soon(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        async def run() -> None:
            result = function(*args, **kwargs)
            if inspect.isawaitable(result):
                await result

        self._spawn(run())


class _Service:
    """What Dask code reads of an entry of ``Scheduler.services``: its ``port``."""

    __slots__ = ("port",)

    def __init__(self, port: int) -> None:
        self.port = port

    def __repr__(self) -> str:
        return f"<service on port {self.port}>"


class Services(MutableMapping[str, Any]):
    """``scheduler.services``: the scheduler's own (name -> port, read as objects with a
    ``port``) and any a preload adds (kept as given; a ``port`` attribute of theirs is
    reported by ``identity()``, as Dask reports ``{name: service.port}``)."""

    def __init__(self, scheduler: Any) -> None:
        self._scheduler = scheduler  # its ``services`` (name -> port) exist once it starts
        self._added: dict[str, Any] = {}

    @property
    def _ports(self) -> dict[str, int]:
        return self._scheduler.services  # type: ignore[no-any-return]

    def __getitem__(self, name: str) -> Any:
        if name in self._added:
            return self._added[name]
        return _Service(self._ports[name])

    def __setitem__(self, name: str, service: Any) -> None:
        if name in self._ports and name not in self._added:
            raise ValueError(f"service {name!r} is dsched's own and cannot be replaced")
        self._added[name] = service
        port = getattr(service, "port", None)
        if isinstance(port, int):
            self._ports[name] = port

    def __delitem__(self, name: str) -> None:
        del self._added[name]
        self._ports.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter({**self._ports, **self._added})

    def __len__(self) -> int:
        return len({**self._ports, **self._added})


class SchedulerFacade:
    """The scheduler as Dask plugins see it (see the module docstring for the list)."""

    def __init__(self, scheduler: Any, plugins: Plugins) -> None:
        self._scheduler = scheduler
        self._plugins = plugins
        state = scheduler.state
        self.tasks = _TasksView(state.tasks)
        self.workers = _RecordsView(state.workers, WorkerView)
        self.clients = _RecordsView(state.clients, ClientView)
        self.handlers = Handlers(scheduler.rpc_ops, plugins.handler_op)
        self._ongoing_background_tasks = BackgroundTasks(scheduler.reactor.spawn)
        self._local_directory: str | None = None
        self.services = Services(scheduler)

    def __repr__(self) -> str:
        return f"<dsched SchedulerFacade {self._scheduler.id}>"

    # ------------------------------------------------------------------ identity
    @property
    def id(self) -> str:
        return str(self._scheduler.id)

    @property
    def address(self) -> str:
        return str(self._scheduler.address)

    @property
    def monitor(self) -> Any:
        """Dask's ``SystemMonitor`` as far as ``performance_report`` reads it: no samples."""
        from types import SimpleNamespace

        return SimpleNamespace(count=0)

    @property
    def loop(self) -> Any:
        from tornado.ioloop import IOLoop

        return IOLoop.current()

    @property
    def local_directory(self) -> str:
        if self._local_directory is None:
            self._local_directory = tempfile.mkdtemp(prefix="dsched-scheduler-")
        return self._local_directory

    def identity(self, n_workers: int = -1) -> dict[str, Any]:
        return self._scheduler.identity(n_workers)  # type: ignore[no-any-return]

    @property
    def time_started(self) -> float:
        return float(self._scheduler.started)

    @property
    def transition_log(self) -> Any:
        return self._scheduler.state.transition_log

    @property
    def unrunnable(self) -> dict[TaskView, float]:
        started = self.time_started
        return {TaskView(ts): started for ts in self._scheduler.state.no_worker}

    # ------------------------------------------------------------------ adaptive scaling
    def adaptive_target(self, target_duration: float | str | None = None) -> int:
        return self._scheduler.adaptive.adaptive_target(target_duration)  # type: ignore[no-any-return]

    def workers_to_close(self, **kwargs: Any) -> list[Any]:
        return self._scheduler.adaptive.workers_to_close(**kwargs)  # type: ignore[no-any-return]

    def check_idle(self) -> float | None:
        return self._scheduler.adaptive.check_idle()  # type: ignore[no-any-return]

    async def retire_workers(
        self, workers: list[str] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Dask's ``Scheduler.retire_workers``: the ``retire_workers`` RPC's reply."""
        args = dict(kwargs) if workers is None else {"workers": workers, **kwargs}
        return await self._scheduler.reactor.request(  # type: ignore[no-any-return]
            "retire_workers", "scheduler", args
        )

    # ------------------------------------------------------------------ plugins
    @property
    def plugins(self) -> Mapping[str, Any]:
        return self._plugins.scheduler_plugins

    @property
    def worker_plugins(self) -> Mapping[str, bytes]:
        return self._plugins.worker_plugins

    @property
    def nanny_plugins(self) -> Mapping[str, bytes]:
        return self._plugins.nanny_plugins

    def add_plugin(
        self, plugin: Any, *, idempotent: bool = False, name: str | None = None, **_: Any
    ) -> None:
        self._plugins.add_plugin(plugin, idempotent=idempotent, name=name)

    def remove_plugin(self, name: str | None = None) -> None:
        self._plugins.remove_plugin(name)

    async def register_worker_plugin(
        self, comm: Any, plugin: bytes, name: str, idempotent: bool = False
    ) -> dict[str, Any]:
        return await self._plugins.register_worker_plugin(plugin, name, idempotent)

    async def unregister_worker_plugin(self, comm: Any, name: str) -> dict[str, Any]:
        return await self._plugins.unregister_worker_plugin(name)

    async def register_nanny_plugin(
        self, comm: Any, plugin: bytes, name: str, idempotent: bool = False
    ) -> dict[str, Any]:
        return await self._plugins.register_nanny_plugin(plugin, name, idempotent)

    async def unregister_nanny_plugin(self, comm: Any, name: str) -> dict[str, Any]:
        return await self._plugins.unregister_nanny_plugin(name)

    def valid_workers_downscaling(self, workers: list[Any]) -> list[Any]:
        return self._plugins.valid_workers_downscaling(workers)

    # ------------------------------------------------------------------ actions
    def log_event(self, topic: str | list[str], msg: Any) -> None:
        self._plugins.log_event(topic, msg)

    async def broadcast(
        self,
        *,
        msg: dict[str, Any],
        workers: list[str] | None = None,
        hosts: list[str] | None = None,
        nanny: bool = False,
        on_error: str = "raise",
        **_: Any,
    ) -> dict[str, Any]:
        return await self._scheduler.data.broadcast(  # type: ignore[no-any-return]
            msg, workers=workers, hosts=hosts, nanny=nanny, on_error=on_error
        )

    async def upload_file(
        self, filename: str, data: str | bytes, load: bool = True
    ) -> dict[str, Any]:
        """``Server.upload_file``: write into the scheduler's local directory, import it."""
        import os

        from distributed.utils import import_file

        out_filename = os.path.join(self.local_directory, filename)
        payload = data.encode() if isinstance(data, str) else bytes(data)
        with open(out_filename, "wb") as f:
            f.write(payload)
        if load:
            import_file(out_filename)
        return {"status": "OK", "nbytes": len(payload)}
