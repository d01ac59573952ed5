"""``update-graph`` intake: materialize a client's dask expression into tasks (see intake)."""

from dsched.graph.intake import GraphIntake, GraphIntakeError, TaskSpec, intake_update_graph

__all__ = ["GraphIntake", "GraphIntakeError", "TaskSpec", "intake_update_graph"]
