"""fedtune: federated parameter-efficient fine-tuning of LLMs.

The domain logic only, in wings that each import only the wings below them: core, config,
deployment, data, model, training, hetero, strategies, privacy, round (docs/architecture.md).
It imports neither Prefect nor MLflow, so that another orchestrator can reuse it.
"""

__version__ = "0.1.0"
