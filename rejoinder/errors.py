"""What a user can cause, as one family of exceptions.

Every error that bad input, a bad file, a refused request or a broken peer can provoke derives from
`RejoinderError`; the CLI reports exactly those as a one-line message (exit status 2) and lets
anything else, a bug, show its traceback. The subclasses say which part of the world was wrong.
Several also derive from the built-in type callers traditionally catch (`ValueError` for bad
values, `ConnectionError` for a vanished peer), so `except ValueError` keeps working.
"""
from __future__ import annotations

__all__ = [
    "BadInputError",
    "ConfigError",
    "ControlError",
    "EngineError",
    "ModelAssetError",
    "OutputError",
    "RejoinderError",
    "TransportError",
]


class RejoinderError(Exception):
    """Base of every error a user can cause; its message is written for a person."""


class BadInputError(RejoinderError, ValueError):
    """Input that cannot be used: malformed audio, a wrong rate, broken SDP, an unusable file."""


class ConfigError(RejoinderError, ValueError):
    """A setting (flag or REJOINDER_* variable) with a value that cannot be used."""


class ModelAssetError(RejoinderError):
    """A model file is missing, damaged, or not what it claims to be."""


class EngineError(RejoinderError):
    """The engine cannot do what was asked (a prompt too long for the context, an unusable backend)."""


class TransportError(RejoinderError, ConnectionError):
    """The remote party is gone or its connection cannot carry the session."""


class OutputError(RejoinderError, OSError):
    """An output that cannot be written: a missing or read-only folder, a directory or device, a full disk."""


class ControlError(RejoinderError, ValueError):
    """A remote-control command that is refused: unknown, malformed, or not allowed on its channel."""
