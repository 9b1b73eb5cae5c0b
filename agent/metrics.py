"""What does an operator's dashboard see? Prometheus metrics of the agent, from its session events.

`AgentMetrics.listener` is a session listener: every session's events feed the same metrics
(`prometheus-client`), which `rejoinder serve` exposes at `/metrics` and a LiveKit worker on its
`--metrics-port`. The worker's sessions run in job processes: there the metrics are recorded in
prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the worker before its job
processes start) and the worker's own process serves their sum.

    rejoinder_sessions_active                      gauge      sessions running now
    rejoinder_sessions_total                       counter    sessions started
    rejoinder_sessions_refused_total{reason}       counter    offers refused (busy, unauthorized, origin_not_allowed, …)
    rejoinder_voice_to_voice_seconds               histogram  end of the user's speech -> first answer audio out
    rejoinder_barge_in_reaction_seconds            histogram  user speech onset -> agent audio stopped
    rejoinder_stage_seconds{stage}                 histogram  end of speech -> asr_final | end_of_turn |
                                                              first_token | first_audio
    rejoinder_llm_tokens_per_second                histogram  decode speed of each answer
    rejoinder_turns_total{outcome}                 counter    answered turns: completed | interrupted
    rejoinder_errors_total{where}                  counter    error events by where they happened
"""
from __future__ import annotations

import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .events import BargeIn, SessionEnded, SessionError, SessionEvent, SessionStarted, TurnMetrics

__all__ = ["CONTENT_TYPE", "AgentMetrics", "multiprocess_registry"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)
_BARGE_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
_TOKS_BUCKETS = (5, 10, 25, 50, 100, 150, 200, 300, 500, 1000)
STAGES = {"asr_final": "asr_final_s", "end_of_turn": "end_of_turn_s", "first_token": "llm_first_token_s",
          "first_audio": "first_audio_sent_s"}


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # In multiprocess mode (a LiveKit job process) values go to the shared files whatever the
        # registry; a private registry keeps tests and embedded servers apart otherwise.
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_active = Gauge("rejoinder_sessions_active", "Sessions running now", registry=r,
                                     multiprocess_mode="livesum")
        self.sessions = Counter("rejoinder_sessions", "Sessions started", registry=r)
        self.refused = Counter("rejoinder_sessions_refused", "Offers refused, by reason", ["reason"], registry=r)
        self.voice_to_voice = Histogram("rejoinder_voice_to_voice_seconds", "End of user speech to first answer audio",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.barge_in = Histogram("rejoinder_barge_in_reaction_seconds", "User speech onset to agent audio stopped",
                                  buckets=_BARGE_BUCKETS, registry=r)
        self.stage = Histogram("rejoinder_stage_seconds", "End of user speech to each stage", ["stage"],
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens_per_s = Histogram("rejoinder_llm_tokens_per_second", "Decode speed of each answer",
                                      buckets=_TOKS_BUCKETS, registry=r)
        self.turns = Counter("rejoinder_turns", "Answered turns, by outcome", ["outcome"], registry=r)
        self.errors = Counter("rejoinder_errors", "Error events, by where they happened", ["where"], registry=r)

    def listener(self, event: SessionEvent) -> None:
        """A session listener (Session(listeners=[metrics.listener]) or session.add_listener)."""
        if isinstance(event, TurnMetrics):
            self.turns.labels("interrupted" if event.interrupted else "completed").inc()
            if event.voice_to_voice_s is not None:
                self.voice_to_voice.observe(event.voice_to_voice_s)
            stages = event.stage_latencies()
            for stage, key in STAGES.items():
                if stages.get(key) is not None:
                    self.stage.labels(stage).observe(stages[key])
            if event.llm_tokens_per_s is not None:
                self.tokens_per_s.observe(event.llm_tokens_per_s)
        elif isinstance(event, BargeIn):
            if event.outcome == "interruption" and event.reaction_s is not None:
                self.barge_in.observe(event.reaction_s)
        elif isinstance(event, SessionError):
            self.errors.labels(event.where.removeprefix("rejoinder-")[:40]).inc()
        elif isinstance(event, SessionStarted):
            self.sessions.inc()
            self.sessions_active.inc()
        elif isinstance(event, SessionEnded):
            self.sessions_active.dec()

    def on_refused(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def multiprocess_registry() -> Any:
    """A registry that sums the metrics every process wrote under PROMETHEUS_MULTIPROC_DIR."""
    from prometheus_client import multiprocess

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise RuntimeError("PROMETHEUS_MULTIPROC_DIR is not set")
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry
