"""Whole-file audio I/O and one-shot resampling.

This is the batch side of audio handling (a WAV given on the command line, test fixtures, benches).
Audio in motion (20 ms frames, streaming resampling) lives in `frames.py` and `resample.py`.

Everything returned here is float32 mono in [-1, 1]: the one internal sample format, so callers
never branch on bit depth or channel count.

Files a user names are checked before they are opened: only regular files are read (a FIFO with no
writer would block forever, a directory or device is not a recording), and a WAV whose header
promises more audio than the file holds is reported (libsndfile silently returns what is there):
a warning when a little is missing, a refusal when most is. Writes go to a temporary file beside the
target, renamed over it once complete, so a failed write (a full disk) leaves no half file and
keeps the previous one; every write failure is an `OutputError` with the system's reason.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
import struct
from typing import Any, BinaryIO, Union

import numpy as np
import soundfile as sf
import soxr

from rejoinder.errors import BadInputError, OutputError

log = logging.getLogger("rejoinder.streaming.audio")

PathOrFile = Union[str, "os.PathLike[str]", BinaryIO]

MIN_RATE = 8_000
MAX_RATE = 48_000
MAX_CHANNELS = 8  # 7.1 surround; more is a microphone array or a multitrack, not one conversation
DEFAULT_MAX_SECONDS = 120.0
# A WAV cut short by more than this fraction of what its header promises is refused, not answered.
MAX_MISSING_FRACTION = 0.5

# soundfile reports the container as "WAV" for RIFF WAVE, "WAVEX" for WAVE_FORMAT_EXTENSIBLE (what
# many tools write for 24-bit or multichannel) and "RF64" for >4 GiB WAV; all three are WAV to a user.
_WAV_FORMATS = frozenset({"WAV", "WAVEX", "RF64"})


class AudioError(BadInputError):
    """Audio input is unusable; the message is one line meant for a human."""


def _describe(source: PathOrFile) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "name", "<stream>")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_regular_file(path: str | os.PathLike[str]) -> None:
    """Refuse, without opening it, what is not a regular file (opening a FIFO with no writer blocks)."""
    name = os.fspath(path)
    try:
        mode = os.stat(name).st_mode
    except FileNotFoundError:
        raise AudioError(f"{name}: file not found") from None
    except OSError as exc:
        raise AudioError(f"{name}: cannot open ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise AudioError(f"{name}: is {_kind(mode)}, not a WAV file (give a recorded file)")


def read_wav(source: PathOrFile, *, max_seconds: float | None = DEFAULT_MAX_SECONDS) -> tuple[np.ndarray, int]:
    """Read a WAV file as float32 mono in [-1, 1]; returns (samples, sample_rate).

    Accepts 8-48 kHz, 1-8 channels (averaged to mono), 8/16/24/32-bit PCM and 32/64-bit float.
    Raises AudioError for anything that is not a regular file holding a readable WAV, empty, longer
    than `max_seconds` (None: no limit), cut short by more than half, or holding NaN/inf samples.
    A file cut short by less is read with a warning saying how much is missing. Float files may
    exceed [-1, 1]; they are clipped (with a warning) because every stage downstream assumes that range.
    """
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        check_regular_file(source)
    try:
        info = sf.info(source)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"{name}: not a readable audio file ({_short(exc)})") from None
    except OSError as exc:
        raise AudioError(f"{name}: cannot open ({exc.strerror or exc})") from None
    if info.format not in _WAV_FORMATS:
        raise AudioError(f"{name}: not a WAV file (found {info.format_info or info.format})")
    if not MIN_RATE <= info.samplerate <= MAX_RATE:
        raise AudioError(f"{name}: sample rate {info.samplerate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
    if not 1 <= info.channels <= MAX_CHANNELS:
        raise AudioError(f"{name}: {info.channels} channels; at most {MAX_CHANNELS} are supported (mix it down)")
    if info.frames <= 0:
        raise AudioError(f"{name}: the file holds no audio")
    _check_complete(source, name, info)
    duration = info.frames / info.samplerate
    # Checked from the header, before decoding: a 3-hour file is refused without reading it.
    if max_seconds is not None and duration > max_seconds:
        raise AudioError(f"{name}: {duration:.1f} s of audio is longer than the {max_seconds:g} s limit")
    if not isinstance(source, (str, os.PathLike)) and hasattr(source, "seek"):
        source.seek(0)  # sf.info consumed the header of a file object
    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(f"{name}: the WAV data is damaged ({_short(exc)})") from None
    if data.size == 0:
        raise AudioError(f"{name}: the file holds no audio")
    samples = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: the audio contains NaN or infinite samples")
    peak = float(np.abs(samples).max())
    if peak > 1.0:
        log.warning("%s: float samples reach %.2f, clipped to [-1, 1]", name, peak)
        samples = np.clip(samples, -1.0, 1.0)
    return np.ascontiguousarray(samples, dtype=np.float32), int(rate)


_UNKNOWN_LENGTH = 0x7FFF0000


def _wav_data_chunk(f: BinaryIO) -> tuple[int, int] | None:
    """(bytes the header declares for the audio data, offset where the data starts) of a RIFF/RF64 WAV;
    None when it cannot tell (not RIFF, or a streaming writer's "unknown length" marker)."""
    head = f.read(12)
    if len(head) < 12 or head[8:12] != b"WAVE" or head[:4] not in (b"RIFF", b"RF64"):
        return None
    ds64_size: int | None = None
    pos = 12
    for _ in range(64):  # a WAV has a handful of chunks before its data
        f.seek(pos)
        hdr = f.read(8)
        if len(hdr) < 8:
            return None
        cid, size = hdr[:4], struct.unpack("<I", hdr[4:])[0]
        if cid == b"ds64":
            body = f.read(16)
            if len(body) == 16:
                ds64_size = struct.unpack("<Q", body[8:16])[0]
        elif cid == b"data":
            if head[:4] == b"RF64" and size == 0xFFFFFFFF:
                size = ds64_size or 0
            # Tools writing to a pipe cannot seek back to fill the length in: they leave 0, 0xFFFFFFFF
            # (ffmpeg) or a placeholder just under 2 GiB (sox, espeak-ng: 0x7FFFF000). Not a cut file.
            if size == 0 or size >= _UNKNOWN_LENGTH:
                return None
            return size, pos + 8
        pos += 8 + size + (size & 1)
    return None


def _check_complete(source: PathOrFile, name: str, info: Any) -> None:
    """Warn when the file holds less audio than its header promises; refuse when most of it is missing."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                found, total = _wav_data_chunk(f), os.fstat(f.fileno()).st_size
        elif hasattr(source, "seek") and hasattr(source, "tell"):
            start = source.tell()
            try:
                source.seek(0, os.SEEK_END)
                total = source.tell()
                source.seek(0)
                found = _wav_data_chunk(source)
            finally:
                source.seek(start)
        else:
            return
    except (OSError, ValueError):
        return  # unreadable here means libsndfile will say so
    if found is None:
        return
    declared, offset = found
    held = max(0, total - offset)
    if held >= declared:
        return
    held_s = info.frames / info.samplerate  # libsndfile reads what is there (frames > 0: checked before)
    declared_s = declared * held_s / held
    missing = (declared - held) / declared
    message = (f"{name}: the file is cut short: its header promises {declared_s:.1f} s of audio but it holds "
               f"{held_s:.1f} s ({missing:.0%} missing)")
    if missing > MAX_MISSING_FRACTION:
        raise AudioError(message + "; refusing to answer a fragment")
    log.warning("%s; using the part that is there", message)


class _Sink:
    """A raw file for libsndfile's virtual I/O that keeps the OSError a failed write raised (a full
    disk: ENOSPC), instead of letting it escape through the C callback as a printed traceback."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        if self.error is not None:
            return 0
        done = 0
        try:
            while done < len(data):  # a raw file may write short; the next write then says why
                n = self.f.write(data[done:])
                if not n:
                    raise OSError(28, os.strerror(28))
                done += n
        except OSError as exc:
            self.error = exc
        return done

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()


