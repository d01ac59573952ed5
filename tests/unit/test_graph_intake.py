"""Tests for dsched.graph.intake against the real scheduler's materialization path.

Every input is the ``update-graph`` message a real ``distributed.Client`` would send
(built with the client's own steps, then encoded and decoded as on the wire), and every
result is compared with what ``distributed.scheduler`` computes from the same message.

``python tests/unit/test_graph_intake.py`` prints the intake benchmark (protocol.md §4.2).
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from dask import delayed
from dask._expr import FinalizeCompute, LLGExpr
from dask._task_spec import DataNode, GraphNode, Task, TaskRef, parse_input
from dask.base import collections_to_expr, tokenize
from dask.core import flatten
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from dask.utils import funcname
from distributed import protocol
from distributed.client import _MapExpr
from distributed.protocol.serialize import Pickled as DistributedPickled
from distributed.protocol.serialize import Serialized, ToPickle, serialize, to_serialize
from distributed.scheduler import Scheduler, _cull, _materialize_graph
from distributed.shuffle._core import ShuffleSpec, barrier_key
from toolz import merge

from dsched.graph import GraphIntake, GraphIntakeError, TaskSpec, intake_update_graph
from dsched.graph import intake as intake_module
from dsched.wire import codec

pytestmark = pytest.mark.timeout(60)


# --- functions used in graphs ---------------------------------------------------------


def inc(x: int) -> int:
    return x + 1


def add(*args: int) -> int:
    return sum(args)


def scale(x: int, factor: int = 1) -> int:
    return x * factor


# A function as an interactive session defines it: in __main__ yet not importable from it,
# so pickling it by reference fails and both client and scheduler must cloudpickle it.
_INTERACTIVE: dict[str, Any] = {"__name__": "__main__"}
exec(
    "def interactive_inc(x):\n    return x + OFFSET\n\nOFFSET = 1\n",
    _INTERACTIVE,
)
interactive_inc = _INTERACTIVE["interactive_inc"]
exec("def dict_fn(x):\n    return {x: x}\n", _INTERACTIVE)
_INTERACTIVE_DICT_FN = _INTERACTIVE["dict_fn"]


# --- building messages as distributed.Client does ---------------------------------------


def wire_message(
    expr: Any,
    keys: Iterable[Any],
    *,
    internal_priority: dict | None = None,
    annotations: dict | None = None,
    fifo_timeout: Any = "60s",
) -> dict:
    """The message of ``Client._graph_to_futures``, after a trip through the wire."""
    msg = {
        "op": "update-graph",
        "expr_ser": Serialized(*serialize(to_serialize(expr), on_error="raise")),
        "keys": set(keys),
        "internal_priority": internal_priority,
        "submitting_task": None,
        "fifo_timeout": fifo_timeout,
        "actors": None,
        "code": ToPickle(()),
        "annotations": ToPickle(annotations or {}),
        "span_metadata": ToPickle({"collections": []}),
    }
    decoded = codec.loads(protocol.dumps(msg))
    assert isinstance(decoded, dict)
    return decoded


def compute_message(
    *collections: Any, annotations: dict | None = None, optimize_graph: bool = True
) -> dict:
    """``Client.compute``: collections_to_expr -> FinalizeCompute -> optimize."""
    expr = FinalizeCompute(collections_to_expr(list(collections), optimize_graph)).optimize()
    keys = list(flatten(expr.__dask_keys__()))
    return wire_message(expr, keys, annotations=annotations)


def persist_message(*collections: Any) -> dict:
    """``Client.persist``: collections_to_expr -> optimize, no finalize task."""
    expr = collections_to_expr(list(collections), True).optimize()
    return wire_message(expr, list(flatten(expr.__dask_keys__())))


def submit_message(func: Callable, *args: Any, **kwargs: Any) -> dict:
    """``Client.submit``: one Task in an LLGExpr, internal_priority {key: 0}."""
    key = f"{funcname(func)}-{uuid.uuid4().hex}"
    task = Task(key, func, *(parse_input(a) for a in args))
    expr = LLGExpr({key: task}, _determ_token=uuid.uuid4().hex)
    return wire_message(
        expr, [key], internal_priority={key: 0}, annotations=kwargs, fifo_timeout="100 ms"
    )


def map_message(func: Callable, *iterables: Any, **kwargs: Any) -> dict:
    """``Client.map``: a _MapExpr whose keys are computed before it is pickled."""
    expr = _MapExpr(func, iterables, key=funcname(func), pure=True, annotations={}, kwargs=kwargs)
    keys = list(expr.keys)
    return wire_message(
        expr,
        keys,
        internal_priority=dict(zip(keys, range(len(keys)), strict=True)),
        fifo_timeout="100 ms",
    )


# --- the real scheduler's path ----------------------------------------------------------


def reference_intake(msg: dict) -> tuple[dict, dict, dict]:
    """(dsk, order, annotations per key) as Scheduler.update_graph computes them."""
    expr_ser = msg["expr_ser"]
    expr = protocol.deserialize(expr_ser.header, expr_ser.frames)
    dsk, annotations_by_type = _materialize_graph(expr, validate=False)
    if isinstance(expr, LLGExpr):
        dsk = _cull(dsk, set(msg["keys"]))
    order = msg["internal_priority"] or dask.order.order(dsk)

    tasks = [SimpleNamespace(key=key, annotations={}) for key in dsk]
    fake_scheduler = SimpleNamespace(coerce_address=_reject_address)
    global_annotations = msg["annotations"].unpickle()
    Scheduler._apply_annotations(fake_scheduler, tasks, annotations_by_type, global_annotations)
    return dsk, order, {ts.key: ts.annotations for ts in tasks}


def _reject_address(address: str) -> str:
    raise ValueError(address)


def worker_side_run_spec(spec: TaskSpec) -> GraphNode:
    """The run_spec as a dask worker gets it: a compute-task message through the wire."""
    pickled = DistributedPickled(dict(spec.run_spec.header), list(spec.run_spec.frames))
    frames = protocol.dumps({"op": "compute-task", "run_spec": pickled})
    return protocol.loads(frames)["run_spec"]


def execute(nodes: dict[Any, GraphNode], known: dict[Any, Any] | None = None) -> dict:
    """Run a graph the way workers do: call each node with its dependencies' values."""
    values: dict[Any, Any] = dict(known or {})

    def run(key: Any) -> Any:
        stack = [key]
        while stack:
            current = stack[-1]
            if current in values:
                stack.pop()
                continue
            missing = [d for d in nodes[current].dependencies if d not in values]
            if missing:
                stack.extend(missing)
                continue
            node = nodes[current]
            values[current] = node({d: values[d] for d in node.dependencies})
            stack.pop()
        return values[key]

    for key in nodes:
        run(key)
    return values


