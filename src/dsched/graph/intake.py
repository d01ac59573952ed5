"""Graph intake: turn one ``update-graph`` stream message into a culled, ordered task dict.

Theory of operation
-------------------
A client does not send tasks; it sends one pickled dask *expression* (``expr_ser``) plus
the keys it wants, optional priorities and the *global* annotations (protocol.md §4.2).
The real scheduler (``Scheduler.update_graph`` / ``_materialize_graph``) turns that into
``dict[Key, GraphNode]`` with dask's own code, and so do we, in four steps:

1. **Deserialize** the expression. This unpickles user functions and data, so it fails
   when the scheduler's environment differs from the client's; that failure is reported
   with the real scheduler's wording.
2. **Materialize**: ``expr.__dask_graph__()``, ``convert_legacy_graph``, per-layer
   annotations from ``expr.__dask_annotations__()``, and an explicit cull for
   ``LLGExpr`` (every other expression type culls itself). One exception, the *delayed
   fast path*: for HighLevelGraph expressions whose low-level optimizer is
   ``dask.delayed.optimize`` (which only culls unless ``optimization.fuse.delayed`` is
   set) dask culls layer by layer, which is O(N^2) for N ``delayed`` calls (one layer
   each). We merge the layers into one dict and cull once instead: same tasks, O(N).
   Other optimizers (array fusion...) change the graph and are always called.
3. **Prepare each task for the wire**: its dependencies, its merged annotations (global
   ones, callables evaluated on the key, overridden by per-layer ones) and its GraphNode
   pickled once, as ``compute-task.run_spec`` will carry it to a ``dask worker``: a
   ``PickledBytes`` (48 bytes besides the pickle), zlib-compressed from 1 KB on (which
   the worker's ``loads`` undoes). Each GraphNode is dropped once pickled.
4. **Order**: the client's ``internal_priority`` (submit/map send one) or
   ``dask.order.order`` of the graph's *skeleton* (``_Skeleton``: keys, dependencies and
   which nodes are tasks, all that dask.order reads), so that the graph and dask.order's
   own structures are not held at once; a graph of more than ``SKELETON_ORDER_MAX`` tasks
   is ordered before step 3, as itself (see there why).

Pickling dominates for many small tasks: ``distributed.protocol.pickle.dumps`` falls
back to cloudpickle for a whole Task as soon as its function lives in ``__main__``, and
then re-pickles that function by value for every task (~30 us each). ``_RunSpecPickler``
pickles each such function or class by value once per graph and embeds those bytes in
every task's plain (C) pickle as ``pickle.loads(<bytes>)``; the worker unpickles an
equivalent Task. Anything the plain pickler cannot handle takes distributed's own path.

Why pickle here rather than keep the GraphNodes and pickle each when it is dispatched (as
Dask does)? Memory, measured (``benchmarks/results/memory-2026-12-02``): kept GraphNodes
retain 1.40 KB a task on xarray-25 and 0.51 KB on tree-14, the pickles 0.67 KB and 0.19 KB
(plus a 48-byte ``PickledBytes`` each; buffers under 1 KB copied into the pickle, pickles
over 1 KB zlib-compressed), so the pickles are smaller although they cannot share objects
between tasks; and pickling here keeps 5-8 us a task off the event loop. A task that cannot
be pickled fails its graph at intake with the pickler's own exception (Dask fails later, at
dispatch, by breaking the worker's connection: ``tests/integration/test_unpicklable_task.py``).

The module does no I/O, starts no event loop, logs nothing and reads no clock; the server
runs ``intake_update_graph`` in a worker thread because it is CPU-bound.
"""

from __future__ import annotations

import copyreg
import io
import operator
import pickle
import textwrap
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle  # type: ignore[import-untyped]  # cloudpickle ships no type information
import dask
import dask.order
from dask._expr import HLGExpr, LLGExpr, _AnnotationsTombstone, _HLGExprSequence
from dask._task_spec import DataNode, GraphNode, Task, convert_legacy_graph
from dask.core import flatten
from dask.delayed import optimize as delayed_optimize
from dask.typing import Key
from distributed.protocol import pickle as distributed_pickle
from distributed.protocol.compression import decompress
from distributed.protocol.serialize import merge_and_deserialize
from distributed.shuffle._core import P2PBarrierTask
from distributed.utils import ensure_memoryview

