"""Where did a turn's time go? One OpenTelemetry trace per turn, a span per stage, when asked for.

Off by default. With `--otlp-endpoint URL` (REJOINDER_OTLP_ENDPOINT) every answered turn becomes a
trace sent over OTLP/HTTP (`opentelemetry-sdk`, batched, off the audio path): a `turn` span from the
end of the user's speech to the first answer audio, and under it one span per stage (asr_final,
end_of_turn, llm_first_token, first_clause, first_tts_audio, first_audio_sent), each from the end of
speech to that stage, with the texts, P(end), tokens and barge-in outcome as attributes. The times
are the session's own monotonic stamps, placed on the wall clock.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from rejoinder.errors import ConfigError

from .events import SessionEvent, TurnMetrics

log = logging.getLogger("rejoinder.agent.tracing")

__all__ = ["TurnTracer", "start_tracing"]

_STAGES = ("asr_final_at", "end_of_turn_at", "llm_first_token_at", "first_clause_at", "first_tts_audio_at",
           "first_audio_sent_at")


class TurnTracer:
    def __init__(self, endpoint: str, *, service_name: str = "rejoinder", exporter: Any = None) -> None:
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            if exporter is None:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ConfigError(f"--otlp-endpoint needs OpenTelemetry ({exc.name} is missing): "
                              "pip install 'rejoinder[otel]'") from None
        if exporter is None:

            exporter = OTLPSpanExporter(endpoint=endpoint, timeout=5)
        # A provider of our own (not the global one): an embedding application keeps its own tracing.
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
        self.tracer = self.provider.get_tracer("rejoinder.agent")
        self.endpoint = endpoint

    @staticmethod
    def _ns(monotonic: float) -> int:
        return int((time.time() - (time.monotonic() - monotonic)) * 1e9)

    def listener(self, event: SessionEvent) -> None:
        """A session listener: each TurnMetrics event becomes a trace."""
        if not isinstance(event, TurnMetrics) or event.user_speech_end_at is None:
            return
        t0 = event.user_speech_end_at
        stamps = {name[:-3]: getattr(event, name) for name in _STAGES if getattr(event, name) is not None}
        end = max(stamps.values(), default=t0)
        attrs = {"rejoinder.session_id": event.session_id, "rejoinder.turn": event.turn,
                 "rejoinder.user_text": event.user_text, "rejoinder.agent_text": event.agent_text,
                 "rejoinder.interrupted": event.interrupted, "rejoinder.preemptive": event.preemptive,
                 "rejoinder.llm_tokens": event.llm_tokens}
        if event.end_of_turn_prob is not None:
            attrs["rejoinder.end_of_turn_prob"] = event.end_of_turn_prob
        if event.voice_to_voice_s is not None:
            attrs["rejoinder.voice_to_voice_s"] = event.voice_to_voice_s
        root = self.tracer.start_span("turn", start_time=self._ns(t0), attributes=attrs)
        try:
            from opentelemetry import trace

            ctx = trace.set_span_in_context(root)
            for stage, at in stamps.items():
                span = self.tracer.start_span(stage, context=ctx, start_time=self._ns(t0),
                                              attributes={"rejoinder.seconds": at - t0})
                span.end(end_time=self._ns(max(at, t0)))
        finally:
            root.end(end_time=self._ns(end))

    def close(self) -> None:
        self.provider.shutdown()  # flushes what is batched


def start_tracing(endpoint: str) -> TurnTracer | None:
    """The tracer the settings ask for, or None when no endpoint is configured."""
    if not endpoint:
        return None
    log.info("sending a trace per turn to %s", endpoint)
    return TurnTracer(endpoint)