def write_wav(path: PathOrFile, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono (1-D) or multichannel (frames x channels) float or int16 samples as 16-bit PCM WAV.

    A path is written through a temporary file renamed over it when complete; any failure is an
    OutputError naming the path and the reason, and leaves no partial file.
    """
    data = np.asarray(samples)
    if data.dtype != np.int16:
        data = np.clip(np.nan_to_num(data.astype(np.float32, copy=False)), -1.0, 1.0)
    if not isinstance(path, (str, os.PathLike)):
        sf.write(path, data, int(sample_rate), subtype="PCM_16", format="WAV")
        return
    name = os.fspath(path)
    target = os.path.realpath(name)
    if os.path.exists(target) and not os.path.isfile(target):
        raise OutputError(f"{name}: cannot write: it is {_kind(os.stat(target).st_mode)}, not a regular file")
    folder, base = os.path.split(target)
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.part")
    sink: _Sink | None = None
    try:
        with open(tmp, "w+b", buffering=0) as raw:
            sink = _Sink(raw)
            try:
                sf.write(sink, data, int(sample_rate), subtype="PCM_16", format="WAV")
            except (RuntimeError, AssertionError):  # soundfile asserts every frame was written
                if sink.error is None:
                    raise
            if sink.error is not None:
                raise sink.error
        os.replace(tmp, target)
    except (OSError, RuntimeError) as exc:  # sf.LibsndfileError is a RuntimeError
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        err = sink.error if sink is not None and sink.error is not None else exc
        reason = err.strerror if isinstance(err, OSError) and err.strerror else _short(err)
        raise OutputError(f"{name}: cannot write ({reason})") from None


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """One-shot high-quality resampling (soxr "HQ") of float32 mono; returns a new float32 array.

    For audio arriving frame by frame use `resample.StreamResampler`, which keeps filter state
    across calls (calling this per frame would click at every frame border).
    """
    x = np.asarray(samples, dtype=np.float32)
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    if from_rate == to_rate or x.size == 0:
        return x.copy()
    return soxr.resample(x, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def duration_s(samples: np.ndarray, sample_rate: int) -> float:
    return len(samples) / float(sample_rate)


def rms_dbfs(samples: np.ndarray) -> float:
    """Level in dBFS (float full scale 1.0); -inf for digital silence."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        return -math.inf
    rms = math.sqrt(float(np.mean(x * x)))
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__
