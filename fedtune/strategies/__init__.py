"""Aggregation strategies: `base` (the interface), one module per family, and `options` (each
strategy's options and limits, light enough for the config check; `build_strategy`). The catalog
(fedtune.core.catalog) names them and imports a strategy's module the first time it is used."""
