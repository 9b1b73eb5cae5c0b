"""Neural text-to-speech with Piper (VITS, onnxruntime), synchronous and cancellable.

This module only turns text into audio. Deciding *when* text is ready to be spoken (clause
segmentation of an LLM token stream) lives in `text_segmenter.py`, running synthesis off the event
loop in `streamed_tts.py`, and pacing audio out in `playout.py`.

Why not `PiperVoice.load` + `PiperVoice.synthesize` directly:

* `PiperVoice.load` builds its onnxruntime session with default options: as many intra-op threads as
  there are cores, spinning while idle. On a 2-core box that starves ASR and the LLM, so we build the
  session ourselves with a bounded thread count and spinning off.
* `PiperVoice.synthesize` offers no way to stop a running inference. We run the (public) phonemize →
  ids → session steps ourselves so every onnx call gets a `RunOptions` whose `terminate` flag another
  thread can raise: barge-in then frees the CPU within a millisecond instead of after the sentence.
* Each Piper sentence becomes one `TTSChunk` carrying the slice of the input text it speaks, so the
  playout buffer can later tell which words were actually heard.
* Level: Piper scales every sentence to full scale on its own. Streamed answers are synthesised in
  pieces (a lead-in of three words, then the rest of the sentence), and per-piece scaling made the
  rest of a sentence up to ~4 dB louder than its first words (their raw peaks differ: 0.57 vs 0.34
  for "The capital" / "of France is Paris."). By default (`normalize="voice"`) every piece gets one
  gain per voice instead, measured once at load on a fixed calibration text (that run also warms
  the onnx session up), and lowered only where a piece would clip. `normalize="sentence"` is Piper's.
* Memory: Piper's phonemizer sets espeak-ng's voice before every text, and espeak-ng's
  `espeak_SetVoiceByName` leaks ~1.4 KiB each time (glibc's heap in use grows 1360 bytes per call,
  0 per `get_phonemes`): on a server that speaks all day, a few MiB a day that never come back.
  `_EspeakVoiceOnce` stands in front of Piper's bridge and sets a voice only when it changes
  (espeak's voice is process-wide state, and Piper is its only user here).
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from rejoinder.errors import ModelAssetError

log = logging.getLogger("rejoinder.streaming.tts")

__all__ = ["PiperTTS", "TTSChunk", "TTSError", "SynthesisCancel", "default_tts_threads"]

Normalize = Literal["voice", "sentence"]
# What `normalize="voice"` measures the voice's level on: ordinary sentences, a question, a comma.
CALIBRATION_TEXT = "Hello, how can I help you today? The weather is lovely, and the park is full of people."
_VOICE_GAIN: dict[tuple[str, int | None], float] = {}  # (model, speaker) -> gain, once per process
_VOICE_GAIN_LOCK = threading.Lock()


class _EspeakVoiceOnce:
    """Piper's `espeakbridge` module, with `set_voice` a no-op when the voice is the one already set."""

    def __init__(self, bridge: object) -> None:
        self._bridge = bridge
        self._voice: str | None = None

    def initialize(self, *args: object) -> object:
        self._voice = None  # a fresh espeak: no voice set
        return self._bridge.initialize(*args)  # type: ignore[attr-defined]

    def set_voice(self, voice: str) -> object:
        if voice == self._voice:
            return None
        out = self._bridge.set_voice(voice)  # type: ignore[attr-defined]
        self._voice = voice
        return out

    def __getattr__(self, name: str) -> object:
        return getattr(self._bridge, name)


def _set_espeak_voice_once() -> None:
    """Route Piper's phonemizer (`from . import espeakbridge` at each call) through `_EspeakVoiceOnce`."""
    import sys

    import piper
    from piper import espeakbridge

    if not isinstance(espeakbridge, _EspeakVoiceOnce):
        proxy = _EspeakVoiceOnce(espeakbridge)
        piper.espeakbridge = proxy  # type: ignore[attr-defined]
        sys.modules["piper.espeakbridge"] = proxy  # type: ignore[assignment]


class TTSError(ModelAssetError, ValueError):
    """The TTS voice could not be loaded or used; the message is one line and says why."""


