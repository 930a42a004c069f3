"""Prefect flows: one deployable flow per file, composing the tasks in `tasks/`."""
