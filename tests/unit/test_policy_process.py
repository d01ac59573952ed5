"""``--policy-process``: the same policy, the same messages, in another process."""

from __future__ import annotations

import pickle

import pytest

from dsched.policy import PolicyConfig, make_policy
from dsched.policy import protocol as p
from dsched.server.policy_process import PolicyProcess, dumps, loads
from dsched.sim import graphs
from dsched.sim.engine import ClusterSpec, simulate

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("name", ["dask", "workstealing"])
def test_a_simulated_run_is_identical_in_process_and_out_of_process(name):
    graph = graphs.tree(7)
    cluster = ClusterSpec(n_workers=3, join_times=(0.0, 0.0, 0.02))
    local = simulate(graph, make_policy(name, PolicyConfig()), cluster, validate=True)
    remote_policy = PolicyProcess(name, PolicyConfig())
    try:
        remote = simulate(graph, remote_policy, cluster, validate=True)
    finally:
        remote_policy.close()
    assert remote.makespan == local.makespan
    assert remote.placement == local.placement
    assert remote.steals_requested == local.steals_requested


def test_records_round_trip_and_nothing_else_is_unpickled():
    records = [
        p.TaskReady(1, (0, 1, 2), (p.TaskInput(8, (0, 1)),), frozenset({1}), True, (("GPU", 1.0),)),
        p.TaskAdded(2, (0.0, 1, 3), (1,), "inc"),
        p.StealResult(1, 0, 1, True),
        p.Steal(1, 0),
    ]
    assert loads(dumps((records, 1.5))) == (records, 1.5)
    with pytest.raises(pickle.UnpicklingError):
        loads(pickle.dumps(ValueError("not a record")))


def test_closing_stops_the_child():
    policy = PolicyProcess("random")
    assert policy.handle([p.WorkerAdded(0, 1), p.TaskReady(5, (0, 0, 0))], 0.0) == [
        p.Assignment(5, 0)
    ]
    policy.close()
    assert not policy._process.is_alive()
