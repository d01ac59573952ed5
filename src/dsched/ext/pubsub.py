"""Topic pub/sub: ``log_event``, ``get_events`` and clients' topic subscriptions.

Theory of operation
-------------------
Dask's ``Broker`` (distributed/broker.py) as an extension. Every topic keeps its last
``maxlen`` events (``distributed.admin.low-level-log-length``) as ``(time, msg)`` pairs; a
published event also goes to every client subscribed to the topic as an ``event`` message on
its stream, batched with the rest of the tick like every other message. Events come from
RPCs (``log_event``, ``Client.log_event``), from workers' ``log-event`` stream messages and
from the scheduler itself (restart); a client that leaves is unsubscribed from everything.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from dsched.ext.protocol import Effect, Effects, Extension, Reply, Request, ToClient
from dsched.state import events as ev
from dsched.wire.errors import RemoteProtocolError


class _Topic:
    __slots__ = ("count", "events", "subscribers")

    def __init__(self, maxlen: int) -> None:
        self.events: deque[tuple[float, Any]] = deque(maxlen=maxlen)
        self.count = 0
        self.subscribers: set[str] = set()


class PubSub(Extension):
    name = "pubsub"
    rpc_ops: ClassVar = {"log_event": "rpc_log_event", "events": "rpc_get_events"}
    stream_ops: ClassVar = {
        "log-event": "stream_log_event",
        "subscribe-topic": "stream_subscribe",
        "unsubscribe-topic": "stream_unsubscribe",
    }
    observes = frozenset({ev.ClientDisconnected})

    def __init__(self, maxlen: int = 1000) -> None:
        self.maxlen = maxlen
        self.topics: dict[str, _Topic] = {}
        # Called with (topic, msg) for every published event (the shell's scheduler-plugin
        # log_event hooks); empty unless a plugin has that hook.
        self.listeners: list[Callable[[str, Any], None]] = []

    def _topic(self, name: str) -> _Topic:
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = _Topic(self.maxlen)
        return topic

    # ------------------------------------------------------------------ publishing
    def publish(self, topics: str | Iterable[str], msg: Any, now: float) -> list[Effect]:
        """Record ``msg`` under each topic and send it to the topic's subscribers."""
        event = (now, msg)
        effects: list[Effect] = []
        for name in [topics] if isinstance(topics, str) else topics:
            topic = self._topic(str(name))
            topic.events.append(event)
            topic.count += 1
            message = {"op": "event", "topic": name, "event": event}
            effects.extend(ToClient(client, message) for client in topic.subscribers)
            for listener in self.listeners:
                listener(name, msg)
        return effects

    def rpc_log_event(self, request: Request, now: float) -> Effects:
        args = request.args
        effects = self.publish(_topics(args["topic"]), args.get("msg"), now)
        effects.append(Reply(request.id, None))
        return effects

    def rpc_get_events(self, request: Request, now: float) -> Effects:
        name = request.args.get("topic")
        if name is not None:
            return [Reply(request.id, tuple(self._topic(str(name)).events))]
        everything = {n: tuple(t.events) for n, t in self.topics.items() if t.events}
        return [Reply(request.id, everything)]

    def stream_log_event(self, peer: str, msg: dict[str, Any], now: float) -> Effects:
        return self.publish(_topics(_topic_field(msg)), msg.get("msg"), now)

    # ------------------------------------------------------------------ subscriptions
    def stream_subscribe(self, peer: str, msg: dict[str, Any], now: float) -> Effects:
        self._topic(str(_topic_field(msg))).subscribers.add(peer)
        return ()

    def stream_unsubscribe(self, peer: str, msg: dict[str, Any], now: float) -> Effects:
        topic = self.topics.get(str(_topic_field(msg)))
        if topic is not None:
            topic.subscribers.discard(peer)
        return ()

    def on_event(self, event: ev.Event, now: float) -> Effects:
        if isinstance(event, ev.ClientDisconnected):
            for topic in self.topics.values():
                topic.subscribers.discard(event.client)
        return ()


def _topics(value: Any) -> str | list[str]:
    """A topic name or a list of them, as ``log_event`` takes them."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(t, str) for t in value):
        return list(value)
    raise RemoteProtocolError(f"topic must be a string or a list of strings, got {value!r:.200}")


def _topic_field(msg: dict[str, Any]) -> Any:
    """A stream message's ``topic`` (Dask's handlers take it as a required argument)."""
    if "topic" not in msg:
        raise RemoteProtocolError(f"{msg.get('op')!r} without a 'topic' field")
    return msg["topic"]
