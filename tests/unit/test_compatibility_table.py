"""docs/compatibility.md tells the truth about which of Dask's handlers dsched serves.

The table has one row per handler of ``../shared/dask_handler_signatures.txt`` (Dask
2026.8.0's scheduler RPC and stream handlers), plus any other op a ``distributed.Client``
sends, each saying "yes", "differs: how" or "no: why". This test fails when

(a) a handler of the signatures file (or of a stock ``distributed.Scheduler`` built here,
    for checkouts without ``../shared``) has no row;
(b) a row says "yes" or "differs" for an op the registry of a ``Scheduler`` built here does
    not serve (RPC rows: ``Scheduler.rpc_ops``; stream rows: the client and worker stream
    tables);
(c) an op that some ``distributed.Client`` method sends to the scheduler is missing or
    marked "no", unless it is in ``KNOWN_MISSING`` (with the reason), which must shrink as
    the work lands: an op of KNOWN_MISSING that is served now fails the test too;
(d) a row says "no" for an op that is served now (the table went stale).

The Client's ops come from the source of ``distributed/client.py``, parsed with ``ast``:
every ``self.scheduler.<op>`` attribute (called or passed as a callable, less the rpc
object's own attributes) and every ``{"op": "<op>"}`` / ``dict(op="<op>")`` message, less
the messages a ``self.scheduler.broadcast(msg=...)`` relays to the workers.
"""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

import distributed.client
import pytest
from distributed.core import PooledRPCCall

from dsched.policy import DEFAULT_POLICY, make_policy
from dsched.server.scheduler import Scheduler

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "docs" / "compatibility.md"
SIGNATURES = ROOT.parent / "shared" / "dask_handler_signatures.txt"

# Ops that the stream loop itself handles (not in the stream tables).
STREAM_LOOP_OPS = frozenset({"close-stream"})

# Client ops not served yet: op -> why (remove an entry when its op lands).
# Empty when every op a Client sends is served; e.g.
#     "rebalance": "being built (replicate/AMM work); Client.rebalance",
KNOWN_MISSING: dict[str, str] = {}

_ROW = re.compile(
    r"^\|\s*`(?P<op>[^`]+)`\s*\|\s*(?P<kind>rpc|stream)\s*\|[^|]*\|\s*(?P<status>[^|]*)\|"
)


def table_rows() -> dict[tuple[str, str], str]:
    """(op, kind) -> the status cell of docs/compatibility.md."""
    rows: dict[tuple[str, str], str] = {}
    for line in TABLE.read_text().splitlines():
        match = _ROW.match(line)
        if match:
            key = (match["op"], match["kind"])
            assert key not in rows, f"{key} has two rows"
            rows[key] = match["status"].strip()
    return rows


def status_word(cell: str) -> str:
    word = re.match(r"(yes|differs|no)\b", cell)
    assert word, f"a status must start with yes, differs: or no:, got {cell!r}"
    if word[1] != "yes":
        assert re.match(r"(differs|no): \S", cell), f"say how or why: {cell!r}"
    return word[1]


def signature_handlers() -> set[tuple[str, str]]:
    """(op, kind) of every handler of the signatures file (when this checkout has it)."""
    handlers: set[tuple[str, str]] = set()
    if not SIGNATURES.exists():
        return handlers
    kind = ""
    for line in SIGNATURES.read_text().splitlines():
        if line.startswith("RPC"):
            kind = "rpc"
        elif line.startswith("STREAM"):
            kind = "stream"
        elif kind and (match := re.match(r"\s+(\S+)\s+\S+\s+\(", line)):
            handlers.add((match[1], kind))
    return handlers


def dask_handlers() -> set[tuple[str, str]]:
    """(op, kind) of every handler of a stock ``distributed.Scheduler`` (built, closed)."""
    from distributed import Scheduler as DaskScheduler

    async def build() -> set[tuple[str, str]]:
        scheduler = DaskScheduler(dashboard=False, port=0)
        try:
            return {(op, "rpc") for op in scheduler.handlers} | {
                (op, "stream") for op in scheduler.stream_handlers
            }
        finally:
            await scheduler.close()

    return asyncio.run(build())


