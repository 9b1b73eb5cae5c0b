"""Rejoinder: a real-time, full-duplex, self-hosted voice agent.

The code lives in the folders at the repository root and installs under this namespace:
`rejoinder.agent` (the conversation), `rejoinder.streaming` (audio in motion and its transports),
`rejoinder.engine` (the generation model), `rejoinder.kernels` (decode kernels). This package itself
holds only what all of them share: the error base (`rejoinder.errors`).
"""
from .errors import RejoinderError

__all__ = ["RejoinderError"]
