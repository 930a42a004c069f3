"""What protects data and ownership: secure aggregation, DP accounting, record-level DP, watermarks."""