def served_ops() -> dict[str, set[str]]:
    """What a Scheduler's registry serves (built inside a loop, never started)."""

    async def build() -> dict[str, set[str]]:
        scheduler = Scheduler(make_policy(DEFAULT_POLICY), port=0)
        ops = scheduler.streams.ops
        return {
            "rpc": set(scheduler.rpc_ops),
            "stream": set(ops.client) | set(ops.worker) | STREAM_LOOP_OPS,
        }

    return asyncio.run(build())


def _is_self_scheduler(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "scheduler"
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def client_ops(source: str) -> set[str]:
    """Every op ``distributed/client.py`` sends to the scheduler (RPC or stream)."""
    tree = ast.parse(source)
    rpc_attributes = {a for a in dir(PooledRPCCall) if not a.startswith("_")}
    relayed: set[int] = set()  # message nodes a broadcast relays to the workers
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "broadcast"
            and _is_self_scheduler(node.func.value)
        ):
            for keyword in node.keywords:
                if keyword.arg == "msg":
                    relayed.update(id(n) for n in ast.walk(keyword.value))
    ops: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _is_self_scheduler(node.value)
            and node.attr not in rpc_attributes
        ):
            ops.add(node.attr)
        if id(node) in relayed:
            continue
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if (
                    isinstance(key, ast.Constant)
                    and key.value == "op"
                    and isinstance(value, ast.Constant)
                    and isinstance(value.value, str)
                ):
                    ops.add(value.value)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "dict"
        ):
            for keyword in node.keywords:
                if keyword.arg == "op" and isinstance(keyword.value, ast.Constant):
                    ops.add(str(keyword.value.value))
    return ops


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, str], str]:
    return table_rows()


@pytest.fixture(scope="module")
def served() -> dict[str, set[str]]:
    return served_ops()


@pytest.fixture(scope="module")
def from_client() -> set[str]:
    path = distributed.client.__file__
    assert path is not None
    return client_ops(Path(path).read_text())


def test_every_dask_handler_has_a_row(rows: dict[tuple[str, str], str]) -> None:
    missing = sorted((signature_handlers() | dask_handlers()) - set(rows))
    assert not missing, f"docs/compatibility.md has no row for {missing}"


def test_every_status_is_well_formed(rows: dict[tuple[str, str], str]) -> None:
    for cell in rows.values():
        status_word(cell)


def test_served_claims_are_true(
    rows: dict[tuple[str, str], str], served: dict[str, set[str]]
) -> None:
    wrong = sorted(
        (op, kind)
        for (op, kind), cell in rows.items()
        if status_word(cell) != "no" and op not in served[kind]
    )
    assert not wrong, f"marked yes/differs but not served: {wrong}"


def test_no_claims_are_true(rows: dict[tuple[str, str], str], served: dict[str, set[str]]) -> None:
    stale = sorted(
        (op, kind)
        for (op, kind), cell in rows.items()
        if status_word(cell) == "no" and op in served[kind]
    )
    assert not stale, f"served now: mark these rows yes or differs: {stale}"


def test_every_client_op_is_served(
    rows: dict[tuple[str, str], str], served: dict[str, set[str]], from_client: set[str]
) -> None:
    # An op may have an rpc and a stream row; it is fine if any of them says it is served.
    fine = {op for (op, _), cell in rows.items() if status_word(cell) != "no"}
    bad = sorted(op for op in from_client if op not in fine and op not in KNOWN_MISSING)
    assert not bad, f"Client ops missing from the table or marked no: {bad}"
    landed = sorted(op for op in KNOWN_MISSING if op in served["rpc"] | served["stream"])
    assert not landed, f"served now: remove from KNOWN_MISSING and mark the rows: {landed}"
    unused = sorted(op for op in KNOWN_MISSING if op not in from_client)
    assert not unused, f"KNOWN_MISSING lists ops no Client method sends: {unused}"


def test_the_client_scan_finds_known_ops(from_client: set[str]) -> None:
    # Called, passed as a callable, and stream messages; relayed worker ops excluded.
    assert {"identity", "gather", "publish_list", "update-graph", "close-stream"} <= from_client
    assert "run" not in from_client  # Client.run's message goes to the workers
    assert "address" not in from_client
