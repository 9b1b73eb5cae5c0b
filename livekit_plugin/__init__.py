"""`livekit.plugins.rejoinder`: Rejoinder's local models as livekit-agents plugins.

    from livekit.plugins import rejoinder
    session = AgentSession(stt=rejoinder.STT(), vad=rejoinder.VAD(), llm=rejoinder.LLM(),
                           tts=rejoinder.TTS(), turn_handling={"turn_detection": rejoinder.TurnDetector()})

The implementation lives in `rejoinder.streaming.livekit_plugins` (this folder installs as
`livekit.plugins.rejoinder` through the pyproject package-dir mapping); importing either registers the
`livekit.agents.Plugin`.
"""
from rejoinder.streaming.livekit_plugins import (
    LLM,
    STT,
    TTS,
    VAD,
    LiveKitTransport,
    LLMStream,
    RejoinderPlugin,
    SpeechStream,
    TurnDetector,
    VADStream,
    __version__,
    shared_engine,
)

__all__ = [
    "LLM",
    "LLMStream",
    "LiveKitTransport",
    "RejoinderPlugin",
    "STT",
    "SpeechStream",
    "TTS",
    "TurnDetector",
    "VAD",
    "VADStream",
    "__version__",
    "shared_engine",
]
