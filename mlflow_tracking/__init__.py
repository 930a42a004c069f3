"""The only package that imports mlflow: runs, per-round logging, artifacts, registry, comparisons."""

from mlflow_tracking.runs import RunTracker, flatten

__all__ = ["RunTracker", "flatten"]
