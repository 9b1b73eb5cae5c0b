"""Cut a stream of LLM text deltas into speakable clauses, as early as it is safe to.

The TTS can only start once it has a whole clause: synthesising word by word sounds robotic, and
synthesising whole answers wastes the latency budget. This module decides where a clause ends while
the text is still arriving in arbitrary pieces ("Dr", ".", " Sm", "ith").

Rules, in order of preference:

* A sentence ends at `.`, `!`, `?`, an ellipsis, or a newline — but not inside numbers ("3.14",
  "1,000"), after titles ("Dr. Smith"), after abbreviations that do not end the sentence ("Jan. 5",
  "e.g. this", "U.S. Army"), or inside quotes that the sentence continues after (`"Stop!" he said`).
  When the next characters decide (a period at the end of what has arrived so far), we wait for them;
  that costs one LLM token at most.
* Within a long sentence, a clause break (`,` `;` `:` dash) is used once the clause is long enough.
  The first clause of an answer uses a shorter minimum: it gates the time to first audio, while later
  clauses are synthesised as earlier audio plays, where longer clauses give better prosody.
* A clause that grows past a maximum length without any break is cut at the last comma, conjunction
  or word boundary, so first audio is never held back by a run-on sentence and one onnx call stays short.
* Lead-in: while the first clause of an answer is still arriving, its first few words (2-5 by
  default) become a segment of their own as soon as they end at a natural prosodic break — after a
  comma ("I'm sorry,"), or before a conjunction or preposition ("The capital | of France") — and the
  words are complete (the next token shows it). Synthesis then starts a clause earlier. The rest of
  the first clause, and everything after it, is cut exactly where the clause rules alone would cut
  it, so a lead-in only ever adds one cut. Text that arrives in bulk (more than the word after the
  break came with it: a `say`, a continuation) gets no lead-in: there is nothing to wait for.
  `SegmenterConfig.clause_only()` switches lead-ins off.

Each `Segment` carries its offsets in the full text: concatenating the segments gives back exactly
the text pushed, which is what lets the playout buffer report "the words played so far" as a prefix.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("rejoinder.streaming.segmenter")

__all__ = ["Segment", "SegmenterConfig", "TextSegmenter", "segment_text"]

SegmentReason = Literal["lead", "sentence", "clause", "length", "end"]


@dataclass(frozen=True)
class SegmenterConfig:
    first_min_chars: int = 16  # a clause break may end the first clause once it is this long
    min_chars: int = 48  # ... and later clauses once they are this long
    first_max_chars: int = 64  # a first clause without any break is cut near this length
    max_chars: int = 150  # ... later ones near this one (~10 s of speech, one short onnx call)
    lead_in_min_words: int = 2  # the first words may be a segment of their own: at least this many,
    lead_in_max_words: int = 5  # ... at most this many (0: no lead-in, clause rules only)

    def __post_init__(self) -> None:
        if not 0 < self.first_min_chars < self.first_max_chars or not 0 < self.min_chars < self.max_chars:
            raise ValueError(f"inconsistent segmenter limits: {self}")
        lo, hi = self.lead_in_min_words, self.lead_in_max_words
        if hi < 0 or (hi and not 0 < lo <= hi):
            raise ValueError(f"inconsistent lead-in word limits: {self}")

    @classmethod
    def clause_only(cls, **limits: int) -> SegmenterConfig:
        """No lead-in: the first segment is a whole clause (the behaviour before lead-ins existed)."""
        return cls(**{**limits, "lead_in_max_words": 0})

    @property
    def lead_in(self) -> bool:
        return self.lead_in_max_words > 0


@dataclass(frozen=True)
class Segment:
    text: str  # exact slice of the input, leading whitespace included
    start: int  # offset of `text` in everything pushed so far
    end: int
    index: int  # 0 for the first segment of the stream
    reason: SegmentReason

    @property
    def speakable(self) -> bool:
        """Whether there is anything to say (not just whitespace or punctuation)."""
        return any(ch.isalnum() for ch in self.text)


# Titles precede a name: a period after them never ends a sentence.
_TITLES = frozenset(
    (
        "mr mrs ms mx dr prof rev fr sr jr st mt gen col capt cpt lt sgt maj cmdr adm gov "
        "sen rep pres hon supt insp"
    ).split()
)
# Abbreviations that are always followed by more of the same sentence.
_CONTINUING = frozenset("e.g i.e eg ie cf vs viz approx ca fig figs vol pp ch".split())
# Abbreviations that may end a sentence: they do only if a typical sentence opener follows.
_AMBIGUOUS = frozenset(
    (
        "jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues thu thur thurs fri "
        "etc inc ltd co corp llc dept est avg hr hrs secs oz lb lbs ft yd mi km kg cm mm "
        "a.m p.m pm u.s u.k u.n e.u u.s.a ph.d b.a m.a b.sc m.sc"
    ).split()
)
_OPENERS = frozenset(
    (
        "i it its it's the a an he she we they you this that these those there then so but and or yet "
        "my our your his her their in on at for if when while after before however also now here what "
        "why how who where let please thanks thank yes no well ok okay sure"
    ).split()
)
_CONJUNCTIONS = (
    "and but or so because which while then when where although though whereas unless until since "
    "after before that if"
).split()

# Lead-in breaks: a cut before one of these words is a natural prosodic break ("The capital | of France")...
_BREAK_BEFORE = frozenset(
    (
        "and but or nor because which who whose whom while when where whereas although though unless until "
        "since if whether than that of in on at for from with by about into onto over under between through "
        "during without within after before around across near against towards toward behind beyond along "
        "among upon via per"
    ).split()
)
# ... unless the word before it binds to what follows ("a | lot", "is | in", "the | capital").
_NO_BREAK_AFTER = frozenset(
    (
        "a an the this that these those my your his her its our their some any no every each much many more "
        "most few several all both either neither such of to in on at for from with by about as into than like "
        "and or but nor so if is are was were be been being am it's that's there's here's what's do does did "
        "has have had having will would can could shall should may might must not very too quite rather just "
        "how what why who where when which"
    ).split()
) | _TITLES
# ... and "of" binds to these ("a lot of", "one of", "because of").
_BOUND_TO_OF = frozenset(
    "lot lots kind sort out because instead part front top number couple bit one two three half rest none "
    "plenty".split()
)
_OPEN_CLOSE = (('"', '"'), ("“", "”"), ("(", ")"), ("[", "]"))

_TERMINAL = re.compile(r"(\.\.\.+|…|[.!?]+)([\"'”’)\]]*)")
_SOFT = re.compile(r"[,;:](?=\s)|\s[—–-]{1,2}(?=\s)|—")
_NEWLINE = re.compile(r"\n")
_CONJ = re.compile(r"\s(?:" + "|".join(_CONJUNCTIONS) + r")\b", re.IGNORECASE)
_NUMBER = re.compile(r"^[$€£]?\d[\d,.]*%?$")

_WAIT = object()  # "the answer depends on characters that have not arrived yet"
_WORD = re.compile(r"\S+")


class TextSegmenter:
    """Incremental segmenter: `push(delta)` returns the segments completed by it; `finish()` the rest."""

    def __init__(self, config: SegmenterConfig | None = None) -> None:
        self.config = config or SegmenterConfig()
        self._text = ""  # everything pushed (responses are short; keeping it makes lookbehind trivial)
        self._start = 0  # where the pending segment begins
        self._clause_start = 0  # where the clause rules measure from (a lead-in does not move it)
        self._first_clause = True  # the clause rules of the first clause apply
        self._lead_open = self.config.lead_in  # a lead-in may still be cut
        self._index = 0

    @property
    def pending(self) -> str:
        return self._text[self._start :]

    @property
    def text(self) -> str:
        return self._text

    def push(self, delta: str) -> list[Segment]:
        self._text += delta
        return self._drain(at_end=False)

    def finish(self) -> list[Segment]:
        """End of stream: everything decidable is cut, and the remainder (if any) is the last segment."""
        out = self._drain(at_end=True)
        if self._start < len(self._text):
            out.append(self._emit(len(self._text), "end"))
        return out

    # --- internals ---------------------------------------------------------------------------------

    def _drain(self, at_end: bool) -> list[Segment]:
        out: list[Segment] = []
        while True:
            cut = self._find_cut(at_end)
            if cut is None:
                return out
            out.append(self._emit(*cut))

    def _emit(self, end: int, reason: SegmentReason) -> Segment:
        seg = Segment(self._text[self._start : end], self._start, end, self._index, reason)
        self._start, self._index = end, self._index + 1
        self._lead_open = False  # only the very first segment may be a lead-in
        if reason != "lead":
            self._clause_start, self._first_clause = end, False
        log.debug("segment %d (%s): %r", seg.index, reason, seg.text)
        return seg

    def _find_cut(self, at_end: bool) -> tuple[int, SegmentReason] | None:
        cut, wait_at = self._clause_cut(at_end)
        if cut is None and self._lead_open and not at_end:
            lead = self._lead_in_cut(wait_at)
            if lead is not None:
                return lead, "lead"
        return cut

    def _clause_cut(self, at_end: bool) -> tuple[tuple[int, SegmentReason] | None, int | None]:
        """The next cut by the clause rules, and where an undecided period holds them up (else None)."""
        base = self._clause_start
        text = self._text[base:]
        skip = self._start - base  # the lead-in already emitted, when there is one
        first = self._first_clause
        min_chars = self.config.first_min_chars if first else self.config.min_chars
        max_chars = self.config.first_max_chars if first else self.config.max_chars

        # (position, kind, match): kind 0 = terminal punctuation, 1 = newline, 2 = clause break
        candidates: list[tuple[int, int, re.Match[str]]] = []
        candidates += [(m.start(), 0, m) for m in _TERMINAL.finditer(text)]
        candidates += [(m.start(), 1, m) for m in _NEWLINE.finditer(text)]
        candidates += [(m.start(), 2, m) for m in _SOFT.finditer(text)]
        candidates.sort(key=lambda c: (c[0], c[1]))

        for pos, kind, m in candidates:
            if pos < skip or not _has_words(text[skip:pos]):
                continue  # never emit a segment with nothing to say; let it join the next one
            if kind == 0:
                decision = self._sentence_end(base, m, at_end)
                if decision is _WAIT:
                    return None, base + pos  # a later cut must not overtake an undecided earlier one
                if decision:
                    return (base + m.end(), "sentence"), None
            elif kind == 1:
                return (base + m.end(), "sentence"), None
            elif len(text[:pos].strip()) >= min_chars:
                return (base + m.end(), "clause"), None

        if len(text) > max_chars:
            cut = _length_cut(text, max_chars, min_chars, skip)
            if cut is not None:
                return (base + cut, "length"), None
        return None, None

    def _lead_in_cut(self, limit: int | None) -> int | None:
        """Where the first few words end at a natural break, if they are complete and end before `limit`.

        Called while no segment was emitted yet (so the pending text is the whole answer so far).
        Closes the lead-in for good once more complete words than allowed arrived without a break.
        """
        cfg, text = self.config, self._text
        words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        count = 0
        for i, (ws, we) in enumerate(words):
            if we >= len(text):
                return None  # this word may still grow ("capital" -> "capitals")
            word = text[ws:we]
            if not _has_words(word):
                continue  # a lone symbol ("$", "-") is no word of its own
            count += 1
            if count > cfg.lead_in_max_words:
                self._lead_open = False
                return None
            if limit is not None and we > limit:
                return None  # an undecided period comes first
            if count < cfg.lead_in_min_words or not _balanced(text[:we]):
                continue
            cut = None
            if word[-1] in ",;:":
                cut = we  # "I'm sorry," / "Hello there,"
            elif not word[-1].isalnum():
                continue  # "Dr.", "3.", closing quotes after a period: not a break
            elif i + 1 < len(words) and words[i + 1][1] < len(text):
                nxt = text[words[i + 1][0] : words[i + 1][1]].lower()
                prev = word.lower().lstrip("\"'“‘([")
                bound = nxt == "of" and prev in _BOUND_TO_OF
                if nxt in _BREAK_BEFORE and prev not in _NO_BREAK_AFTER and not bound:
                    cut = we  # "The capital| of France": the space starts the next segment
            if cut is not None:
                if len(text[cut:].split()) > 2:
                    # More than the word that shows the break has arrived with it: the text came in
                    # bulk (a `say`, a continuation), so there is no first clause to wait for.
                    self._lead_open = False
                    return None
                return cut
        return None

    def _sentence_end(self, base: int, m: re.Match[str], at_end: bool) -> object:
        """True/False: does the terminal punctuation in `m` end a sentence; `_WAIT`: cannot tell yet."""
        text = self._text
        punct, quotes = m.group(1), m.group(2)
        after = base + m.end()
        if after >= len(text):
            return True if at_end else _WAIT
        if not text[after].isspace():
            # "3.14", "e.g", "U.S", "example.com": a sentence only ends before whitespace.
            return False
        nxt = _next_word(text, after)
        undecided: object = True if at_end else _WAIT  # what to answer when the next word is needed
        is_ellipsis = punct == "…" or punct.startswith("..")
        if is_ellipsis:
            # "Well... I think so." ends a sentence; "I was... tired" does not.
            return undecided if nxt is None else nxt[0][:1].isupper()
        if quotes:
            # '"Stop!" he said' continues the sentence; '"Stop!" Then' does not.
            if nxt is None:
                return undecided
            if nxt[0][:1].islower():
                return False
        if "!" in punct or "?" in punct:
            return True
        # a single period: it depends on the word before it
        word_start = _word_start(text, base + m.start())
        word = text[word_start : base + m.start()].lstrip("\"'“‘([").lower()
        if word in _TITLES or word in _CONTINUING:
            return at_end and nxt is None  # "Dr. Smith", "e.g. this"
        if _NUMBER.match(word):
            line_before = text[:word_start].rstrip(" \t")
            return not (line_before == "" or line_before.endswith("\n"))  # "1. First item" is a list marker
        if _ambiguous_word(word):
            # "Jan. 5", "U.S. Army" continue; "at 5 p.m. Then" does not: decide on the next word.
            if nxt is None or (not nxt[1] and not at_end):
                return undecided
            return nxt[0][:1].isupper() and nxt[0].lower() in _OPENERS
        return True


def _has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _balanced(text: str) -> bool:
    """No quote or bracket left open in `text` (a lead-in never ends inside a quotation)."""
    for a, b in _OPEN_CLOSE:
        opened = text.count(a) % 2 if a == b else text.count(a) - text.count(b)
        if opened > 0:
            return False
    return True


def _ambiguous_word(word: str) -> bool:
    """Abbreviation-like words that may or may not end a sentence: 'Jan', 'etc', 'U.S', 'J' (initial)."""
    if word in _AMBIGUOUS:
        return True
    if len(word) == 1 and word.isalpha():
        return True  # an initial: "J. K. Rowling"
    return "." in word and all(len(p) <= 2 and p.isalpha() for p in word.split("."))  # "u.s", "a.m"


def _word_start(text: str, end: int) -> int:
    i = end
    while i > 0 and not text[i - 1].isspace():
        i -= 1
    return i


def _next_word(text: str, pos: int) -> tuple[str, bool] | None:
    """The next word after `pos` (skipping spaces and opening quotes), and whether it is complete."""
    i = pos
    while i < len(text) and (text[i].isspace() or text[i] in "\"'“‘(["):
        i += 1
    if i >= len(text):
        return None
    j = i
    while j < len(text) and (text[j].isalnum() or text[j] in "'’"):
        j += 1
    if j == i:
        return text[i], True  # a symbol or punctuation
    return text[i:j], j < len(text)


def _length_cut(text: str, max_chars: int, min_chars: int, skip: int = 0) -> int | None:
    """Where to cut a clause that ran past `max_chars`: last clause break, conjunction, or space.

    Only cuts that leave words after `skip` (the end of a lead-in already emitted) qualify.
    """
    window = text[: max_chars + 1]
    floor = min(min_chars, max_chars // 3)

    def ok(p: int) -> bool:
        return p > skip and _has_words(window[skip:p])

    soft = [m.end() for m in _SOFT.finditer(window)]
    soft = [p for p in soft if len(window[:p].strip()) >= floor and ok(p)]
    if soft:
        return soft[-1]
    conj = [m.start() for m in _CONJ.finditer(window) if len(window[: m.start()].strip()) >= floor and ok(m.start())]
    if conj:
        return conj[-1]
    spaces = [m.start() for m in re.finditer(r"\s", window) if ok(m.start())]
    if spaces:
        return spaces[-1]
    # one huge token (a URL?): cut at the first space after it, or wait for one
    m = re.search(r"\s", text[max_chars:])
    return max_chars + m.start() if m else None


def segment_text(text: str, config: SegmenterConfig | None = None) -> list[Segment]:
    """Segment a complete text in one go (same cuts as streaming it)."""
    seg = TextSegmenter(config)
    return seg.push(text) + seg.finish()
