"""What a run is: the config's sections and field rules, and the cross-feature rules (no torch)."""
