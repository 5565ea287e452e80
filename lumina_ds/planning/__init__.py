"""Offline planning: memory model, planner, time estimate, dry run, per-preset layouts, environment checks."""
