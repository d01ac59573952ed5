"""The bench's workloads set Dask's configuration process-wide (task-based shuffles for every
scheduler, ``dsched.bench.workloads.configure_dask``), as the ``dsched bench`` process wants;
tests that prepare workloads in the test process must not leave that to the tests after them
(which use Dask's defaults, P2P included)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import dask
import pytest


@pytest.fixture(autouse=True)
def restore_dask_config() -> Iterator[None]:
    saved = copy.deepcopy(dask.config.config)
    yield
    dask.config.config.clear()
    dask.config.config.update(saved)
