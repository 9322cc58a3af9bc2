"""What a submission may ask of its job, checked alike by the gateway and by ``whisperctl
submit`` (which refuses a wrong value before the upload rather than after it)."""

from __future__ import annotations

import re

from transcription.errors import InvalidRequest
from transcription.states import Mode

LANGUAGE = re.compile(r"^[a-z]{2,3}$")
MAX_PROMPT_CHARS = 2000


def check_language(value: str | None) -> str | None:
    """The ISO 639 code in lower case, None when not given."""
    language = (value or "").strip().lower() or None
    if language is not None and not LANGUAGE.match(language):
        raise InvalidRequest(
            "language must be an ISO-639-1 code such as 'en' or 'de'.", param="language"
        )
    return language


def check_prompt(value: str | None) -> str | None:
    prompt = value or None
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"prompt is limited to {MAX_PROMPT_CHARS} characters.", param="prompt")
    return prompt


def check_word_timestamps(value: str | None) -> bool:
    """Whether to time each word: on unless the form says ``false``."""
    given = (value or "true").strip().lower()
    if given not in ("true", "false"):
        raise InvalidRequest("word_timestamps must be 'true' or 'false'.", param="word_timestamps")
    return given == "true"


def check_mode(value: str | None) -> Mode:
    mode = (value or Mode.FAST.value).strip().lower()
    if mode not in {m.value for m in Mode}:
        raise InvalidRequest("mode must be 'fast' or 'accurate'.", param="mode")
    return Mode(mode)
