"""Cutting words into subtitle cues, and the JSON rendering of timed words."""

from __future__ import annotations

import json

from transcription.transcript import (
    MAX_CUE_CHARS,
    Segment,
    TranscriptResult,
    Word,
    cues,
    text_of,
    to_json,
)


def words_of(text: str, start: float = 0.0) -> list[Word]:
    return [Word(" " + w, start + i, start + i + 0.5) for i, w in enumerate(text.split())]


def test_each_sentence_is_a_cue() -> None:
    runs = cues(words_of('One two. "Three four?" Five'))
    assert [text_of(r) for r in runs] == ["One two.", '"Three four?"', "Five"]


def test_a_long_sentence_is_cut_after_a_late_comma_or_else_at_the_last_word_that_fits() -> None:
    clause = "word " * 12
    runs = cues(words_of(f"{clause.strip()}, and then {clause}again and again until it ends."))
    texts = [text_of(r) for r in runs]
    assert all(len(t) <= MAX_CUE_CHARS for t in texts), texts
    assert texts[0].endswith("word,")
    assert " ".join(texts) == text_of(
        words_of(f"{clause.strip()}, and then {clause}again and again until it ends.")
    )

    no_commas = cues(words_of("abcdefghi " * 20))
    assert [len(text_of(r)) for r in no_commas] == [79, 79, 39]


def test_json_segments_carry_their_words_rounded_and_old_segments_none() -> None:
    timed = Segment(
        0,
        0.5,
        1.5,
        "Hi there.",
        words=(Word(" Hi", 0.5, 0.91234, 0.987654), Word(" there.", 1.0, 1.5)),
    )
    untimed = Segment(1, 2.0, 3.0, "Bye.")
    stored = json.loads(to_json(TranscriptResult([timed, untimed], "en", 3.0)))
    assert stored["segments"][0]["words"] == [
        {"word": "Hi", "start": 0.5, "end": 0.912, "probability": 0.9877},
        {"word": "there.", "start": 1.0, "end": 1.5},
    ]
    assert "words" not in stored["segments"][1]