from dsched.wire.codec import PickledBytes

__all__ = ["GraphIntake", "GraphIntakeError", "TaskSpec", "intake_update_graph"]

# Verbatim from Scheduler.update_graph so that users see the message the docs talk about.
DESERIALIZATION_ERROR_TEXT = textwrap.dedent(
    """\
    Error during deserialization of the task graph. This frequently
    occurs if the Scheduler and Client have different environments.
    For more information, see
    https://docs.dask.org/en/stable/deployment-considerations.html#consistent-software-environments
"""
)


@dataclass(slots=True)
class TaskSpec:
    key: Key
    # Every key this task needs; may name keys that are not in this graph (futures that
    # the scheduler already holds from earlier graphs).
    dependencies: tuple[Key, ...]
    # The GraphNode pickled once here; sent verbatim as compute-task.run_spec.
    run_spec: PickledBytes
    # Global annotations overridden by per-layer ones, callables evaluated on the key.
    # Never mutated: tasks with identical annotations share one dict.
    annotations: dict[str, Any]


@dataclass(slots=True)
class GraphIntake:
    tasks: dict[Key, TaskSpec]
    # The client's internal_priority when it sent one (submit/map; it may not cover
    # DataNodes that client.map adds for large kwargs), else dask.order.order(dsk).
    order: dict[Key, int]
    # The ShuffleSpec of each P2P barrier task (``P2PBarrierTask.spec``), by barrier key:
    # what the P2P extension creates a shuffle's runs from.
    shuffle_specs: dict[Key, Any]


class GraphIntakeError(Exception):
    """The graph cannot be accepted; report ``exception`` as task-erred for every key."""

    def __init__(self, exception: BaseException) -> None:
        super().__init__(str(exception))
        self.exception = exception


Orderer = Callable[[dict[Key, GraphNode]], Mapping[Key, int]]

# Up to this many tasks the graph's skeleton is ordered after pickling (step 4); a bigger
# graph is ordered first, as itself. Measured at 1M tasks, ordering the skeleton stalled
# the event loop for 1.3-1.6 s (the loop thread waiting, 0.015 s of its own CPU, while
# dask.order's reverse_dict ran on the intake thread; in-process, 3 runs), where ordering
# the graph first gave at most 0.35-0.75 s: not understood yet. (dsched.server.collector
# frees dask.order's garbage at once up to this size, COLLECT_AFTER_ORDER_MAX.)
SKELETON_ORDER_MAX = 250_000


def intake_update_graph(
    msg: Mapping[str, Any], order_graph: Orderer = dask.order.order
) -> GraphIntake:
    """Materialize, cull, pickle and order the graph of one ``update-graph`` message.

    ``order_graph`` is ``dask.order.order`` or a wrapper of it (the server's collects the
    cyclic garbage it leaves: ``dsched.server.collector``)."""
    requested_keys = set(msg["keys"])
    expression = _deserialize_expression(msg["expr_ser"])
    try:
        global_annotations = _unpickle_field(msg.get("annotations")) or {}
        dsk, annotations_by_type = _materialize(expression, requested_keys)
        # The expression holds the un-culled graph; drop it before the costly steps.
        del expression
        shuffle_specs = _shuffle_specs(dsk)
        order = msg.get("internal_priority")
        if not order and len(dsk) > SKELETON_ORDER_MAX:
            order = order_graph(dsk)
        if order:
            tasks = _build_task_specs(dsk, global_annotations, annotations_by_type)
        else:
            skeleton: dict[Key, GraphNode] = {}
            tasks = _build_task_specs(dsk, global_annotations, annotations_by_type, skeleton)
            order = order_graph(skeleton)
            del skeleton
    except GraphIntakeError:
        raise
    except Exception as error:
        raise GraphIntakeError(error) from error
    # dask.order and the codec both give a dict already: a copy would cost ~80 bytes a task.
    order = order if type(order) is dict else dict(order)
    return GraphIntake(tasks=tasks, order=order, shuffle_specs=shuffle_specs)


# --- step 1: deserialize ------------------------------------------------------------


