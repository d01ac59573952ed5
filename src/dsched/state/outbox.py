"""What one step of the state machine asks the outside world to do.

The state machine never sends anything. It appends to an ``Outbox``: messages per worker
address and per client id (in the order they must arrive), policy events, workers to close,
and log records. The reactor merges the outboxes of one event-loop tick and writes each
peer's messages as a single batch. Tests assert on the outbox directly: it is the recording
double of the network.

``transitions`` holds every task move ``(key, start, finish, stimulus_id)`` of the outbox's
events, in order, when the state machine's ``observe_transitions`` is set (for scheduler
extensions); it stays empty otherwise.

Messages are typed records (``dsched.state.messages``): ``to_workers`` / ``to_clients`` hold
``WorkerMessage`` / ``ClientMessage`` unions, which consumers narrow by testing ``op``.
Extensions' own messages come in through ``send_worker_raw`` / ``send_client_raw``: opaque
ops that every consumer ignores unless it knows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from dsched.policy.protocol import PolicyEvent
from dsched.state.messages import ClientMessage, FreeKeys, WorkerMessage

Message = dict[str, Any]  # an untyped message (extensions' own ops)
Transition = tuple[Any, str, str, str]  # (key, start, finish, stimulus_id)


class Outbox:
    __slots__ = (
        "close_workers",
        "logs",
        "policy",
        "reply",
        "to_clients",
        "to_workers",
        "transitions",
    )

    def __init__(self) -> None:
        self.to_workers: dict[str, list[WorkerMessage]] = {}
        self.to_clients: dict[str, list[ClientMessage]] = {}
        self.policy: list[PolicyEvent] = []
        self.close_workers: list[str] = []
        self.logs: list[tuple[str, str]] = []  # (level, text)
        # (key, start, finish, stimulus_id) per task move, with observe_transitions only.
        self.transitions: list[Transition] = []
        # The answer to a request-like event (e.g. the keys ``retry`` resets), if any.
        self.reply: Any = None

    def send_worker(self, address: str, msg: WorkerMessage) -> None:
        queue = self.to_workers.get(address)
        if queue is None:
            self.to_workers[address] = [msg]
        else:
            queue.append(msg)

    def free_keys(self, address: str, key: Any, stimulus_id: str) -> None:
        """Tell a worker to forget a key; consecutive frees coalesce into one message."""
        queue = self.to_workers.get(address)
        if queue:
            last = queue[-1]
            if last["op"] == "free-keys":
                last["keys"].append(key)
                return
        msg: FreeKeys = {"op": "free-keys", "keys": [key], "stimulus_id": stimulus_id}
        self.send_worker(address, msg)

    def send_worker_raw(self, address: str, msg: Mapping[str, Any]) -> None:
        """An extension's message: an op outside ``WorkerMessage``, passed on as it is."""
        self.send_worker(address, cast(WorkerMessage, msg))

    def send_client_raw(self, client: str, msg: Mapping[str, Any]) -> None:
        """An extension's message: an op outside ``ClientMessage``, passed on as it is."""
        self.send_client(client, cast(ClientMessage, msg))

    def send_client(self, client: str, msg: ClientMessage) -> None:
        queue = self.to_clients.get(client)
        if queue is None:
            self.to_clients[client] = [msg]
        else:
            queue.append(msg)

    def log(self, level: str, text: str) -> None:
        self.logs.append((level, text))

    def merge(self, other: Outbox) -> None:
        """Append ``other``'s contents after ours, keeping per-peer order."""
        for address, msgs in other.to_workers.items():
            queue = self.to_workers.get(address)
            if queue is None:
                self.to_workers[address] = msgs
            else:
                queue.extend(msgs)
        for client, client_msgs in other.to_clients.items():
            client_queue = self.to_clients.get(client)
            if client_queue is None:
                self.to_clients[client] = client_msgs
            else:
                client_queue.extend(client_msgs)
        self.policy.extend(other.policy)
        self.close_workers.extend(other.close_workers)
        self.logs.extend(other.logs)
        self.transitions.extend(other.transitions)
        if other.reply is not None:
            self.reply = other.reply

    def __bool__(self) -> bool:
        return bool(
            self.to_workers
            or self.to_clients
            or self.policy
            or self.close_workers
            or self.logs
            or self.transitions
        )

    def messages(self, op: str) -> list[tuple[str, Any]]:
        """All (peer, message) pairs with this op, workers first: handy in tests and logs."""
        found: list[tuple[str, Any]] = [
            (a, m) for a, ms in self.to_workers.items() for m in ms if m["op"] == op
        ]
        found += [(c, m) for c, ms in self.to_clients.items() for m in ms if m["op"] == op]
        return found
