"""TextSegmenter: clause cuts for streamed TTS, identical however the text is split into deltas, and the
lead-in: the first few words released at a natural break while the first clause is still arriving."""
from __future__ import annotations

import random
import re
import zlib

import pytest

from rejoinder.streaming.streamed_tts import speech_text
from rejoinder.streaming.text_segmenter import Segment, SegmenterConfig, TextSegmenter, segment_text

CLAUSES = SegmenterConfig.clause_only()

# (input, expected segments after .strip()) by the clause rules (no lead-in).
CASES: list[tuple[str, list[str]]] = [
    ("Dr. Smith paid $3.50 on Jan. 5. Then he left.", ["Dr. Smith paid $3.50 on Jan. 5.", "Then he left."]),
    ("Hello. How are you? I am fine!", ["Hello.", "How are you?", "I am fine!"]),
    ("Mr. and Mrs. Jones arrived. They sat down.", ["Mr. and Mrs. Jones arrived.", "They sat down."]),
    ("Use a tool, e.g. a hammer. It works.", ["Use a tool, e.g. a hammer.", "It works."]),
    ("That is, i.e. the best one. Yes.", ["That is, i.e. the best one.", "Yes."]),
    ("I live in the U.S. It is big.", ["I live in the U.S.", "It is big."]),
    ("The U.S. Army is large. Indeed.", ["The U.S. Army is large.", "Indeed."]),
    ("Pi is about 3.14 in short. Right.", ["Pi is about 3.14 in short.", "Right."]),
    ("It costs 1,000 dollars. Fine.", ["It costs 1,000 dollars.", "Fine."]),
    ("We met at 5 p.m. Then we ate.", ["We met at 5 p.m.", "Then we ate."]),
    ("We met at 5 p.m. on Monday. Good.", ["We met at 5 p.m. on Monday.", "Good."]),
    ("Get milk, etc. Then cook.", ["Get milk, etc.", "Then cook."]),
    ("Get milk, eggs, etc. and then cook.", ["Get milk, eggs, etc. and then cook."]),
    ("Well... I think so. Sure.", ["Well...", "I think so.", "Sure."]),
    ("I was… tired. Yes.", ["I was… tired.", "Yes."]),
    ("I was... very tired. Yes.", ["I was... very tired.", "Yes."]),
    ('"Stop!" he said. Then he ran.', ['"Stop!" he said.', "Then he ran."]),
    ('He said "Stop." Then he ran.', ['He said "Stop."', "Then he ran."]),
    ("Really?! Wow.", ["Really?!", "Wow."]),
    ("J. K. Rowling wrote it. Yes.", ["J. K. Rowling wrote it.", "Yes."]),
    ("Steps:\n1. Open the box.\n2. Close it.", ["Steps:", "1. Open the box.", "2. Close it."]),
    ("Visit example.com today. Bye.", ["Visit example.com today.", "Bye."]),
    ("It is 3:30 now. Go.", ["It is 3:30 now.", "Go."]),
    ("No. I will not.", ["No.", "I will not."]),
    ("Ends without punctuation", ["Ends without punctuation"]),
    ("Trailing abbreviation at the end is fine, Dr.", ["Trailing abbreviation at the end is fine,", "Dr."]),
    # first clause: a comma is enough once the clause has first_min_chars (16)
    ("Sure thing, my friend, here you go.", ["Sure thing, my friend,", "here you go."]),
    # later clauses need min_chars (48) before a comma may end them
    (
        "Hi. Then we went home, ate dinner, and slept until noon.",
        ["Hi.", "Then we went home, ate dinner, and slept until noon."],
    ),
    # a run-on first clause is cut at a conjunction before first_max_chars (64)
    (
        "This is a very long sentence without any punctuation that goes on and on until the segmenter must cut it",
        [
            "This is a very long sentence without any punctuation",
            "that goes on and on until the segmenter must cut it",
        ],
    ),
]


