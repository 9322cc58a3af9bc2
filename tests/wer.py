"""Word error rate after normalising case and punctuation, shared by transcription tests."""

from __future__ import annotations

import re

import jiwer


def normalise(text: str) -> str:
    """Lowercase, drop punctuation (keeping in-word apostrophes) and collapse whitespace."""
    words = re.sub(r"[^\w\s']|(?<!\w)'|'(?!\w)", " ", text.lower()).split()
    return " ".join(words)


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate of ``hypothesis`` against ``reference``, both normalised first."""
    return float(jiwer.wer(normalise(reference), normalise(hypothesis)))
