"""Audio at the WebRTC boundary: aiortc/PyAV frames as ours, and resampling to Opus' 48 kHz.

Opus always runs at 48 kHz (handing aiortc's encoder anything else costs it a second resampling),
so outgoing audio at another rate is resampled here, with as little delay as a stream allows.
"""
from __future__ import annotations

import time

import av
import numpy as np

from .frames import AudioFrame, to_pcm16

__all__ = ["RTC_RATE", "Resampler", "av_to_audio_frame", "to_int16_mono"]

RTC_RATE = 48_000


def av_to_audio_frame(frame: av.AudioFrame, received_at: float | None = None) -> AudioFrame:
    """An aiortc/PyAV frame as our AudioFrame (int16 or float32, shape (n,) or (n, channels)).

    Timestamp: the receive time minus the frame's duration, i.e. the latest its first sample can
    have been captured (WebRTC does not carry capture times to us).
    """
    received_at = time.monotonic() if received_at is None else received_at
    channels = len(frame.layout.channels)
    fmt = frame.format
    if fmt.name not in ("s16", "s16p", "flt", "fltp"):
        # Opus decodes to s16; anything else (a future codec) is normalised once here.
        frame = av.AudioResampler(format="s16", layout=frame.layout.name, rate=frame.sample_rate).resample(frame)[0]
        fmt = frame.format
    x = frame.to_ndarray()
    if fmt.is_planar:
        x = x.T  # (channels, n) -> (n, channels)
    else:
        x = x.reshape(-1, channels)
    x = np.ascontiguousarray(x[:, 0] if channels == 1 else x)
    rate = int(frame.sample_rate)
    n = x.shape[0]
    return AudioFrame(x, rate, channels, received_at - n / rate)


class Resampler:
    """Streaming resampling to 48 kHz by libswresample: float32 mono in, out after a few samples.

    soxr's high-quality streams (`streaming.resample`) hold 20-40 ms back and release it in blocks
    of two frames; swr's default filter delays by under 1 ms, returns output on every call, and
    keeps ~100 dB SNR on speech-band audio: far past what Opus preserves.
    """

    def __init__(self, from_rate: int) -> None:
        self.from_rate = int(from_rate)
        self._swr = (None if self.from_rate == RTC_RATE
                     else av.AudioResampler(format="flt", layout="mono", rate=RTC_RATE))

    def process(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        if self._swr is None or not x.size:
            return x.copy() if self._swr is None else x
        f = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="flt", layout="mono")
        f.sample_rate = self.from_rate
        out = [o.to_ndarray().reshape(-1) for o in self._swr.resample(f)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def to_int16_mono(frame: AudioFrame) -> np.ndarray:
    x = frame.samples
    if x.ndim == 2:
        x = x[:, 0] if x.shape[1] == 1 else frame.to_float_mono()
    return np.ascontiguousarray(to_pcm16(x))
