"""fedtune: federated parameter-efficient fine-tuning of LLMs.

The core package holds the domain logic only (config, models and PEFT, data and partitioning,
local training, aggregation strategies, evaluation, wire format); it imports neither Prefect
nor MLflow so that another orchestrator can reuse it.
"""

__version__ = "0.1.0"
