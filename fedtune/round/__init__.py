"""What travels in a round and what is kept: client, server, update envelope, compression, checkpoints."""