def _deserialize_expression(expr_ser: Any) -> Any:
    try:
        header, frames = expr_ser.header, list(expr_ser.frames)
        # The client sends expr_ser as a pre-built Serialized, which distributed forwards
        # uncompressed and unsplit; undo both anyway in case another client does not.
        if any(header.get("compression") or ()):
            frames = decompress(header, frames)
        # distributed's (de)serialization functions are not annotated (no-untyped-call).
        return merge_and_deserialize(header, frames)  # type: ignore[no-untyped-call]
    except Exception as error:
        runtime_error = RuntimeError(DESERIALIZATION_ERROR_TEXT)
        runtime_error.__cause__ = error
        raise GraphIntakeError(runtime_error) from error


def _unpickle_field(value: Any) -> Any:
    """A ``ToPickle`` field as our codec (``Pickled``) or distributed's loads left it."""
    if hasattr(value, "unpickle"):
        return value.unpickle()
    if hasattr(value, "header") and hasattr(value, "frames"):
        return pickle.loads(value.header["pickled-obj"], buffers=value.frames)
    return value


# --- step 2: materialize ------------------------------------------------------------

AnnotationsByType = dict[str, dict[Key, Any]]
Materialized = dict[Key, GraphNode]  # key -> task, after convert_legacy_graph


def _materialize(
    expression: Any, requested_keys: set[Key]
) -> tuple[Materialized, AnnotationsByType]:
    hlg_operands = _hlg_operands(expression)
    if hlg_operands is not None and any(map(_is_cull_only_delayed, hlg_operands)):
        return _materialize_hlg_operands(hlg_operands)

    if isinstance(expression, dict) and not expression:
        # ``recreate_task_locally`` holds a task's inputs with an empty *dict* as the graph
        # (ReplayTaskClient._get_dependencies). Dask's scheduler fails on it (a dict has no
        # __dask_graph__), erring those keys: usually after the client's gather got them,
        # not always. An empty graph that wants existing keys is what the client means.
        return {}, {}
    # The reference path, Scheduler.update_graph + _materialize_graph.
    dsk = expression.__dask_graph__()
    annotations_by_type = dict(expression.__dask_annotations__())
    dsk = convert_legacy_graph(dsk)
    if isinstance(expression, LLGExpr):
        # LLGExpr (client.submit, client.get(dict)) is the only type that does not cull
        # itself.
        dsk = _cull(dsk, requested_keys)
    return dsk, annotations_by_type


def _hlg_operands(expression: Any) -> list[HLGExpr] | None:
    if isinstance(expression, _HLGExprSequence):
        operands = list(expression.operands)
    elif isinstance(expression, HLGExpr):
        operands = [expression]
    else:
        return None
    return operands if all(isinstance(op, HLGExpr) for op in operands) else None


def _is_cull_only_delayed(operand: HLGExpr) -> bool:
    # The config is read here, in the scheduler process, exactly as dask does it.
    return operand.low_level_optimizer is delayed_optimize and not dask.config.get(
        "optimization.fuse.delayed"
    )


def _materialize_hlg_operands(operands: list[HLGExpr]) -> tuple[Materialized, AnnotationsByType]:
    """``_HLGExprSequence._optimized_dsk`` + ``__dask_annotations__``, culling delayed in O(N).

    Operands are merged in order (later keys win), as ``HighLevelGraph.merge`` does.
    """
    dsk: dict[Key, Any] = {}
    annotations_by_type: AnnotationsByType = {}
    for operand in operands:
        # dask's flatten and __dask_keys__ are not annotated (no-untyped-call).
        output_keys = set(flatten(operand.__dask_keys__()))  # type: ignore[no-untyped-call]
        hlg = operand.hlg
        if _is_cull_only_delayed(operand):
            # The layers' legacy tasks must be converted against this graph's keys before
            # their dependencies (and so the cull) are known; HighLevelGraph.cull uses the
            # same key set.
            operand_dsk = _cull(convert_legacy_graph(_merge_layers(hlg)), output_keys)
            surviving = operand_dsk.__contains__
        else:
            if (optimizer := operand.low_level_optimizer) is not None:
                hlg = optimizer(hlg, operand.__dask_keys__())  # type: ignore[no-untyped-call]
            operand_dsk = _merge_layers(hlg)
            surviving = None
        dsk.update(operand_dsk)
        _collect_layer_annotations(hlg, surviving, annotations_by_type)
    return convert_legacy_graph(dsk), annotations_by_type


