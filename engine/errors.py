"""Errors the engine raises with a message meant for a person, not a traceback."""


class ModelFileError(ValueError):
    """A model file is missing, truncated, of an unsupported kind, or not what it claims to be."""


class GenerationCancelled(Exception):
    """Raised inside the decoding loop when its cancel flag is set."""
