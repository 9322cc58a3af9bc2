"""Transcription through the OpenAI API or any OpenAI-compatible server, in chunks.

The API refuses files over 25 MB, so the audio is cut at quiet points into pieces under a size
and a duration limit (see ``transcriber.mp3chunks``), which are sent concurrently. Each piece
is prompted with the end of the previous piece's text when that text is known by the time the
piece is sent: always in ``accurate`` mode, which sends one piece at a time, and in ``fast`` mode
whenever the previous piece has already finished (or was finished by an earlier attempt).
Retries with exponential backoff, jitter and ``Retry-After`` are the SDK's own (``max_retries``).
Each finished piece is saved as a checkpoint, so a job that runs again sends only what is missing.
Whisper models are asked for word and segment timestamps (words unless the job declines them); a
server that answers without words leaves segments only.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import openai

from transcriber.engines.base import Checkpoints, ProgressCallback
from transcriber.mp3chunks import Chunk, plan_chunks, write_chunk
from transcription import metrics
from transcription.errors import EngineUnavailable, TranscriptionFailed
from transcription.states import Mode
from transcription.transcript import Segment, TranscriptResult, Word

DEFAULT_MODEL = "whisper-1"
PROMPT_CHARS = 800
"""Whisper reads only the last 224 tokens of a prompt (about 4 characters each)."""
TAIL_CHARS = 500
"""How much of the previous piece's text is carried into the next piece's prompt."""

_CHECKPOINT_VERSION = 1
_LANGUAGE_CHARS = 16  # the job's language column

ResponseFormat = Literal["json", "verbose_json"]


def response_format_for(model: str) -> ResponseFormat:
    """``verbose_json`` (with timed segments) for Whisper models; the gpt-4o transcription
    models answer ``json`` only."""
    return "json" if model.startswith("gpt-") else "verbose_json"


@dataclass
class ChunkText:
    """What the server said about one piece, with times already global; saved as a checkpoint."""

    index: int
    key: str
    start: float
    end: float
    text: str
    language: str | None
    segments: list[dict[str, Any]]  # a record saved before words were asked for has none
    previous_text: bool = False

    def to_json(self) -> bytes:
        return json.dumps({"version": _CHECKPOINT_VERSION, **asdict(self)}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ChunkText | None:
        """The saved piece, or None if the record is unreadable or from another format."""
        try:
            record = json.loads(data)
            if record.pop("version", None) != _CHECKPOINT_VERSION:
                return None
            return cls(**record)
        except (ValueError, TypeError):
            return None


@dataclass
class _Run:
    """One job's state shared by the threads sending its pieces."""

    audio: Path
    chunks: list[Chunk]
    keys: list[str]
    language: str | None
    prompt: str | None
    temperature: float | None
    words: bool
    scratch: Path
    checkpoints: Checkpoints | None
    texts: dict[int, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


class OpenAIEngine:
    """Sends the audio to an OpenAI-compatible transcription endpoint in concurrent chunks."""

    name = "openai"

    def __init__(
        self,
        model: str | None = None,
        *,
        api_key: str,
        base_url: str | None = None,
        max_chunk_bytes: int = 24 * 1024 * 1024,
        max_chunk_seconds: float = 600.0,
        parallelism: int = 4,
        max_retries: int = 5,
        timeout: float = 300.0,
    ) -> None:
        self.model = model or DEFAULT_MODEL
        self.max_chunk_bytes = max_chunk_bytes
        self.max_chunk_seconds = max_chunk_seconds
        self.parallelism = max(1, parallelism)
        self.max_retries = max_retries
        self.timeout = timeout
        self.response_format = response_format_for(self.model)
        self.client = openai.OpenAI(
            api_key=api_key,
            base_url=base_url,
            max_retries=max_retries,
            timeout=timeout,
            http_client=_MeteredClient(timeout=timeout),
        )

    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        prompt: str | None = None,
        mode: Mode = Mode.FAST,
        on_progress: ProgressCallback | None = None,
        checkpoints: Checkpoints | None = None,
        temperature: float | None = None,
        word_timestamps: bool = True,
    ) -> TranscriptResult:
        """Transcribe ``audio`` chunk by chunk; ``accurate`` sends one chunk at a time so every
        chunk is prompted with the text before it, ``fast`` sends ``parallelism`` at once."""
        if mode not in tuple(Mode):
            raise ValueError(f"Unknown transcription mode {mode!r}; use 'fast' or 'accurate'.")
        chunks = plan_chunks(
            audio, max_bytes=self.max_chunk_bytes, max_seconds=self.max_chunk_seconds
        )
        keys = [self._key(chunk, language) for chunk in chunks]
        done = {
            piece.index: piece
            for piece in self._resume(chunks, keys, checkpoints)
            if piece is not None
        }
        resumed = len(done)
        report = on_progress or (lambda _seconds: None)
        report(sum(piece.end - piece.start for piece in done.values()))
        parallelism = 1 if mode == Mode.ACCURATE else self.parallelism
        with tempfile.TemporaryDirectory(prefix="whisper-chunks-") as scratch:
            run = _Run(
                audio,
                chunks,
                keys,
                language,
                prompt,
                temperature,
                word_timestamps,
                Path(scratch),
                checkpoints,
            )
            run.texts.update({index: piece.text for index, piece in done.items()})
            todo = [chunk for chunk in chunks if chunk.index not in done]

            def finished(piece: ChunkText) -> None:
                done[piece.index] = piece
                report(sum(p.end - p.start for p in done.values()))

            self._send_all(run, todo, parallelism, finished)
        ordered = [done[chunk.index] for chunk in chunks]
        return TranscriptResult(
            segments=_stitch(ordered),
            language=language or next((p.language for p in ordered if p.language), None) or "",
            duration=chunks[-1].end,
            model=self.model,
            mode=mode,
            extra={
                "chunks": len(chunks),
                "resumed_chunks": resumed,
                "chunks_prompted_with_previous_text": sum(p.previous_text for p in ordered),
                "parallelism": parallelism,
                "response_format": self.response_format,
                "max_chunk_bytes": self.max_chunk_bytes,
                "max_chunk_seconds": self.max_chunk_seconds,
            },
        )

    def _key(self, chunk: Chunk, language: str | None) -> str:
        """Identifies what a checkpoint is worth: the same bytes sent the same way."""
        what = [self.model, self.response_format, language, chunk.byte_start, chunk.byte_end]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:32]

    def _resume(
        self, chunks: list[Chunk], keys: list[str], checkpoints: Checkpoints | None
    ) -> Iterable[ChunkText | None]:
        if checkpoints is None:
            return
        for chunk, key in zip(chunks, keys, strict=True):
            data = checkpoints.load(_checkpoint_name(chunk))
            piece = ChunkText.from_json(data) if data is not None else None
            yield piece if piece is not None and piece.key == key else None

    def _send_all(
        self,
        run: _Run,
        todo: list[Chunk],
        parallelism: int,
        finished: Callable[[ChunkText], None],
    ) -> None:
        """Send ``todo`` on ``parallelism`` threads, calling ``finished`` (on this thread) as each
        chunk is done; on the first failure, here or in ``finished``, stop and re-raise."""
        if not todo:
            return
        with ThreadPoolExecutor(
            max_workers=min(parallelism, len(todo)), thread_name_prefix="openai-chunk"
        ) as pool:
            # Each in a copy of this thread's context, so what they log (the SDK's retries)
            # names the job.
            pending: set[Future[ChunkText]] = {
                pool.submit(contextvars.copy_context().run, self._send, run, c) for c in todo
            }
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        finished(future.result())
            finally:
                # Requests already in flight finish (and are checkpointed); no new one starts.
                run.stop.set()
                for future in pending:
                    future.cancel()

    def _send(self, run: _Run, chunk: Chunk) -> ChunkText:
        if run.stop.is_set():
            raise TranscriptionFailed("The transcription was stopped.")
        with run.lock:
            previous = run.texts.get(chunk.index - 1)
        path = run.scratch / f"chunk-{chunk.index:04d}.mp3"
        write_chunk(run.audio, chunk, path)
        try:
            with path.open("rb") as file:
                response = self._request(
                    file,
                    path.name,
                    run.language,
                    _prompt(run.prompt, previous),
                    run.temperature,
                    run.words,
                )
        except openai.OpenAIError as exc:
            raise self._failure(exc, chunk, len(run.chunks)) from exc
        finally:
            path.unlink(missing_ok=True)
        piece = _piece(response, chunk, run.keys[chunk.index], previous is not None)
        with run.lock:
            run.texts[chunk.index] = piece.text
        if run.checkpoints is not None:
            run.checkpoints.save(_checkpoint_name(chunk), piece.to_json())
        return piece

    def _request(
        self,
        file: Any,
        name: str,
        language: str | None,
        prompt: str | None,
        temperature: float | None,
        words: bool,
    ) -> Any:
        options: dict[str, Any] = {}
        if language:
            options["language"] = language
        if prompt:
            options["prompt"] = prompt
        if temperature is not None:
            options["temperature"] = temperature
        if self.response_format == "verbose_json":
            options["timestamp_granularities"] = ["word", "segment"] if words else ["segment"]
        return self.client.audio.transcriptions.create(
            file=(name, file, "audio/mpeg"),
            model=self.model,
            response_format=self.response_format,
            **options,
        )

    def _failure(self, exc: openai.OpenAIError, chunk: Chunk, count: int) -> EngineUnavailable:
        """A message that says what went wrong with which part, once the retries are spent."""
        part = f"part {chunk.index + 1} of {count} ({_clock(chunk.start)}-{_clock(chunk.end)})"
        tries = f"{self.max_retries + 1} attempt{'s' if self.max_retries else ''}"
        server = "The transcription API"
        if isinstance(exc, openai.APITimeoutError):
            return EngineUnavailable(
                f"{server} did not answer {part} within {self.timeout:g} s ({tries}).",
                code="engine_timeout",
            )
        if isinstance(exc, openai.APIConnectionError):
            return EngineUnavailable(
                f"{server} could not be reached at {self.client.base_url} for {part} ({tries}).",
                code="engine_unreachable",
            )
        if isinstance(exc, openai.RateLimitError):
            return EngineUnavailable(
                f"{server} kept answering 429 (rate limited) for {part} ({tries}): {_said(exc)}",
                code="engine_rate_limited",
            )
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            return EngineUnavailable(
                f"{server} refused the configured API key ({exc.status_code}): {_said(exc)}",
                code="engine_unauthorized",
            )
        if isinstance(exc, openai.APIStatusError) and exc.status_code == 413:
            return EngineUnavailable(
                f"{server} refused {part} ({chunk.size / 1e6:.1f} MB) as too large (413); "
                "lower WHISPER_OPENAI_MAX_CHUNK_BYTES.",
                code="engine_rejected",
            )
        if isinstance(exc, openai.APIStatusError) and exc.status_code >= 500:
            return EngineUnavailable(
                f"{server} kept failing with HTTP {exc.status_code} for {part} ({tries}): "
                f"{_said(exc)}",
                code="engine_unavailable",
            )
        if isinstance(exc, openai.APIStatusError):
            return EngineUnavailable(
                f"{server} refused {part} with HTTP {exc.status_code}: {_said(exc)}",
                code="engine_rejected",
            )
        return EngineUnavailable(f"{server} failed on {part}: {exc}", code="engine_error")


