"""Errors the engine raises with a message meant for a person, not a traceback.

Both belong to the `rejoinder.errors` family and also stay `ValueError`s, which callers catch.
"""
from rejoinder.errors import EngineError, ModelAssetError


class ModelFileError(ModelAssetError, ValueError):
    """A model file is missing, truncated, of an unsupported kind, or not what it claims to be."""


class ContextOverflow(EngineError, ValueError):
    """A prompt (or a prompt plus its answer) does not fit the engine's context."""
