"""The issue-14 workloads (``dsched.bench.realdata``): names parse, every shape computes the
right value at a tiny size, and a couple run through ``run_one`` against dsched."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from distributed import Client, LocalCluster

from dsched.bench.realdata import ARRAY_OPS, REAL_DATA_SET, TS_OPS
from dsched.bench.runner import Setup, run_one
from dsched.bench.workloads import get_workload

pytestmark = pytest.mark.timeout(240)

TINY = [
    *(f"array-400-100-{op}" for op in ARRAY_OPS),
    *(f"ts-1-6h-{op}" for op in TS_OPS),
    "mapmap-200",
    "listmerge-200",
]


def test_names_parse() -> None:
    for name in REAL_DATA_SET:
        assert get_workload(name).name == name
    assert get_workload("array-4000-500-matmul").params == (4000, 500, "matmul")
    assert get_workload("ts-2-1h-aggsplit").params == (2, "1h", "aggsplit")
    assert get_workload("mapmap-10k").params == (10_000,)
    with pytest.raises(ValueError, match="not one of"):
        get_workload("array-400-100-cumsum")
    with pytest.raises(ValueError, match="not one of"):
        get_workload("ts-1-1h-pivot")


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with (
        LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster, set_as_default=False) as client,  # type: ignore[no-untyped-call]
    ):
        yield client


@pytest.mark.parametrize("name", TINY)
def test_every_shape_computes_its_reference(client: Client, name: str) -> None:
    prepared = get_workload(name).prepare(client)
    assert prepared.n_tasks > 0
    prepared.check(prepared.run())


@pytest.mark.parametrize("name", ["array-400-100-persist", "mapmap-300"])
def test_runs_against_dsched(name: str) -> None:
    record = run_one(get_workload(name), "dsched", Setup("real", 2), 1, timeout=60)
    assert record.status == "ok", record.error
    assert record.makespan_s is not None and record.makespan_s > 0
