"""The extensions every scheduler runs, in registration order.

Theory of operation
-------------------
``default_extensions(config)`` builds one instance of each built-in extension from the Dask
configuration (read by the shell and passed in as plain values, so extensions stay pure).
Adding an extension to the scheduler is adding it here: the core then routes its RPC and
stream ops and fans out the observations it declared.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dsched.ext.actors import ActorProxy
from dsched.ext.events import Events
from dsched.ext.lifecycle import Lifecycle
from dsched.ext.memory import MemoryManager
from dsched.ext.metadata import Metadata
from dsched.ext.multi_lock import MultiLocks
from dsched.ext.p2p import P2PShuffles
from dsched.ext.protocol import Extension
from dsched.ext.publish import Publish
from dsched.ext.pubsub import PubSub
from dsched.ext.queries import ClusterQueries
from dsched.ext.queues import Queues
from dsched.ext.replay import Replay
from dsched.ext.resources import Resources
from dsched.ext.semaphore import Semaphores
from dsched.ext.task_stream import TaskStream
from dsched.ext.variables import Variables
from dsched.ext.worker_status import WorkerStatusFeed

# Configuration values the built-in extensions read (Dask keys, with Dask's defaults).
CONFIG_DEFAULTS: dict[str, Any] = {
    "distributed.admin.low-level-log-length": 1000,
    "distributed.comm.timeouts.connect": "30s",
    "distributed.scheduler.locks.lease-validation-interval": "10s",
    "distributed.scheduler.dashboard.status.task-stream-length": 1000,
    "distributed.scheduler.dashboard.tasks.task-stream-length": 100000,
    "distributed.scheduler.active-memory-manager.start": True,
    "distributed.scheduler.active-memory-manager.interval": "2s",
    "distributed.worker.memory.rebalance.sender-min": 0.3,
    "distributed.worker.memory.rebalance.recipient-max": 0.6,
    "distributed.worker.memory.rebalance.sender-recipient-gap": 0.1,
}


# One factory per extension; each takes the configuration values of CONFIG_DEFAULTS' keys.
FACTORIES: list[Callable[[Mapping[str, Any]], Extension]] = [
    Variables.from_config,
    Queues.from_config,
    Publish.from_config,
    Events.from_config,
    Semaphores.from_config,
    MultiLocks.from_config,
    TaskStream.from_config,
    lambda values: Metadata(),
    lambda values: Replay(),
    lambda values: Resources(),
    lambda values: WorkerStatusFeed(),
]


def default_extensions(config: Mapping[str, Any] | None = None) -> list[Extension]:
    """The core's own extensions (pub/sub, queries, lifecycle), then FACTORIES'."""
    from dask.utils import parse_timedelta

    values = {**CONFIG_DEFAULTS, **(config or {})}
    pubsub = PubSub(maxlen=int(values["distributed.admin.low-level-log-length"]))
    connect_timeout = float(parse_timedelta(values["distributed.comm.timeouts.connect"]))
    p2p = P2PShuffles(pubsub)
    return [
        pubsub,
        ClusterQueries(),
        Lifecycle(pubsub, connect_timeout, busy_workers=p2p.participating_workers),
        MemoryManager.from_config(values, pubsub),
        ActorProxy(),
        p2p,
        *(factory(values) for factory in FACTORIES),
    ]