def _random_split(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        k = rng.choice([1, 1, 2, 3, 4, 5, 7])
        out.append(text[i : i + k])
        i += k
    return out


def _segments(deltas: list[str], config: SegmenterConfig | None = None) -> list[Segment]:
    seg = TextSegmenter(config)
    out = []
    for d in deltas:
        out += seg.push(d)
    out += seg.finish()
    return out


def _stream(deltas: list[str], config: SegmenterConfig | None = None) -> list[str]:
    return [s.text for s in _segments(deltas, config)]


_LLM_PIECE = re.compile(r"'(?:s|t|re|ve|m|ll|d)\b| ?[A-Za-z]+| ?\d| ?[^\sA-Za-z\d]+|\s+")


def llm_tokens(text: str) -> list[str]:
    """Pieces the way SmolLM2's tokenizer cuts text: words with their leading space, one digit at a
    time, punctuation runs, contractions apart ("Dr", ".", " Smith", " $", "3", ".", "5", "0")."""
    out = _LLM_PIECE.findall(text)
    assert "".join(out) == text
    return out


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0][:40] for c in CASES])
def test_segmentation_table(text: str, expected: list[str]) -> None:
    whole = [s.text for s in segment_text(text, CLAUSES)]
    assert [t.strip() for t in whole] == expected
    assert "".join(whole) == text  # segments are contiguous slices of the input
    # text that arrives in one piece has nothing to wait for: no lead-in, the same cuts by default
    assert [s.text for s in segment_text(text)] == whole


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0][:40] for c in CASES])
def test_same_cuts_for_any_split(text: str, expected: list[str]) -> None:
    rng = random.Random(zlib.crc32(text.encode()))
    for _ in range(30):
        assert [t.strip() for t in _stream(_random_split(text, rng), CLAUSES)] == expected
    # the extreme splits: one character at a time, and LLM-like word pieces with leading spaces
    assert [t.strip() for t in _stream(list(text), CLAUSES)] == expected
    assert [t.strip() for t in _stream(llm_tokens(text), CLAUSES)] == expected


# (answer, the lead-in it starts with when streamed token by token, or None: no natural break in
# its first 2-5 words, so the first segment is its first clause, as without lead-ins)
LEAD_CASES: list[tuple[str, str | None]] = [
    ("Sure, the capital of France is Paris.", "Sure, the capital"),  # "Sure," alone is one word
    ("The capital of France is Paris.", "The capital"),
    ("Paris.", None),
    ("It is about 384,400 kilometres from the Earth.", "It is about 384,400 kilometres"),
    ("It costs $3.50 per month.", "It costs $3.50"),
    ("It is 42, as you know.", "It is 42,"),
    ("The answer is 42, which is famous.", None),  # the clause rules cut there already (16 chars)
    ("Dr. Smith works at the hospital in town.", "Dr. Smith works"),  # never after a title
    ("Mr. and Mrs. Jones arrived at the party late.", "Mr. and Mrs. Jones arrived"),
    ('He said "hello" to me and left the room.', 'He said "hello" to me'),
    ('"Stop!" he said, and he ran away.', '"Stop!" he said,'),
    ("She said “see you at noon” and left.", None),  # the break inside the quote is no break
    ("I'm sorry, but I can't help with that.", "I'm sorry,"),
    ("Hello there, how are you today, my friend?", "Hello there,"),
    ("Yes, of course, I can do that for you.", "Yes, of course,"),
    ("The weather is lovely today and the park is full.", "The weather is lovely today"),
    ("There are a lot of reasons for that.", None),  # "a lot | of" binds; the next break is word 6
    ("I think the answer is forty two.", None),
    ("Well, I think so too.", None),  # "so" is not cut off: "I think | so" would be no break
    ("Sure! Here is a short poem about the sea.", None),  # a sentence of its own comes first
]
_LEAD_IDS = [c[0][:40] for c in LEAD_CASES]


