"""What does a caller on hold hear? A soft, generated tone pattern (nothing bundled, nothing downloaded).

One cycle is a gentle two-note chime (a major third, fading in and out, about -26 dBFS) followed by
quiet, so a caller knows the line is alive without it competing with a voice that comes back. The
cycle is generated once per sample rate and looped by whoever plays it (`agent.speaker`), as
`SpeechChunk`s with no text: nothing of it counts as words the agent said.
"""
from __future__ import annotations

import functools

import numpy as np

from .frames import to_pcm16
from .streamed_tts import SpeechChunk

__all__ = ["HOLD_CYCLE_S", "hold_chunk", "hold_cycle"]

HOLD_CYCLE_S = 2.4
_NOTES = ((523.25, 0.0), (659.25, 0.28))  # C5 then E5, seconds into the cycle
_NOTE_S = 0.42
_LEVEL = 0.05  # peak amplitude (about -26 dBFS)


@functools.lru_cache(maxsize=8)
def hold_cycle(sample_rate: int) -> np.ndarray:
    """One cycle of hold audio, int16 mono at `sample_rate` (read-only: it is shared)."""
    n = int(round(HOLD_CYCLE_S * sample_rate))
    out = np.zeros(n, np.float32)
    t = np.arange(int(_NOTE_S * sample_rate), dtype=np.float32) / sample_rate
    # A soft bell: fast attack, exponential decay, a little of the octave for warmth.
    envelope = np.minimum(1.0, t / 0.015) * np.exp(-t / 0.12)
    for freq, start in _NOTES:
        note = envelope * (np.sin(2 * np.pi * freq * t) + 0.25 * np.sin(4 * np.pi * freq * t)) / 1.25
        i = int(start * sample_rate)
        out[i : i + note.size] += _LEVEL * note[: n - i]
    pcm = to_pcm16(out)
    pcm.setflags(write=False)
    return pcm


def hold_chunk(sample_rate: int, index: int = 0) -> SpeechChunk:
    """One cycle as a playout chunk (empty text: hold audio is not speech)."""
    return SpeechChunk(audio=hold_cycle(sample_rate), sample_rate=sample_rate, text="", text_start=0, text_end=0,
                       segment_index=index)
