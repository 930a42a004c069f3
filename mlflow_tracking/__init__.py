"""The only package that imports mlflow: runs, per-round logging, artifacts, registry, comparisons."""
