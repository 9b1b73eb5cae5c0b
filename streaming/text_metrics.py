"""Text comparison for speech tests and benches: normalisation and word error rate.

Normalisation is deliberately small and predictable (Whisper's English normaliser rewrites numbers,
spellings and contractions; we only need "did the recogniser hear the same words"): lower case,
Unicode quotes folded, punctuation dropped except apostrophes inside words, hyphens split words.
"""
from __future__ import annotations

import re
import unicodedata

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"})
_NON_WORD = re.compile(r"[^\w' ]+")
_EDGE_APOSTROPHE = re.compile(r"(^|\s)'+|'+(\s|$)")


def normalize_text(text: str) -> str:
    """'Hello, World!  It\u2019s me.' -> "hello world it's me"."""
    t = unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()
    t = t.replace("-", " ")
    t = _NON_WORD.sub(" ", t)
    t = _EDGE_APOSTROPHE.sub(" ", t)
    t = t.replace("_", " ")
    return " ".join(t.split())


def normalized_words(text: str) -> list[str]:
    return normalize_text(text).split()


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance between token lists (substitution, insertion, deletion cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_error_rate(ref: str, hyp: str) -> float:
    """(S + D + I) / words in ref, after normalisation. An empty reference gives 0.0 for an empty
    hypothesis and 1.0 otherwise (so the result is always defined)."""
    r, h = normalized_words(ref), normalized_words(hyp)
    if not r:
        return 0.0 if not h else 1.0
    return edit_distance(r, h) / len(r)
