"""``distributed.performance_report`` writes a report of what ran inside the block."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from distributed import Client, performance_report

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_performance_report_holds_the_tasks_that_ran(client: Client, tmp_path: Path) -> None:
    prefix = "reported_sum"  # a task prefix (key_split drops hash-like parts of a key)
    report = tmp_path / "report.html"
    with performance_report(filename=str(report)):
        futures = [client.submit(sum, [i, 1], key=f"{prefix}-{uuid.uuid4()}-{i}") for i in range(8)]
        assert client.gather(futures) == [i + 1 for i in range(8)]
    text = report.read_text()
    assert "Dask Performance Report" in text
    assert prefix in text  # the task prefix is listed (dsched) / in the plots' data (Dask)