def assert_matches_reference(msg: dict) -> GraphIntake:
    result = intake_update_graph(msg)
    dsk, order, annotations = reference_intake(msg)

    assert result.tasks.keys() == dsk.keys()
    assert result.order == order
    for key, node in dsk.items():
        spec = result.tasks[key]
        assert spec.key == key
        assert set(spec.dependencies) == node.dependencies
        assert len(spec.dependencies) == len(node.dependencies)
        assert spec.annotations == annotations[key]
        shipped = worker_side_run_spec(spec)
        assert type(shipped) is type(node)
        assert shipped == node, key
    return result


def assert_runs_like_reference(msg: dict, known: dict | None = None) -> None:
    """The shipped run_specs compute the same values as the reference graph's nodes."""
    result = intake_update_graph(msg)
    dsk, _, _ = reference_intake(msg)
    shipped = {key: worker_side_run_spec(spec) for key, spec in result.tasks.items()}
    expected = execute(dsk, known)
    actual = execute(shipped, known)
    for key in dsk:
        _assert_same_value(actual[key], expected[key])


def _assert_same_value(actual: Any, expected: Any) -> None:
    # dask's tokens are content hashes for pandas, numpy and builtin containers alike.
    assert type(actual) is type(expected)
    assert tokenize(actual) == tokenize(expected)


# --- 1. materialization equals the real scheduler's, for every kind of graph -------------


def delayed_graph() -> Any:
    parts = [delayed(inc)(i) for i in range(5)]
    return delayed(add)(*parts, delayed(interactive_inc)(10))


