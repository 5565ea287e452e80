"""Training: session (a run end to end), trainer (cadence), train step, engine, checkpoints, metrics."""