def _merge_layers(hlg: Any) -> dict[Key, Any]:
    layers = getattr(hlg, "layers", None)
    if layers is None:  # a plain mapping in place of a HighLevelGraph
        return dict(hlg)
    merged: dict[Key, Any] = {}
    for layer in layers.values():
        merged.update(layer)
    return merged


def _collect_layer_annotations(
    hlg: Any,
    is_kept: Callable[[Key], bool] | None,
    annotations_by_type: AnnotationsByType,
) -> None:
    """Per-key values of layer annotations, as ``_HLGExprSequence.__dask_annotations__``.

    ``is_kept`` restricts to the tasks that survived our cull (dask iterates the culled
    layers instead); ``None`` keeps every key of the (already optimized) graph.
    """
    for layer in getattr(hlg, "layers", {}).values():
        layer_annotations = layer.annotations
        if not layer_annotations:
            continue
        layer_keys = [key for key in layer if is_kept is None or is_kept(key)]
        for annotation, value in layer_annotations.items():
            per_key = annotations_by_type.setdefault(annotation, {})
            for key in layer_keys:
                key_value = value(key) if callable(value) else value
                if not isinstance(key_value, _AnnotationsTombstone):
                    per_key[key] = key_value


def _cull(dsk: Mapping[Key, GraphNode], keys: Iterable[Key]) -> dict[Key, GraphNode]:
    """``distributed.scheduler._cull``: the tasks reachable from ``keys``.

    Unlike ``dask._task_spec.cull`` it never returns ``dsk`` unculled just because the
    sizes match: ``keys`` may name futures outside ``dsk``.
    """
    work = set(keys)
    reachable: set[Key] = set()
    while work:
        key = work.pop()
        if key in reachable or key not in dsk:
            continue
        reachable.add(key)
        work.update(dsk[key].dependencies)
    # Keep the graph's own order, not the walk's (which follows string hashes, so it changes
    # from process to process): dask.order breaks ties by insertion order, and priorities
    # must come out as the real scheduler's do, every time.
    return {key: node for key, node in dsk.items() if key in reachable}


def _shuffle_specs(dsk: Mapping[Key, GraphNode]) -> dict[Key, Any]:
    return {key: node.spec for key, node in dsk.items() if isinstance(node, P2PBarrierTask)}


# --- step 4: per-task annotations and run_specs ---------------------------------------


def _build_task_specs(
    dsk: dict[Key, GraphNode],
    global_annotations: Mapping[str, Any],
    annotations_by_type: AnnotationsByType,
    skeleton: dict[Key, GraphNode] | None = None,
) -> dict[Key, TaskSpec]:
    """Consumes ``dsk``: each GraphNode is dropped once pickled, so the graph and its pickles
    are not both held in full (the scheduler's peak memory is set during intake). With
    ``skeleton``, also fills it with each node's ``_Skeleton`` stand-in, for dask.order."""
    merge_annotations = _AnnotationMerger(global_annotations, annotations_by_type)
    pickle_run_spec = _RunSpecPickler()
    specs: dict[Key, TaskSpec] = {}
    for key in list(dsk):
        node = dsk.pop(key)
        dependencies = node.dependencies
        if skeleton is not None:
            # (dask.core.istask: every GraphNode but a DataNode is a task)
            skeleton[key] = (
                _NOT_A_TASK if isinstance(node, DataNode) else _Skeleton(key, dependencies)
            )
        specs[key] = TaskSpec(
            key=key,
            dependencies=tuple(dependencies),
            run_spec=pickle_run_spec(node),
            annotations=merge_annotations(key),
        )
    return specs


class _Skeleton(GraphNode):
    """All that ``dask.order`` reads of a task: its dependencies, and that it is a task.

    Ordering the skeleton instead of the graph gives the same priorities (tested against
    ``dask.order`` of the graph itself) and lets each GraphNode go once it is pickled, before
    ``dask.order`` builds its own structures (about 1 KB a task): otherwise the unpickled
    graph, those structures and the pickles are all held at once, and that is the
    scheduler's peak (tree-14: +83 MB of RSS, of which ordering +32 MB).
    """

    __slots__ = ()

    def __init__(self, key: Key, dependencies: frozenset[Key]) -> None:
        self.key = key
        self._dependencies = dependencies


