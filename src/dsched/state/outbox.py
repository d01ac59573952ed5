"""What one step of the state machine asks the outside world to do.

The state machine never sends anything. It appends to an ``Outbox``: messages per worker
address and per client id (in the order they must arrive), policy events, workers to close,
and log records. The reactor merges the outboxes of one event-loop tick and writes each
peer's messages as a single batch. Tests assert on the outbox directly: it is the recording
double of the network.

``transitions`` holds every task move ``(key, start, finish, stimulus_id)`` of the outbox's
events, in order, when the state machine's ``observe_transitions`` is set (for scheduler
extensions); it stays empty otherwise.
"""

from __future__ import annotations

from typing import Any

from dsched.policy.protocol import PolicyEvent

Message = dict[str, Any]
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
        self.to_workers: dict[str, list[Message]] = {}
        self.to_clients: dict[str, list[Message]] = {}
        self.policy: list[PolicyEvent] = []
        self.close_workers: list[str] = []
        self.logs: list[tuple[str, str]] = []  # (level, text)
        # (key, start, finish, stimulus_id) per task move, with observe_transitions only.
        self.transitions: list[Transition] = []
        # The answer to a request-like event (e.g. the keys ``retry`` resets), if any.
        self.reply: Any = None

    def send_worker(self, address: str, msg: Message) -> None:
        queue = self.to_workers.get(address)
        if queue is None:
            self.to_workers[address] = [msg]
        else:
            queue.append(msg)

    def free_keys(self, address: str, key: Any, stimulus_id: str) -> None:
        """Tell a worker to forget a key; consecutive frees coalesce into one message."""
        queue = self.to_workers.get(address)
        if queue and queue[-1]["op"] == "free-keys":
            queue[-1]["keys"].append(key)
        else:
            self.send_worker(
                address, {"op": "free-keys", "keys": [key], "stimulus_id": stimulus_id}
            )

    def send_client(self, client: str, msg: Message) -> None:
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
        for client, msgs in other.to_clients.items():
            queue = self.to_clients.get(client)
            if queue is None:
                self.to_clients[client] = msgs
            else:
                queue.extend(msgs)
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

    def messages(self, op: str) -> list[tuple[str, Message]]:
        """All (peer, message) pairs with this op, workers first: handy in tests and logs."""
        found = [(a, m) for a, ms in self.to_workers.items() for m in ms if m["op"] == op]
        found += [(c, m) for c, ms in self.to_clients.items() for m in ms if m["op"] == op]
        return found
