"""How the model and its adapter are built: loading, PEFT methods, the builder, adapter state."""
