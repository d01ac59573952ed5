"""The pure core: state machine + policy + extensions behind one ``handle`` and one
``flush``; the shell (``dsched.server``), the simulator and the tests all drive it."""

from dsched.core.core import MAX_FLUSH_ROUNDS, Core, Flush
from dsched.core.errors import BadMessage, FlushLoopError, InternalError

__all__ = ["MAX_FLUSH_ROUNDS", "BadMessage", "Core", "Flush", "FlushLoopError", "InternalError"]
