"""Turn-taking rules: when a user turn is over, and what user speech during agent speech means.

- End of turn: the VAD's hang-over is the shortest silence that can end a turn. On top of it the
  agent waits longer the less the words so far read as a complete turn: the semantic end-of-turn
  probability (engine.end_of_turn) maps, on a log scale, from `incomplete_prob` (wait
  `max_extra_wait_s`) to `complete_prob` (answer at once).
- Barge-in classification, once the words of an interruption are known: no words (a cough, a
  door) and backchannels ("uh-huh", "yeah", "okay") are false interruptions, after which the agent
  resumes; words that repeat what the agent was just saying are its own echo.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rejoinder.streaming.text_metrics import normalize_text

BACKCHANNEL_WORDS = frozenset(
    "uh huh uhhuh uh-huh mhm mm mmhmm mm-hmm hmm hm yeah yep yup yes ok okay right sure alright "
    "i see got it oh ah uh um aha cool nice great wow".split()
)


@dataclass(frozen=True)
class TurnTakingConfig:
    # VAD: speech must last min_speech_s to count (and to barge in); silence of hangover_s ends it.
    min_speech_s: float = 0.2
    hangover_s: float = 0.3
    vad_threshold: float = 0.5
    # Semantic end of turn.
    semantic: bool = True
    complete_prob: float = 0.02  # at or above: the turn is over once the VAD says silence
    incomplete_prob: float = 0.002  # at or below: wait the longest
    max_extra_wait_s: float = 1.6  # extra silence to wait for an incomplete turn
    # Barge-in.
    backchannel_max_words: int = 3
    echo_text_overlap: float = 0.7  # share of an interruption's words found in the agent's recent text
    preemptive: bool = True  # start generating on a stable interim transcript

    def __post_init__(self) -> None:
        if not 0.0 < self.incomplete_prob < self.complete_prob <= 1.0:
            raise ValueError("need 0 < incomplete_prob < complete_prob <= 1")
        if not 0.1 <= self.min_speech_s <= 1.0:
            raise ValueError("min_speech_s must be within 0.1-1.0 s")

    def extra_wait_s(self, end_of_turn_prob: float | None) -> float:
        """Silence to wait beyond the VAD hang-over before answering."""
        if not self.semantic or end_of_turn_prob is None:
            return 0.0
        p = max(end_of_turn_prob, 1e-9)
        if p >= self.complete_prob:
            return 0.0
        if p <= self.incomplete_prob:
            return self.max_extra_wait_s
        lo, hi = math.log(self.incomplete_prob), math.log(self.complete_prob)
        return self.max_extra_wait_s * (hi - math.log(p)) / (hi - lo)


def words(text: str) -> list[str]:
    return normalize_text(text).split()


def is_backchannel(text: str, max_words: int = 3) -> bool:
    w = words(text)
    return 0 < len(w) <= max_words and all(x in BACKCHANNEL_WORDS for x in w)


def is_echo_text(heard: str, agent_text: str, overlap: float = 0.7) -> bool:
    """Whether `heard` is mostly words of `agent_text` (the agent's own voice, transcribed)."""
    h, a = words(heard), set(words(agent_text))
    if len(h) < 2 or not a:
        return False
    return sum(x in a for x in h) / len(h) >= overlap