class _MeteredClient(openai.DefaultHttpxClient):
    """The SDK's HTTP client, counting each request it sends (every retry is one) by its
    answer's status, and the bytes sent."""

    # Typed loosely: the SDK's HTTP library is httpx or, in later versions, httpx2.
    def send(self, request: Any, **kwargs: Any) -> Any:
        if int(request.headers.get("x-stainless-retry-count") or 0) > 0:
            metrics.OPENAI_RETRIES.inc()
        metrics.OPENAI_BYTES_SENT.inc(int(request.headers.get("content-length") or 0))
        try:
            response = super().send(request, **kwargs)
        except Exception:
            metrics.OPENAI_REQUESTS.labels("error").inc()
            raise
        metrics.OPENAI_REQUESTS.labels(str(response.status_code)).inc()
        return response


def _checkpoint_name(chunk: Chunk) -> str:
    return f"{chunk.index}.json"


def _prompt(job_prompt: str | None, previous_text: str | None) -> str | None:
    """The job's prompt followed by the end of the previous piece's text, cut to what Whisper
    reads."""
    parts = [p.strip() for p in (job_prompt, _tail(previous_text or "", TAIL_CHARS)) if p]
    text = " ".join(p for p in parts if p)
    return _tail(text, PROMPT_CHARS) or None