@pytest.mark.parametrize(("text", "lead"), LEAD_CASES, ids=_LEAD_IDS)
def test_lead_in_table(text: str, lead: str | None) -> None:
    segs = _segments(llm_tokens(text))
    assert "".join(s.text for s in segs) == text
    for s in segs:
        assert text[s.start : s.end] == s.text
    assert [s.index for s in segs] == list(range(len(segs)))
    leads = [s for s in segs if s.reason == "lead"]
    if lead is None:
        assert leads == []
        assert [s.text for s in segs] == _stream(llm_tokens(text), CLAUSES)
    else:
        assert [s.index for s in leads] == [0] and segs[0].text.strip() == lead
        assert 2 <= len(lead.split()) <= 5
        # after the lead-in, the cuts are exactly the clause rules' cuts
        clause_cuts = {s.end for s in _segments(llm_tokens(text), CLAUSES)}
        assert {s.end for s in segs} == clause_cuts | {segs[0].end}


_WITH_LEAD = [c for c in LEAD_CASES if c[1]]


@pytest.mark.parametrize(("text", "lead"), _WITH_LEAD, ids=[c[0][:40] for c in _WITH_LEAD])
def test_lead_in_released_as_soon_as_its_words_are_complete(text: str, lead: str) -> None:
    tokens = llm_tokens(text)
    seg, pushed, released_at = TextSegmenter(), "", None
    for i, tok in enumerate(tokens):
        pushed += tok
        out = seg.push(tok)
        if out and released_at is None:
            released_at = i
            assert out[0].reason == "lead" and out[0].text.strip() == lead
            # released with at most the next word (the one that shows the break) past it
            assert len(pushed[out[0].end :].split()) <= 2, pushed
    assert released_at is not None
    # ... long before the clause rules release anything
    clause = TextSegmenter(CLAUSES)
    clause_at = next((i for i, tok in enumerate(tokens) if clause.push(tok)), len(tokens))
    assert released_at < clause_at


@pytest.mark.parametrize(("text", "lead"), LEAD_CASES, ids=_LEAD_IDS)
def test_lead_in_cuts_for_any_split(text: str, lead: str | None) -> None:
    """However the text is split, the cuts are the clause rules' cuts, plus at most one lead-in, and
    the lead-in, whenever there is one, ends at the same place."""
    clause_cuts = {s.end for s in segment_text(text, CLAUSES)}
    lead_end = text.index(lead) + len(lead) if lead else None
    rng = random.Random(zlib.crc32(text.encode()))
    splits = [_random_split(text, rng) for _ in range(30)] + [list(text), llm_tokens(text)]
    for deltas in splits:
        segs = _segments(deltas)
        assert "".join(s.text for s in segs) == text
        leads = [s for s in segs if s.reason == "lead"]
        assert len(leads) <= 1 and all(s.index == 0 for s in leads)
        assert {s.end for s in segs if s.reason != "lead"} == clause_cuts
        if leads:
            assert leads[0].end == lead_end
    # one character at a time always finds the lead-in
    assert (_segments(list(text))[0].reason == "lead") == (lead is not None)


def test_lead_in_limits() -> None:
    text = "The capital of France is Paris."
    assert _stream(llm_tokens(text), SegmenterConfig(lead_in_min_words=3)) == [text]  # "The capital" is 2
    assert _stream(llm_tokens("Sure, the capital of France."), SegmenterConfig(lead_in_min_words=1))[0] == "Sure,"
    # the next break after word 5 is no lead-in
    long = "One two three four five six of them went home."
    assert [s.reason for s in _segments(llm_tokens(long))] == ["sentence"]
    assert not CLAUSES.lead_in and SegmenterConfig().lead_in


def test_llm_like_tokens_example() -> None:
    tokens = ["Dr", ".", " Sm", "ith", " paid", " $", "3", ".", "50", " on", " Jan", ".", " ", "5", ".", " Then", " he",
              " left", "."]
    seg = TextSegmenter(CLAUSES)
    emitted_at: list[tuple[int, str]] = []
    for i, tok in enumerate(tokens):
        emitted_at += [(i, s.text) for s in seg.push(tok)]
    emitted_at += [(len(tokens), s.text) for s in seg.finish()]
    assert [t for _, t in emitted_at] == ["Dr. Smith paid $3.50 on Jan. 5.", " Then he left."]
    # the first sentence is released as soon as " Then" shows the period after "5" ends it
    assert emitted_at[0][0] == tokens.index(" Then")


