"""Tools around the scheduler that are not the scheduler.

Theory of operation
-------------------
Each tool is a ``dsched`` subcommand (its module has ``add_parser(subparsers, name)``, see
``dsched.cli.SUBCOMMANDS``) and runs in a process of its own, next to a scheduler rather
than inside it:

* ``trace``: ``dsched trace report`` reads what ``dsched scheduler --trace`` recorded. Its
  ``record`` module is the one piece that runs inside the scheduler, called by the reactor
  only when tracing is on.
* ``zero_worker``: ``dsched zero-worker``, simulated workers that complete every task at
  once, to measure the scheduler's own per-task cost (used by ``dsched bench``).
* ``soak``: ``dsched soak``, rounds of workloads on a local cluster while workers and
  clients are killed, checking results and that the cluster comes back clean.

Tools sit on the top layer (``tests/unit/test_layers.py``): they may import any part of the
scheduler, and the scheduler's own layers must not import them; the reactor is handed its
``TraceRecorder`` by the command line (``dsched.cli``).
"""
