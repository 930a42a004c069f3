"""The base class of every "your input is wrong" error, so front ends can show just the message."""


class InputError(ValueError):
    """Bad user input (config, model, data, partition); the message names the field at fault."""