def default_tts_threads(share_cpu: bool = True) -> int:
    """Intra-op threads for Piper (at most 4); the agent's `tts_threads` setting
    (REJOINDER_TTS_THREADS) overrides it.

    `share_cpu`: synthesis runs while the LLM decodes on every core, so Piper takes half of them
    (at least 1): more threads than cores slow both. Without it (the agent pauses an answer's
    decoding while a piece of it is synthesised: `synthesis_hold_s`) Piper takes every core, and the
    first audio of an answer comes sooner (`python bench/synthesis_hold.py`).
    """
    cores = os.cpu_count() or 2
    return max(1, min(4, cores // 2 if share_cpu else cores))


@dataclass(frozen=True)
class TTSChunk:
    """Audio for one Piper sentence and the exact slice of input text it speaks.

    `text` slices of successive chunks concatenate back to the input text (whitespace included), so
    a consumer can rebuild "the text spoken so far" as a plain prefix.
    """

    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    text: str
    phonemes: tuple[str, ...]
    gain: float = 1.0  # applied to the model's raw output (before `volume`)

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


class SynthesisCancel:
    """Thread-safe stop switch for one synthesis: stops between sentences and aborts a running onnx call.

    `cancel()` may be called from any thread (typically the event loop) while a worker thread is
    inside `PiperTTS.iter_synthesize`.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._run_options: object | None = None  # onnxruntime.RunOptions of the call in flight

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            if self._run_options is not None:
                self._run_options.terminate = True  # type: ignore[attr-defined]

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def _begin(self, run_options: object) -> bool:
        """Register the onnx call about to start; False if already cancelled (then do not start it)."""
        with self._lock:
            if self._event.is_set():
                return False
            self._run_options = run_options
            return True

    def _end(self) -> None:
        with self._lock:
            self._run_options = None


# Where espeak-ng (Piper's phonemizer) ends a sentence: terminal punctuation, optional closing
# quotes/brackets, then whitespace. Used to give each Piper sentence its own slice of the text.
_ESPEAK_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*\s+")


def _split_like_espeak(text: str, n_sentences: int, weights: Sequence[int]) -> list[str]:
    """Split `text` into `n_sentences` contiguous slices, one per Piper sentence.

    First try espeak's own rule (split after terminal punctuation); if that does not give the same
    number of pieces (numbers, symbols...), apportion by phoneme count, cutting at whitespace.
    """
    if n_sentences <= 1:
        return [text]
    cuts = [m.end() for m in _ESPEAK_SENTENCE_END.finditer(text) if m.end() < len(text.rstrip())]
    if len(cuts) == n_sentences - 1:
        bounds = [0, *cuts, len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:])]
    total = max(1, sum(weights))
    spaces = [m.end() for m in re.finditer(r"\s+", text)]
    bounds, acc = [0], 0
    for w in weights[:-1]:
        acc += w
        target = len(text) * acc / total
        # nearest whitespace boundary after the previous cut, so no word is split in two
        candidates = [s for s in spaces if s > bounds[-1]] or [bounds[-1]]
        bounds.append(min(candidates, key=lambda s: abs(s - target)))
    bounds.append(len(text))
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


class PiperTTS:
    """A loaded Piper voice. Thread-safe: onnxruntime sessions may be run from several threads.

    `model_path=None` uses the embedded voice (`assets.resolve("tts")`); the JSON config is expected
    beside the model as `<model>.onnx.json` unless `config_path` is given.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        config_path: str | os.PathLike[str] | None = None,
        speaker: int | str | None = None,
        length_scale: float | None = None,
        noise_scale: float | None = None,
        noise_w_scale: float | None = None,
        volume: float = 1.0,
        threads: int | None = None,
        normalize: Normalize = "voice",
    ) -> None:
        # Imported here so `import rejoinder.streaming.tts` stays cheap and works without piper for
        # code that only needs the types.
        import onnxruntime
        from piper.config import PiperConfig

        from .assets import AssetError, resolve

        if model_path is None:
            try:
                model_path = resolve("tts")
            except AssetError as exc:
                raise TTSError(str(exc)) from exc
        model = Path(model_path)
        config_file = Path(config_path) if config_path is not None else Path(f"{model}.json")
        if not model.is_file():
            raise TTSError(f"TTS voice model not found: {model}")
        if not config_file.is_file():
            raise TTSError(f"TTS voice config not found: {config_file} (expected beside the .onnx model)")
        try:
            config = PiperConfig.from_dict(json.loads(config_file.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TTSError(f"TTS voice config {config_file.name} is unreadable: {_one_line(exc)}") from exc

        self.threads = threads if threads is not None else default_tts_threads()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Idle onnxruntime workers busy-wait by default; between clauses that burns a core the LLM needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: no "unused initializer" chatter in the agent log
        try:
            session = onnxruntime.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidProtobuf...)
            raise TTSError(f"TTS voice model {model.name} could not be loaded: {_one_line(exc)}") from exc
        inputs = {i.name for i in session.get_inputs()}
        if not {"input", "input_lengths", "scales"} <= inputs:
            raise TTSError(f"{model.name} is not a Piper voice (inputs: {sorted(inputs)})")

        from piper import PiperVoice

        _set_espeak_voice_once()
        # Piper's own phonemizer/id map; we only replace the session and the synthesis loop.
        self._voice = PiperVoice(session=session, config=config)
        self._session = session
        self._run_options_cls = onnxruntime.RunOptions
        self.model_path = model
        self.sample_rate: int = int(config.sample_rate)
        self.length_scale = float(length_scale if length_scale is not None else config.length_scale)
        self.noise_scale = float(noise_scale if noise_scale is not None else config.noise_scale)
        self.noise_w_scale = float(noise_w_scale if noise_w_scale is not None else config.noise_w_scale)
        self.volume = float(volume)
        self.speaker_id = self._speaker_id(config, speaker)
        if normalize not in ("voice", "sentence"):
            raise TTSError(f"normalize must be 'voice' or 'sentence', not {normalize!r}")
        self.normalize: Normalize = normalize
        self.voice_gain = self._calibrate() if normalize == "voice" else None
        log.info(
            "loaded TTS voice %s (%d Hz, %d intra-op thread%s)",
            model.name, self.sample_rate, self.threads, "" if self.threads == 1 else "s",
        )

    @staticmethod
    def _speaker_id(config: object, speaker: int | str | None) -> int | None:
        num = int(getattr(config, "num_speakers", 1))
        if num <= 1:
            if speaker not in (None, 0):
                raise TTSError(f"this voice has a single speaker; got speaker={speaker!r}")
            return None
        if speaker is None:
            return int(getattr(config, "default_speaker_id", 0))
        if isinstance(speaker, str):
            names = dict(getattr(config, "speaker_id_map", {}) or {})
            if speaker not in names:
                raise TTSError(f"unknown speaker {speaker!r}; this voice has {sorted(names)}")
            return int(names[speaker])
        if not 0 <= speaker < num:
            raise TTSError(f"speaker id {speaker} out of range 0..{num - 1}")
        return int(speaker)

    def _calibrate(self) -> float:
        """The gain that brings this voice's raw output to full scale, on CALIBRATION_TEXT (noise off,
        so it is the same number in every run). Measured once per voice and speaker per process."""
        key = (str(self.model_path.resolve()), self.speaker_id)
        with _VOICE_GAIN_LOCK:
            if key not in _VOICE_GAIN:
                peak = 0.0
                for phonemes in self._voice.phonemize(CALIBRATION_TEXT):
                    if phonemes:
                        raw = self._run(phonemes, None, noise_scale=0.0, noise_w_scale=0.0)
                        assert raw is not None
                        peak = max(peak, float(np.max(np.abs(raw))) if raw.size else 0.0)
                if peak <= 1e-6:
                    raise TTSError(f"TTS voice {self.model_path.name} produced silence for its calibration text")
                _VOICE_GAIN[key] = 1.0 / peak
                log.debug("voice gain of %s: %.3f (calibration peak %.3f)", self.model_path.name, 1 / peak, peak)
            return _VOICE_GAIN[key]

    # --- synthesis --------------------------------------------------------------------------------

    def synthesize(self, text: str) -> np.ndarray:
        """All audio for `text` as one float32 mono array at `self.sample_rate` (empty if nothing to say)."""
        chunks = [c.audio for c in self.iter_synthesize(text)]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)

    def iter_synthesize(self, text: str, cancel: SynthesisCancel | None = None) -> Iterator[TTSChunk]:
        """Yield one chunk per Piper sentence, as each is synthesised.

        Blocking (call it from a worker thread when on the event loop). If `cancel` is triggered, the
        onnx call in flight is aborted and iteration ends without yielding anything more.
        """
        if not text.strip():
            return
        sentences = [s for s in self._voice.phonemize(text) if s]
        if not sentences:
            return
        texts = _split_like_espeak(text, len(sentences), [len(s) for s in sentences])
        for phonemes, piece in zip(sentences, texts):
            if cancel is not None and cancel.cancelled:
                return
            raw = self._run(phonemes, cancel)
            if raw is None:  # cancelled mid-inference
                return
            audio, gain = self._level(raw)
            yield TTSChunk(audio=audio, sample_rate=self.sample_rate, text=piece, phonemes=tuple(phonemes), gain=gain)

    def _level(self, raw: np.ndarray) -> tuple[np.ndarray, float]:
        """Scale raw model output: one gain per voice (or per sentence, as Piper does), never clipping."""
        peak = float(np.max(np.abs(raw))) if raw.size else 0.0
        if peak <= 1e-8:
            return np.zeros_like(raw), 0.0
        gain = 1.0 / peak if self.voice_gain is None else min(self.voice_gain, 1.0 / peak)
        audio = raw * (gain * self.volume)
        return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False), gain

    def _run(
        self,
        phonemes: list[str],
        cancel: SynthesisCancel | None,
        *,
        noise_scale: float | None = None,
        noise_w_scale: float | None = None,
    ) -> np.ndarray | None:
        """The model's raw float output for one sentence of phonemes (None: cancelled)."""
        ids = self._voice.phonemes_to_ids(phonemes)
        scales = [
            self.noise_scale if noise_scale is None else noise_scale,
            self.length_scale,
            self.noise_w_scale if noise_w_scale is None else noise_w_scale,
        ]
        args = {
            "input": np.asarray([ids], dtype=np.int64),
            "input_lengths": np.asarray([len(ids)], dtype=np.int64),
            "scales": np.asarray(scales, dtype=np.float32),
        }
        if self.speaker_id is not None:
            args["sid"] = np.asarray([self.speaker_id], dtype=np.int64)
        run_options = self._run_options_cls()
        if cancel is not None and not cancel._begin(run_options):
            return None
        try:
            audio = self._session.run(None, args, run_options)[0].squeeze()
        except Exception:
            if cancel is not None and cancel.cancelled:
                return None  # "Exiting due to terminate flag": the expected way out on barge-in
            raise
        finally:
            if cancel is not None:
                cancel._end()
        return np.asarray(audio, dtype=np.float32).reshape(-1)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