def _tail(text: str, limit: int) -> str:
    """The end of ``text`` in at most ``limit`` characters, starting at a word."""
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    space = cut.find(" ")
    return cut[space + 1 :] if 0 <= space < len(cut) - 1 else cut


def _piece(response: Any, chunk: Chunk, key: str, previous_text: bool) -> ChunkText:
    """Turn the API's answer into global segments, each with the words that fall in it; an
    answer without segments (gpt-4o models) becomes one segment spanning the chunk."""
    text = str(getattr(response, "text", "") or "").strip()
    language = getattr(response, "language", None)
    raw = getattr(response, "segments", None) or []
    timed = [_timed_word(item, chunk) for item in getattr(response, "words", None) or []]
    segments: list[dict[str, Any]] = []
    for item in raw:
        words = str(_field(item, "text") or "").strip()
        if not words:
            continue
        start = chunk.start + float(_field(item, "start") or 0.0)
        end = min(chunk.start + float(_field(item, "end") or 0.0), chunk.end)
        segments.append(
            {
                "start": round(min(start, chunk.end), 3),
                "end": round(max(end, start), 3),
                "text": words,
                **{
                    name: _number(_field(item, name))
                    for name in (
                        "temperature",
                        "avg_logprob",
                        "compression_ratio",
                        "no_speech_prob",
                    )
                },
            }
        )
    if not segments and text:
        segments.append({"start": chunk.start, "end": chunk.end, "text": text})
    if timed and segments:
        for segment in segments:
            segment["words"] = []
        for word in timed:
            middle = (word["start"] + word["end"]) / 2
            home = min(segments, key=lambda s: _distance(middle, s["start"], s["end"]))
            home["words"].append(word)
    return ChunkText(
        index=chunk.index,
        key=key,
        start=chunk.start,
        end=chunk.end,
        text=text or " ".join(s["text"] for s in segments),
        language=_language(language),
        segments=segments,
        previous_text=previous_text,
    )