def array_reduction() -> Any:
    x = da.arange(36, chunks=6).reshape(6, 6).rechunk(3)
    return (x + 1).sum(axis=0)


def array_matmul() -> Any:
    x = da.arange(16, chunks=2).reshape(4, 4).rechunk(2)
    return x @ x.T


def bag_graph() -> Any:
    return db.from_sequence(range(20), npartitions=4).map(inc).filter(lambda v: v % 2).sum()


def dataframe_frames() -> tuple[Any, Any]:
    left = pd.DataFrame({"k": np.arange(40) % 7, "a": np.arange(40)})
    right = pd.DataFrame({"k": np.arange(7), "b": np.arange(7) * 10})
    return dd.from_pandas(left, npartitions=4), dd.from_pandas(right, npartitions=3)


def dataframe_groupby() -> Any:
    left, _ = dataframe_frames()
    return left.groupby("k").a.agg(["sum", "max"], split_out=2, shuffle_method="tasks")


def dataframe_merge() -> Any:
    left, right = dataframe_frames()
    return left.merge(right, on="k", how="inner", shuffle_method="tasks")


COLLECTIONS = {
    "delayed": delayed_graph,
    "array-reduction": array_reduction,
    "array-matmul": array_matmul,
    "bag": bag_graph,
    "dataframe-groupby": dataframe_groupby,
    "dataframe-merge": dataframe_merge,
}


@pytest.mark.parametrize("name", sorted(COLLECTIONS))
def test_compute_matches_real_scheduler(name: str) -> None:
    msg = compute_message(COLLECTIONS[name]())
    assert_matches_reference(msg)
    assert_runs_like_reference(msg)


@pytest.mark.parametrize("name", ["delayed", "array-reduction", "dataframe-merge"])
def test_persist_matches_real_scheduler(name: str) -> None:
    assert_matches_reference(persist_message(COLLECTIONS[name]()))


def test_compute_of_several_collections_matches_real_scheduler() -> None:
    # One _HLGExprSequence holding a delayed group (fast path) and an array group (dask's
    # optimizer), sharing nothing.
    msg = compute_message(delayed_graph(), array_reduction(), delayed(inc)(41))
    assert_matches_reference(msg)
    assert_runs_like_reference(msg)


def test_submit_matches_real_scheduler_and_keeps_outside_dependencies() -> None:
    msg = submit_message(scale, TaskRef("future-held-by-scheduler"), 3)
    result = assert_matches_reference(msg)
    (spec,) = result.tasks.values()
    assert spec.dependencies == ("future-held-by-scheduler",)
    assert result.order == {spec.key: 0}
    assert worker_side_run_spec(spec)({"future-held-by-scheduler": 5}) == 15


def test_map_matches_real_scheduler() -> None:
    msg = map_message(interactive_inc, range(6))
    result = assert_matches_reference(msg)
    assert len(result.tasks) == 6
    assert_runs_like_reference(msg)


def test_map_with_large_kwarg_ships_it_as_data_node() -> None:
    # client.map puts kwargs above 100 kB into the graph once, as a DataNode.
    msg = map_message(scale, range(3), factor=np.int64(2), payload=np.ones(20_000))
    result = assert_matches_reference(msg)
    data_keys = [k for k, s in result.tasks.items() if type(worker_side_run_spec(s)) is DataNode]
    assert data_keys == ["payload"]
    # The array travels as an out-of-band frame, not inside the pickle stream.
    data_spec = result.tasks["payload"]
    assert data_spec.run_spec.header["num-sub-frames"] == len(data_spec.run_spec.frames) == 1


def test_legacy_dict_graph_via_client_get_is_culled() -> None:
    # client.get(dict, keys) sends the dict as an LLGExpr; only LLGExpr is culled here.
    dsk = {"a": 1, "b": (inc, "a"), "unused": (inc, "b"), "c": (add, "a", "b")}
    msg = wire_message(LLGExpr(dsk), ["c"])
    result = assert_matches_reference(msg)
    assert set(result.tasks) == {"a", "b", "c"}
    dependencies = {key: sorted(spec.dependencies) for key, spec in result.tasks.items()}
    assert dependencies == {"a": [], "b": ["a"], "c": ["a", "b"]}


