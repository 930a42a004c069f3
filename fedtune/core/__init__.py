"""What every layer may use: errors, the registry of names, atomic writes, fault points (no torch)."""
