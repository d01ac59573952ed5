"""The simulator: any policy, unchanged, against a discrete-event model of a cluster.

Theory of operation
-------------------
* ``graphs``: what is simulated, a ``SimGraph`` (per task its dependencies, duration and
  output size; the wanted keys; priorities), built with ``GraphBuilder``: synthetic shapes
  and graphs of dask collections.
* ``engine``: ``simulate(graph, policy, ClusterSpec)`` runs the real scheduler core and the
  policy against modelled workers and returns a ``SimResult``.
* ``report``: tables and Gantt charts of results.
* ``cli``: ``dsched simulate``, which reads graphs and traces and prints the table.

Everything but ``cli`` is a pure layer (``tests/unit/test_layers.py``): no I/O, no clock, no
event loop, and no imports of the layers above it. Inputs read from files are turned into a
``SimGraph`` above it: a recorded trace by ``dsched.tools.trace.replay``.
"""
