"""Prefect tasks: one step each, exchanging paths and small dicts, never models."""