def test_llm_like_tokens_example_with_lead_in() -> None:
    tokens = ["Dr", ".", " Sm", "ith", " paid", " $", "3", ".", "50", " on", " Jan", ".", " ", "5", ".", " Then", " he",
              " left", "."]
    seg = TextSegmenter()
    emitted_at: list[tuple[int, str]] = []
    for i, tok in enumerate(tokens):
        emitted_at += [(i, s.text) for s in seg.push(tok)]
    emitted_at += [(len(tokens), s.text) for s in seg.finish()]
    assert [t for _, t in emitted_at] == ["Dr. Smith paid $3.50", " on Jan. 5.", " Then he left."]
    # "on" is complete (" Jan" began) and the undecided "3." was settled by "50"
    assert emitted_at[0][0] == tokens.index(" Jan")


def test_plain_sentence_released_without_waiting_for_next_word() -> None:
    seg = TextSegmenter()
    assert seg.push("It works.") == []  # cannot know yet: "works.com"?
    out = seg.push(" ")
    assert [s.text for s in out] == ["It works."]


def test_offsets_and_indices() -> None:
    text = "One two three. Four five six! Seven."
    segs = segment_text(text)
    assert [s.index for s in segs] == [0, 1, 2]
    for s in segs:
        assert text[s.start : s.end] == s.text
    assert [s.reason for s in segs] == ["sentence", "sentence", "sentence"]


def test_max_length_bounds_every_segment() -> None:
    rng = random.Random(7)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    text = " ".join(rng.choice(words) for _ in range(400))
    cfg = SegmenterConfig()
    segs = [s.strip() for s in _stream(_random_split(text, rng), cfg)]
    assert len(segs[0]) <= cfg.first_max_chars
    assert all(len(s) <= cfg.max_chars for s in segs)
    assert " ".join(segs) == text  # words are never cut in half


def test_run_on_first_clause_after_a_lead_in_is_cut_by_the_clause_limits() -> None:
    text = "The capital of " + " ".join(["many old towns and fields"] * 8) + "."
    cfg = SegmenterConfig()
    segs = _segments(llm_tokens(text), cfg)
    assert segs[0].reason == "lead" and segs[0].text == "The capital"
    assert segs[1].reason == "length" and segs[1].end <= cfg.first_max_chars + 1  # measured from the answer start
    assert [s.end for s in segs[1:]] == [s.end for s in _segments(llm_tokens(text), CLAUSES)]
    assert "".join(s.text for s in segs) == text


def test_non_speakable_text_joins_the_next_segment() -> None:
    segs = segment_text("...\n\nHello there. Bye.")
    assert segs[0].speakable and segs[0].text.strip().endswith("Hello there.")


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SegmenterConfig(first_min_chars=80, first_max_chars=40)
    with pytest.raises(ValueError):
        SegmenterConfig(lead_in_min_words=4, lead_in_max_words=2)
    with pytest.raises(ValueError):
        SegmenterConfig(lead_in_min_words=0)
    assert SegmenterConfig.clause_only(min_chars=30).min_chars == 30


@pytest.mark.parametrize(
    ("raw", "spoken"),
    [
        ("Dr. Smith is **here**.", "Dr  Smith is   here  ."),
        ("In the U.S. Army, e.g. now.", "In the U S  Army, e.g. now."),
        ("We met on Jan.", "We met on Jan."),  # a clause-final period stays
        ("`code` and # heading", " code  and   heading"),
    ],
)
def test_speech_text_is_length_preserving(raw: str, spoken: str) -> None:
    assert speech_text(raw) == spoken
    assert len(speech_text(raw)) == len(raw)