def test_legacy_tasks_inside_delayed_graph_take_fast_path() -> None:
    graph = {"x": 1, "y": (inc, "x"), "z": (add, "x", "y"), "dead": (inc, "y")}
    result = delayed(inc)(Delayed("z", graph))
    msg = compute_message(result)
    intake = assert_matches_reference(msg)
    assert "dead" not in intake.tasks
    assert_runs_like_reference(msg)


# --- 2. the O(N) delayed path ------------------------------------------------------------


def test_delayed_fast_path_never_culls_layer_by_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    msg = compute_message(delayed(add)(*[delayed(inc)(i) for i in range(50)]))

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("HighLevelGraph.cull is O(N^2) over delayed layers")

    monkeypatch.setattr(HighLevelGraph, "cull", forbidden)
    result = intake_update_graph(msg)
    assert len(result.tasks) == 51  # no finalize task for a single Delayed
    monkeypatch.undo()
    assert_matches_reference(msg)


def test_delayed_with_fusion_enabled_uses_dask_optimizer() -> None:
    chain = delayed(inc)(delayed(inc)(delayed(inc)(1)))
    msg = compute_message(chain)
    unfused = assert_matches_reference(msg)
    # The config is read where the graph is materialized, i.e. in the scheduler process.
    with dask.config.set({"optimization.fuse.delayed": True}):
        fused = assert_matches_reference(msg)
    assert len(fused.tasks) < len(unfused.tasks)


def test_array_to_delayed_mixes_blockwise_layers_into_delayed_graph() -> None:
    parts = da.arange(12, chunks=4).to_delayed().tolist()
    msg = compute_message(delayed(add)(*[delayed(sum)(p) for p in parts]))
    assert_matches_reference(msg)
    assert_runs_like_reference(msg)


# --- 3. ordering ---------------------------------------------------------------------------


def test_order_is_dask_order_of_the_culled_graph_when_client_sends_none() -> None:
    msg = compute_message(array_matmul())
    result = intake_update_graph(msg)
    dsk, _, _ = reference_intake(msg)
    assert result.order == dask.order.order(dsk)
    assert sorted(result.order.values()) == list(range(len(dsk)))


def _random_graph(seed: int, n: int) -> dict[Any, GraphNode]:
    """Tasks over random earlier keys, data nodes among them, and inputs from outside the
    graph (futures' keys): the cases dask.order treats apart."""
    rng = np.random.default_rng(seed)
    dsk: dict[Any, GraphNode] = {}
    for i in range(n):
        key = f"k-{i}"
        if i and rng.random() < 0.2:
            dsk[key] = DataNode(key, i)
            continue
        inputs = [f"k-{j}" for j in rng.choice(i, size=min(i, rng.integers(0, 4)), replace=False)]
        if rng.random() < 0.1:
            inputs.append(f"outside-{i}")
        dsk[key] = Task(key, add, *(TaskRef(k) for k in inputs))
    return dsk


@pytest.mark.parametrize("seed", range(20))
def test_the_skeleton_is_ordered_exactly_as_the_graph(seed: int) -> None:
    dsk = _random_graph(seed, 300)
    expected = dask.order.order(dict(dsk))
    skeleton: dict[Any, GraphNode] = {}
    specs = intake_module._build_task_specs(dict(dsk), {}, {}, skeleton)
    assert list(skeleton) == list(dsk) == list(specs)
    assert dask.order.order(skeleton) == expected


def test_order_is_clients_internal_priority_when_given() -> None:
    msg = map_message(inc, range(4))
    msg["internal_priority"] = {k: 10 - i for i, k in enumerate(msg["internal_priority"])}
    assert intake_update_graph(msg).order == msg["internal_priority"]


# --- 4. annotations ------------------------------------------------------------------------


def test_global_annotations_apply_to_every_task_and_callables_see_the_key() -> None:
    annotations = {
        "retries": 2,
        "workers": ["tcp://10.0.0.1:1234"],
        "allow_other_workers": True,
        "resources": {"GPU": 1},
        "priority": lambda key: 7 if "add" in str(key) else 1,
    }
    msg = compute_message(delayed_graph(), annotations=annotations)
    result = assert_matches_reference(msg)
    for key, spec in result.tasks.items():
        assert spec.annotations["retries"] == 2
        assert spec.annotations["priority"] == (7 if "add" in str(key) else 1)


