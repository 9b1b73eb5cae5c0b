"""`livekit.plugins.rejoinder`: Rejoinder's local models as livekit-agents plugins.

    from livekit.plugins import rejoinder
    session = AgentSession(stt=rejoinder.STT(), vad=rejoinder.VAD(), llm=rejoinder.LLM(),
                           tts=rejoinder.TTS(), turn_handling={"turn_detection": rejoinder.TurnDetector()})

Laid out like livekit-agents' own plugin packages, one file per question:

    stt.py            Whisper behind our VAD-driven streaming recogniser (interim + final), one-shot `recognize`
    llm.py            our engine: chat context, sampling settings, Hermes-style tool calls, enforced `tool_choice`
    tts.py            Piper, `synthesize()` and streamed `stream()` at the voice's own sample rate
    vad.py            Silero through our `SpeechDetector`
    turn_detector.py  the semantic end-of-turn score computed on the engine
    chat.py           a livekit `ChatContext` as our chat messages, rendered and fitted to the context
    models.py         the embedded models, and `shared_engine` (LLM and turn detector on one engine)
    log.py            the plugins' logger; version.py: `__version__`

This folder installs as `livekit.plugins.rejoinder` (pyproject package-dir mapping). It uses
`rejoinder.streaming` and `rejoinder.engine`, never `rejoinder.agent`. Everything CPU-heavy runs off
the event loop (the engine on its own thread, Whisper and Piper in worker threads).

Importing it registers `RejoinderPlugin` with `livekit.agents.Plugin`, as every livekit plugin does
(`download_files` prepares the embedded models, so the first job does not pay for it).
`LiveKitTransport`, which carries Rejoinder's *own* session over a room (`rejoinder livekit`), lives in
`rejoinder.streaming.livekit`; it is re-exported here for code written against earlier releases.
"""
from __future__ import annotations

import threading

from livekit.agents import Plugin

from rejoinder.streaming.assets import resolve
from rejoinder.streaming.livekit import LiveKitTransport

from .chat import chat_messages
from .llm import LLM, LLMStream
from .log import logger
from .models import shared_engine
from .stt import STT, SpeechStream
from .tts import TTS, ChunkedStream, SynthesizeStream
from .turn_detector import TurnDetector
from .vad import VAD, VADStream
from .version import __version__

__all__ = [
    "LLM",
    "LLMStream",
    "ChunkedStream",
    "LiveKitTransport",
    "RejoinderPlugin",
    "STT",
    "SpeechStream",
    "SynthesizeStream",
    "TTS",
    "TurnDetector",
    "VAD",
    "VADStream",
    "__version__",
    "chat_messages",
    "shared_engine",
]


class RejoinderPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, "rejoinder", logger)

    def download_files(self) -> None:
        # Nothing is downloaded: the models ship in PyPI packages. This joins the split Whisper model
        # into the cache once, so the first job does not pay for it.
        for role in ("vad", "asr", "llm", "tts"):
            logger.info("%s model: %s", role, resolve(role))


def _register() -> None:
    if any(isinstance(p, RejoinderPlugin) for p in Plugin.registered_plugins):
        return
    if threading.current_thread() is threading.main_thread():
        Plugin.register_plugin(RejoinderPlugin())
    else:  # livekit refuses registration off the main thread; plugins still work unregistered
        logger.debug("livekit.plugins.rejoinder imported off the main thread: not registered")


_register()
