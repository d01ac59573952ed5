"""Exceptions the scheduler itself reports, in the forms Dask peers understand.

Dask clients accept an exception as pickled bytes (``distributed.core.clean_exception``
unpickles them), which is how the real scheduler sends the errors it makes (KilledWorker,
graph deserialization failures). RPC failures use ``distributed.core.error_message``'s
dict shape, so ``send_recv`` on the caller re-raises them.
"""

from __future__ import annotations

import pickle
import traceback as tb_module
from types import SimpleNamespace
from typing import Any

from distributed.scheduler import KilledWorker

# Pickle protocol 4: what the real scheduler uses for the exceptions it makes.
SCHEDULER_EXCEPTION_PROTOCOL = 4


def pickled_exception(exc: BaseException) -> bytes:
    try:
        return pickle.dumps(exc, protocol=SCHEDULER_EXCEPTION_PROTOCOL)
    except Exception:
        # An exception holding something unpicklable still reaches the user as its text.
        return pickle.dumps(
            RuntimeError(f"{type(exc).__name__}: {exc}"), protocol=SCHEDULER_EXCEPTION_PROTOCOL
        )


def killed_worker(key: Any, address: str, allowed_failures: int) -> bytes:
    # KilledWorker's message reads ``last_worker.address`` (Dask passes a WorkerState); a
    # namespace with that attribute unpickles anywhere, without distributed's scheduler.
    last_worker = SimpleNamespace(address=address)
    return pickled_exception(
        KilledWorker(
            task=key,
            last_worker=last_worker,  # type: ignore[arg-type]  # duck-typed: only .address is read
            allowed_failures=allowed_failures,
        )
    )


def error_reply(exc: BaseException) -> dict[str, Any]:
    """The reply to an RPC whose handler failed; the caller raises ``exc`` again."""
    return {
        "status": "uncaught-error",
        "exception": pickled_exception(exc),
        "traceback": None,
        "exception_text": repr(exc),
        "traceback_text": "".join(tb_module.format_exception(exc)),
    }