def test_layer_annotations_override_global_ones_and_none_does_not() -> None:
    with dask.annotate(priority=5, note=None, custom=lambda key: f"for-{key}"):
        annotated = delayed(inc)(1, dask_key_name="annotated")
    plain = delayed(inc)(2, dask_key_name="plain")
    msg = compute_message(
        delayed(add)(annotated, plain, dask_key_name="total"),
        annotations={"priority": 3, "note": "global"},
    )
    result = assert_matches_reference(msg)
    assert result.tasks["annotated"].annotations == {
        "priority": 5,
        "note": "global",
        "custom": "for-annotated",
    }
    assert result.tasks["plain"].annotations == {"priority": 3, "note": "global"}


def test_array_layer_annotations_follow_dask_optimizer() -> None:
    with dask.annotate(resources={"GPU": 1}):
        x = da.ones((4, 4), chunks=2) + 1
    # dask's array optimizer merges all layers into one and so drops layer annotations,
    # on the real scheduler too; without it they reach the tasks of the annotated layers.
    optimized = assert_matches_reference(compute_message(x.sum()))
    assert not any(spec.annotations for spec in optimized.tasks.values())
    unoptimized = assert_matches_reference(compute_message(x.sum(), optimize_graph=False))
    gpu_tasks = {
        k for k, spec in unoptimized.tasks.items() if spec.annotations == {"resources": {"GPU": 1}}
    }
    assert gpu_tasks == {k for k in unoptimized.tasks if k[0].startswith(("ones", "add"))}


def test_identical_annotations_share_one_dict() -> None:
    with dask.annotate(priority=5):
        parts = [delayed(inc)(i) for i in range(20)]
    msg = compute_message(delayed(add)(*parts), annotations={"retries": 1})
    result = intake_update_graph(msg)
    annotated = {id(s.annotations) for s in result.tasks.values() if "priority" in s.annotations}
    plain = {id(s.annotations) for s in result.tasks.values() if "priority" not in s.annotations}
    assert len(annotated) == 1
    assert len(plain) == 1


def test_tasks_without_annotations_get_an_empty_dict() -> None:
    result = intake_update_graph(submit_message(inc, 1))
    (spec,) = result.tasks.values()
    assert spec.annotations == {}


# --- 5. run_spec pickling ------------------------------------------------------------------


