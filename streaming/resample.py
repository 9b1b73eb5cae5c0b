"""Streaming resampling: one soxr stream per audio source, filter state kept across frames.

Resampling each 20 ms frame on its own restarts the filter at every border (a click every 20 ms and
a few samples lost or gained per frame). `StreamResampler` feeds frames through one
soxr.ResampleStream, so frame-by-frame output equals one-shot output up to float rounding.
The price is a small constant delay (the filter's look-ahead): samples come out a few ms after they
go in, and `flush()` drains the rest at end of stream.
"""
from __future__ import annotations

import numpy as np
import soxr


class StreamResampler:
    """float32 mono in at `from_rate`, float32 mono out at `to_rate`; identity when rates match."""

    def __init__(self, from_rate: int, to_rate: int, *, quality: str = "HQ") -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        self.from_rate = int(from_rate)
        self.to_rate = int(to_rate)
        self.quality = quality
        self._stream: soxr.ResampleStream | None = None
        self.reset()

    @property
    def passthrough(self) -> bool:
        return self.from_rate == self.to_rate

    def reset(self) -> None:
        """Drop filter state (a new, unrelated stream follows)."""
        self._stream = (
            None
            if self.passthrough
            else soxr.ResampleStream(self.from_rate, self.to_rate, 1, dtype="float32", quality=self.quality)
        )

    def process(self, samples: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if self._stream is None:
            return x.copy()
        if x.size == 0:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(x, last=False)

    def flush(self) -> np.ndarray:
        """End of stream: the samples still inside the filter. The resampler is reset afterwards."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self.reset()
        return tail