# What dask.order reads of a node that is not a task (``istask`` false, no dependencies):
# one shared DataNode with no data.
_NOT_A_TASK = DataNode(None, None)


class _AnnotationMerger:
    """Per-key annotations as ``Scheduler._apply_annotations`` computes them.

    Global values first (callables called with the key), then per-layer values unless
    they are ``None``. Results are shared between keys whose values are the same objects,
    so 100k tasks under one ``dask.annotate`` block hold one dict.
    """

    __slots__ = ("_by_type", "_global_callables", "_global_static", "_shared")

    def __init__(
        self, global_annotations: Mapping[str, Any], annotations_by_type: AnnotationsByType
    ) -> None:
        self._global_static = {k: v for k, v in global_annotations.items() if not callable(v)}
        self._global_callables = {k: v for k, v in global_annotations.items() if callable(v)}
        self._by_type = [(name, values) for name, values in annotations_by_type.items() if values]
        # Keyed by value identities; each cached dict holds its values, so ids stay valid.
        self._shared: dict[tuple[tuple[str, int], ...], dict[str, Any]] = {}

    def __call__(self, key: Key) -> dict[str, Any]:
        if self._global_callables:
            # Values computed per key are fresh objects: nothing worth sharing.
            merged = dict(self._global_static)
            for name, compute in self._global_callables.items():
                merged[name] = compute(key)
            for name, values in self._by_type:
                if (value := values.get(key)) is not None:
                    merged[name] = value
            return merged

        overrides = [
            (name, value)
            for name, values in self._by_type
            if (value := values.get(key)) is not None
        ]
        identity = tuple((name, id(value)) for name, value in overrides)
        shared = self._shared.get(identity)
        if shared is None:
            shared = self._shared[identity] = {**self._global_static, **dict(overrides)}
        return shared


class _RunSpecPickler:
    """Pickle GraphNodes as ``distributed.protocol.pickle.dumps`` would, but cheaper.

    distributed pickles with the C pickler and switches to cloudpickle for the whole
    object when the result mentions ``__main__`` (or pickling fails), so functions and
    classes that are not importable on a worker travel by value. We make that decision
    once per function/class object instead of once per task: objects that must travel by
    value are cloudpickled once and embedded in each task's plain pickle as
    ``pickle.loads(<bytes>)``. If anything else still refers to ``__main__`` or the plain
    pickler fails, the task takes distributed's own path.

    Difference from cloudpickling a whole task: two by-value functions in one task no
    longer share one rebuilt globals dict. Each task is unpickled separately on the
    worker anyway, so nothing shares it across tasks in either scheme.
    """

    __slots__ = ("_buffers", "_by_value", "_file", "_pickler")

    def __init__(self) -> None:
        # id(obj) -> (obj kept alive so the id stays unique, reduce tuple or None for
        # "pickle by reference", occurrences of b"__main__" in the embedded bytes)
        self._by_value: dict[int, tuple[Any, tuple[Any, ...] | None, int]] = {}
        # One pickler and one buffer for the whole graph, reset between tasks (clear_memo:
        # every run_spec is unpickled on its own): building them per task cost ~2 us.
        self._buffers: list[memoryview] = []
        self._file = io.BytesIO()
        self._pickler = self._new_pickler()

    def _new_pickler(self) -> _EmbeddingPickler:
        return _EmbeddingPickler(
            self._file,
            self._by_value,
            buffer_callback=self._out_of_band,
        )

    def _out_of_band(self, buffer: pickle.PickleBuffer) -> bool:
        """Keep a big buffer out of band (no copy); a small one goes in the pickle (True).

        Out of band, a buffer costs a memoryview (184 bytes) and keeps its array alive,
        and a pickle with buffers is not compressed: xarray-25's fused tasks each carry an
        empty array, so all 8,760 of them stayed uncompressed (3.4 KB each) that way."""
        view = ensure_memoryview(buffer)
        if view.nbytes < _IN_BAND_BELOW:
            return True
        self._buffers.append(view)
        return False

    def __call__(self, node: GraphNode) -> PickledBytes:
        buffers = self._buffers = []
        try:
            data = self._dumps_plain(node)
        except Exception:
            # A pickler that raised half-way may hold a half-written frame.
            self._pickler = self._new_pickler()
            data = None
        if data is None:
            buffers.clear()
            data = distributed_pickle.dumps(  # type: ignore[no-untyped-call]
                node, protocol=5, buffer_callback=lambda b: buffers.append(ensure_memoryview(b))
            )
        # A big pickle is kept compressed (~60 % of its size on fused array tasks).
        return PickledBytes.compact(data, tuple(buffers))

    def _dumps_plain(self, node: GraphNode) -> bytes | None:
        file, pickler = self._file, self._pickler
        file.seek(0)
        file.truncate()
        pickler.clear_memo()
        pickler.embedded_main_mentions = 0
        pickler.dump(node)
        data = file.getvalue()
        if len(data) > _RENEW_PICKLER_AFTER:
            # clear_memo() costs the memo table's capacity, which never shrinks: after one
            # task with 25k inputs every later clear would cost ~150 us. Start afresh.
            self._pickler = self._new_pickler()
        # Only the embedded by-value pickles may mention __main__; anything else that
        # does (e.g. an object reduced to a __main__ global by name) needs cloudpickle.
        if data.count(b"__main__") != pickler.embedded_main_mentions:
            return None
        return data