def _timed_word(item: Any, chunk: Chunk) -> dict[str, Any]:
    start = chunk.start + float(_field(item, "start") or 0.0)
    end = chunk.start + float(_field(item, "end") or 0.0)
    return {
        "word": str(_field(item, "word") or "").strip(),
        "start": round(min(start, chunk.end), 3),
        "end": round(min(max(end, start), chunk.end), 3),
    }


def _distance(at: float, start: float, end: float) -> float:
    """How far ``at`` lies outside [start, end]: 0 inside."""
    return max(start - at, at - end, 0.0)


def _field(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _language(value: Any) -> str | None:
    """The language the API reported (OpenAI says ``english``, other servers ``en``), if it fits
    the job's record."""
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip().lower()
    return value if len(value) <= _LANGUAGE_CHARS else None


def _stitch(pieces: list[ChunkText]) -> list[Segment]:
    """One list of segments numbered from 0, in order, over all pieces."""
    segments: list[Segment] = []
    for piece in pieces:
        for item in piece.segments:
            words = item.get("words")
            segments.append(
                Segment(
                    id=len(segments),
                    **{**item, "words": None if words is None else tuple(Word(**w) for w in words)},
                )
            )
    return segments


def _said(exc: openai.APIStatusError) -> str:
    body = exc.body
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.message)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"
