"""Fan-out: one bounded queue and worker per sink, so no sink can stall the engine."""
