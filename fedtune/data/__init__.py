"""Data: loading with a column mapping, the synthetic demo set, partitioning, tokenization."""