def test_run_spec_of_interactive_function_unpickles_on_a_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    msg = compute_message(delayed(add)(*[delayed(interactive_inc)(i) for i in range(10)]))
    by_value_pickles: list[Any] = []
    real_dumps = intake_module.cloudpickle.dumps

    def counting_dumps(obj: Any, *args: Any, **kwargs: Any) -> bytes:
        by_value_pickles.append(obj)
        return real_dumps(obj, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(intake_module.cloudpickle, "dumps", counting_dumps)
        result = intake_update_graph(msg)
    # The function travels by value, cloudpickled once for the whole graph.
    assert [getattr(f, "__name__", None) for f in by_value_pickles] == ["interactive_inc"]
    assert_matches_reference(msg)
    shipped = [
        worker_side_run_spec(s) for k, s in result.tasks.items() if "interactive_inc" in str(k)
    ]
    assert len(shipped) == 10
    assert all(node.func(1) == 2 for node in shipped)
    # Its globals came along (OFFSET), and it does not resolve to an import on the worker.
    assert shipped[0].func.__globals__["OFFSET"] == 1


def test_run_spec_pickling_matches_distributed_for_awkward_objects() -> None:
    # A lambda, a class defined in __main__ and an object pickle cannot handle at all.
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("class Point:\n    def __init__(self, x):\n        self.x = x\n", namespace)
    point = namespace["Point"](4)
    nodes = {
        # a lambda (no importable name) taking an instance of a class from __main__
        "lambda": Task("lambda", lambda p, q: p.x + q, point, 1),
        # a code object: the plain pickler cannot handle it, so distributed's path runs
        "code": Task("code", getattr, inc.__code__, "co_name"),
        "module-fn": Task("module-fn", scale, TaskRef("lambda"), factor=3),
    }
    pickler = intake_module._RunSpecPickler()
    for key, node in nodes.items():
        spec = TaskSpec(key, tuple(node.dependencies), pickler(node), {})
        shipped = worker_side_run_spec(spec)
        assert type(shipped) is Task
        inputs = dict.fromkeys(node.dependencies, 5)
        assert shipped(inputs) == node(inputs)


def test_one_pickler_per_graph_gives_each_task_a_self_contained_pickle() -> None:
    # The pickler is reused across a graph's tasks (and replaced after a big one); its memo
    # must not leak between tasks: every run_spec has to equal the one a fresh pickler makes,
    # whatever came before it, including after a failure half-way through a task.
    shared_input = ("shared", 1.5)
    big = Task("big", add, *(TaskRef(f"leaf-{i}") for i in range(3000)))
    nodes = [
        Task("a", scale, shared_input, factor=2),
        big,
        Task("b", scale, shared_input, factor=2),
        Task("unpicklable", id, threading.Lock()),
        Task("c", interactive_inc, TaskRef("a")),
        Task("d", scale, shared_input, factor=2),
    ]
    shared = intake_module._RunSpecPickler()
    for node in nodes:
        if node.key == "unpicklable":
            with pytest.raises(TypeError):
                shared(node)
            continue
        reused = shared(node).pickle_bytes
        assert reused == intake_module._RunSpecPickler()(node).pickle_bytes, node.key
        shipped = worker_side_run_spec(TaskSpec(node.key, (), shared(node), {}))
        inputs = dict.fromkeys(node.dependencies, 5)
        assert shipped(inputs) == node(inputs)


def test_big_run_spec_is_kept_compressed_and_unpickles_on_a_worker() -> None:
    node = Task("big", add, *[f"value-{i}" for i in range(400)])
    small = Task("small", scale, 3, factor=2)
    pickler = intake_module._RunSpecPickler()
    big_spec, small_spec = pickler(node), pickler(small)
    assert isinstance(big_spec, codec.ZlibPickledBytes)
    assert len(big_spec.data) < len(big_spec.pickle_bytes) / 2
    assert type(small_spec) is codec.PickledBytes
    assert worker_side_run_spec(TaskSpec("big", (), big_spec, {})) == node
    assert worker_side_run_spec(TaskSpec("small", (), small_spec, {}))() == 6


def test_small_buffers_go_in_the_pickle_and_big_ones_out_of_band() -> None:
    small, big = np.arange(10), np.arange(100_000)
    pickler = intake_module._RunSpecPickler()
    small_spec = pickler(Task("small", np.sum, small))
    big_spec = pickler(Task("big", np.sum, big))
    assert small_spec.buffers == ()
    assert [memoryview(b).nbytes for b in big_spec.buffers] == [big.nbytes]
    assert worker_side_run_spec(TaskSpec("small", (), small_spec, {}))() == small.sum()
    assert worker_side_run_spec(TaskSpec("big", (), big_spec, {}))() == big.sum()


def test_run_spec_mentioning_main_elsewhere_takes_distributeds_path() -> None:
    # "__main__" outside the embedded function pickle: we cannot tell a by-name reference
    # from data, so distributed's own pickling (cloudpickle) runs, and still works.
    node = Task("k", _INTERACTIVE_DICT_FN, "__main__")
    shipped = worker_side_run_spec(TaskSpec("k", (), intake_module._RunSpecPickler()(node), {}))
    assert shipped() == {"__main__": "__main__"}


def test_unpicklable_run_spec_raises_like_distributed() -> None:
    node = Task("bad", id, threading.Lock())
    with pytest.raises(TypeError):
        protocol.pickle.dumps(node)
    with pytest.raises(TypeError):
        intake_module._RunSpecPickler()(node)


def test_unpicklable_run_spec_is_reported_to_the_user() -> None:
    expr = LLGExpr({"bad": Task("bad", id, _PicklesOnClientOnly())}, _determ_token="x")
    msg = wire_message(expr, ["bad"])
    with pytest.raises(GraphIntakeError) as info:
        intake_update_graph(msg)
    assert isinstance(info.value.exception, TypeError)


class _PicklesOnClientOnly:
    """Pickles fine on the client; the scheduler cannot pickle it again."""

    def __reduce__(self) -> Any:
        return (_make_unpicklable, ())


def _make_unpicklable() -> Any:
    return threading.Lock()


# --- 6. p2p ------------------------------------------------------------------------------


def test_p2p_hash_join_keeps_both_barriers_specs() -> None:
    left, right = dataframe_frames()
    intake = intake_update_graph(compute_message(left.merge(right, on="k", shuffle_method="p2p")))
    assert len(intake.shuffle_specs) == 2
    for key, spec in intake.shuffle_specs.items():
        assert isinstance(spec, ShuffleSpec)
        assert key == barrier_key(spec.id)
        assert key in intake.tasks  # the barrier itself runs on a worker, pickled as usual


def test_p2p_rechunk_keeps_its_barrier_spec() -> None:
    x = da.ones((40, 40), chunks=(40, 1)).rechunk((1, 40), method="p2p")
    intake = intake_update_graph(compute_message(x.sum()))
    assert intake.shuffle_specs
    assert all(isinstance(spec, ShuffleSpec) for spec in intake.shuffle_specs.values())


def test_graphs_without_p2p_keep_no_specs() -> None:
    intake = intake_update_graph(submit_message(inc, 1))
    assert intake.shuffle_specs == {}


# --- 7. errors -----------------------------------------------------------------------------


def test_deserialization_failure_uses_the_real_schedulers_message() -> None:
    msg = submit_message(inc, 1)
    header = dict(msg["expr_ser"].header)
    frames = [b"\x80\x05\x95 this is not the client's environment"]
    msg["expr_ser"] = codec.Serialized(header, frames)
    with pytest.raises(GraphIntakeError) as info:
        intake_update_graph(msg)
    error = info.value.exception
    assert type(error) is RuntimeError
    assert str(error) == (
        "Error during deserialization of the task graph. This frequently\n"
        "occurs if the Scheduler and Client have different environments.\n"
        "For more information, see\n"
        "https://docs.dask.org/en/stable/deployment-considerations.html"
        "#consistent-software-environments\n"
    )
    assert error.__cause__ is not None


def test_materialization_failure_carries_the_original_exception() -> None:
    msg = compute_message(delayed(inc)(1), annotations={"priority": _raise_boom})
    with pytest.raises(GraphIntakeError) as info:
        intake_update_graph(msg)
    assert isinstance(info.value.exception, ZeroDivisionError)


def _raise_boom(key: Any) -> int:
    return 1 // 0


def test_cyclic_graph_is_reported() -> None:
    msg = wire_message(LLGExpr({"a": (inc, "b"), "b": (inc, "a")}), ["a"])
    with pytest.raises(GraphIntakeError):
        intake_update_graph(msg)


# --- benchmark ---------------------------------------------------------------------------


def benchmark(n: int) -> dict[str, float]:
    """Seconds per step for ``delayed(merge)(*[delayed(f)(x) for x in range(n)])``."""
    graph = delayed(merge)(*[delayed(_INTERACTIVE_DICT_FN)(x) for x in range(n)])
    msg = compute_message(graph)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    intake_update_graph(msg)
    timings["intake total"] = time.perf_counter() - start

    expr_ser = msg["expr_ser"]
    start = time.perf_counter()
    expr = protocol.deserialize(expr_ser.header, expr_ser.frames)
    timings["deserialize"] = time.perf_counter() - start
    start = time.perf_counter()
    dsk, _ = intake_module._materialize(expr, set(msg["keys"]))
    timings["materialize+cull"] = time.perf_counter() - start
    start = time.perf_counter()
    dask.order.order(dsk)
    timings["dask.order"] = time.perf_counter() - start
    nodes = list(dsk.values())
    start = time.perf_counter()
    pickler = intake_module._RunSpecPickler()
    for node in nodes:
        pickler(node)
    timings["pickle run_specs (ours), us/task"] = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    for node in nodes:
        protocol.pickle.dumps(node, protocol=5, buffer_callback=lambda b: None)
    timings["pickle run_specs (distributed), us/task"] = (time.perf_counter() - start) / n * 1e6
    return timings


if __name__ == "__main__":
    for size in map(int, sys.argv[1:] or ["10000", "100000"]):
        for step, value in benchmark(size).items():
            print(f"N={size:>7} {step:<40} {value:.3f}")