class _EmbeddingPickler(pickle.Pickler):
    def __init__(
        self,
        file: io.BytesIO,
        by_value: dict[int, tuple[Any, tuple[Any, ...] | None, int]],
        buffer_callback: Callable[[pickle.PickleBuffer], bool],
    ) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self._by_value = by_value
        self.embedded_main_mentions = 0

    def reducer_override(self, obj: Any) -> Any:
        # Called for every object except builtin containers and scalars; keep it short.
        kind = type(obj)
        if kind is Task:
            # What object.__reduce_ex__ gives for a Task, minus dask's Python-level
            # __getstate__ (a generator over the slots): the same bytes, ~4 us less.
            # typeshed's copyreg stub lacks __newobj__, which exists at runtime.
            return (copyreg.__newobj__, (Task,), _task_state(obj))  # type: ignore[attr-defined]
        if kind is not types.FunctionType and not isinstance(obj, type):
            return NotImplemented
        entry = self._by_value.get(id(obj))
        if entry is None:
            entry = self._by_value[id(obj)] = _classify_global(obj)
        reduction = entry[1]
        if reduction is None:
            return NotImplemented
        # The pickle memo makes this run once per object per task.
        self.embedded_main_mentions += entry[2]
        return reduction


# Out-of-band buffers smaller than this are copied into the pickle instead (see above).
_IN_BAND_BELOW = 1024

# Bytes of pickle above which the pickler is replaced rather than cleared (see above).
_RENEW_PICKLER_AFTER = 4096

# Task.__getstate__ is tuple(getattr(task, slot) for slot in Task.get_all_slots()).
_task_state = operator.attrgetter(*Task.get_all_slots())


def _classify_global(obj: Any) -> tuple[Any, tuple[Any, ...] | None, int]:
    """By reference unless pickle fails or names ``__main__`` (distributed's rule), or the
    object's module is registered with ``cloudpickle.register_pickle_by_value``."""
    try:
        by_reference = b"__main__" not in pickle.dumps(obj, protocol=5)
    except Exception:
        by_reference = False
    if by_reference and _registered_by_value(getattr(obj, "__module__", None)):
        # distributed only honours the registry when something else in the task forces
        # cloudpickle; the user asked for by-value, so honour it always.
        by_reference = False
    if by_reference:
        return (obj, None, 0)
    embedded = cloudpickle.dumps(obj, protocol=5)
    return (obj, (pickle.loads, (embedded,)), embedded.count(b"__main__"))


def _registered_by_value(module_name: Any) -> bool:
    if not isinstance(module_name, str):
        return False
    registry = cloudpickle.list_registry_pickle_by_value()
    parts = module_name.split(".")
    return any(".".join(parts[:i]) in registry for i in range(1, len(parts) + 1))
