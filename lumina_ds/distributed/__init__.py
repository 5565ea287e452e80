"""Runtime parallelism: the launcher environment, the DeepSpeed JSON, expert placement, consolidation."""
