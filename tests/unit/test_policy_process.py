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


@pytest.mark.parametrize("name", ["dask", "workstealing", "blevel"])
def test_a_simulated_run_is_identical_in_process_and_out_of_process(name):
    # blevel wants every optional event: replica events and bandwidth cross over too.
    graph = graphs.tree(7, nbytes=2_000_000)
    cluster = ClusterSpec(
        n_workers=3, join_times=(0.0, 0.0, 0.02), bandwidth=20e6, assumed_bandwidth=100e6
    )
    local = simulate(graph, make_policy(name, PolicyConfig()), cluster, validate=True)
    remote_policy = PolicyProcess(name, PolicyConfig())
    try:
        remote = simulate(graph, remote_policy, cluster, validate=True)
    finally:
        remote_policy.close()
    assert remote.makespan == local.makespan
    assert remote.placement == local.placement
    assert remote.steals_requested == local.steals_requested
    assert remote.bandwidth_estimate == local.bandwidth_estimate < 100e6


def test_records_round_trip_and_nothing_else_is_unpickled():
    records = [
        p.TaskReady(1, (0, 1, 2), (p.TaskInput(8, (0, 1)),), frozenset({1}), True, (("GPU", 1.0),)),
        p.TaskAdded(2, (0.0, 1, 3), (1,), "inc"),
        p.StealResult(1, 0, 1, True),
        p.Steal(1, 0),
        p.ReplicaAdded(1, 2, 300),
        p.ReplicaRemoved(1, 2),
        p.BandwidthMeasured(1.5e8),
        p.Unplaceable(4, "no worker offers resources {'GPU': 1}"),
        p.NoWorker(5),
    ]
    assert loads(dumps((records, 1.5))) == (records, 1.5)
    assert loads(dumps(p.OPTIONAL_EVENTS)) == p.OPTIONAL_EVENTS
    with pytest.raises(pickle.UnpicklingError):
        loads(pickle.dumps(ValueError("not a record")))
    # Only the record classes of the protocol module, not whatever else it defines.
    with pytest.raises(pickle.UnpicklingError, match="wanted_events"):
        loads(pickle.dumps(p.wanted_events))


def test_closing_stops_the_child():
    policy = PolicyProcess("random")
    assert policy.handle([p.WorkerAdded(0, 1), p.TaskReady(5, (0, 0, 0))], 0.0) == [
        p.Assignment(5, 0)
    ]
    policy.close()
    assert not policy._process.is_alive()


def test_the_child_says_which_optional_events_it_wants_and_answers_unplaceable():
    policy = PolicyProcess("blevel")
    try:
        assert policy.wants == p.OPTIONAL_EVENTS == p.wanted_events(policy)
        gpu = p.TaskReady(5, (0, 0, 0), resources=(("GPU", 1.0),))
        assert policy.handle([p.WorkerAdded(0, 1), gpu], 0.0) == [
            p.Unplaceable(5, "no worker offers resources {'GPU': 1.0}")
        ]
    finally:
        policy.close()
