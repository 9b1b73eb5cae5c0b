"""TextSegmenter: clause cuts for streamed TTS, identical however the text is split into deltas."""
from __future__ import annotations

import random
import zlib

import pytest

from rejoinder.streaming.streamed_tts import speech_text
from rejoinder.streaming.text_segmenter import SegmenterConfig, TextSegmenter, segment_text

# (input, expected segments after .strip()). Defaults of SegmenterConfig apply.
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


def _stream(deltas: list[str], config: SegmenterConfig | None = None) -> list[str]:
    seg = TextSegmenter(config)
    out = []
    for d in deltas:
        out += seg.push(d)
    out += seg.finish()
    return [s.text for s in out]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0][:40] for c in CASES])
def test_segmentation_table(text: str, expected: list[str]) -> None:
    whole = [s.text for s in segment_text(text)]
    assert [t.strip() for t in whole] == expected
    assert "".join(whole) == text  # segments are contiguous slices of the input


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0][:40] for c in CASES])
def test_same_cuts_for_any_split(text: str, expected: list[str]) -> None:
    rng = random.Random(zlib.crc32(text.encode()))
    for _ in range(30):
        assert [t.strip() for t in _stream(_random_split(text, rng))] == expected
    # the extreme splits: one character at a time, and LLM-like word pieces with leading spaces
    assert [t.strip() for t in _stream(list(text))] == expected


def test_llm_like_tokens_example() -> None:
    tokens = ["Dr", ".", " Sm", "ith", " paid", " $", "3", ".", "50", " on", " Jan", ".", " ", "5", ".", " Then", " he",
              " left", "."]
    seg = TextSegmenter()
    emitted_at: list[tuple[int, str]] = []
    for i, tok in enumerate(tokens):
        emitted_at += [(i, s.text) for s in seg.push(tok)]
    emitted_at += [(len(tokens), s.text) for s in seg.finish()]
    assert [t for _, t in emitted_at] == ["Dr. Smith paid $3.50 on Jan. 5.", " Then he left."]
    # the first sentence is released as soon as " Then" shows the period after "5" ends it
    assert emitted_at[0][0] == tokens.index(" Then")


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


def test_non_speakable_text_joins_the_next_segment() -> None:
    segs = segment_text("...\n\nHello there. Bye.")
    assert segs[0].speakable and segs[0].text.strip().endswith("Hello there.")


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SegmenterConfig(first_min_chars=80, first_max_chars=40)


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
