"""The OpenAI engine against a real OpenAI-compatible server (faster-whisper-server with the
bundled tiny.en), through a fault-injecting proxy: chunking past the 25 MB limit, retries,
failures that refund, and resuming a killed job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import openai
import pytest
from openai.types.audio import TranscriptionVerbose

from tests.fixtures.fault_proxy import OPENAI_MAX_BYTES
from tests.fixtures.gateway import (
    MakeClient,
    auth,
    credits,
    eventually,
    issue_code,
    services,
    submit,
    wait_for_job,
)
from tests.fixtures.openai_server import StartProxy, WhisperServer
from tests.fixtures.server import Server
from tests.speech import SPEECH, repeated_speech, script
from tests.wer import wer
from transcriber.checkpoints import BlobCheckpoints
from transcriber.engines import build_engine
from transcriber.engines.openai import ChunkText, OpenAIEngine, _piece, _stitch
from transcriber.mp3chunks import Chunk, plan_chunks
from transcription import jobfiles
from transcription.blobstore import LocalBlobStore
from transcription.errors import TranscriptionFailed
from transcription.jobfiles import JobFiles
from transcription.settings import WorkerSettings
from transcription.states import Mode
from transcription.transcript import Word

MAX_WER = 0.15
NOWHERE = "http://127.0.0.1:9"
"""An upstream for proxies that refuse every request, so none is ever forwarded."""
SEGMENT = {
    "seek": 0,
    "tokens": [],
    "temperature": 0.0,
    "avg_logprob": -0.2,
    "compression_ratio": 1.2,
    "no_speech_prob": 0.01,
}


def engine_for(base_url: str, **options: Any) -> OpenAIEngine:
    """An engine with test-sized chunks and timeouts unless told otherwise."""
    settings = {
        "api_key": "test-key",
        "base_url": base_url,
        "max_chunk_seconds": 15.0,
        "parallelism": 2,
        "max_retries": 5,
        "timeout": 60.0,
        **options,
    }
    return OpenAIEngine(settings.pop("model", None), **settings)


def rms_around(audio: Path, seconds: float, span: float = 0.2) -> float:
    """Root mean square of the decoded audio within ``span`` seconds of ``seconds``."""
    with av.open(str(audio)) as container:
        rate = container.streams.audio[0].sample_rate
        samples = np.concatenate([f.to_ndarray().ravel() for f in container.decode(audio=0)])
    a, b = max(0, round((seconds - span) * rate)), round((seconds + span) * rate)
    return float(np.sqrt(np.mean(np.square(samples[a:b], dtype=np.float64))))


@pytest.fixture(scope="module")
def speech_x3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    path = tmp_path_factory.mktemp("speech") / "speech-x3.mp3"
    return path, repeated_speech(path, 3)


def test_chunks_are_byte_ranges_of_the_file_cut_in_silence(speech_x3: tuple[Path, float]) -> None:
    audio, seconds = speech_x3
    chunks = plan_chunks(audio, max_bytes=10**9, max_seconds=40)
    assert len(chunks) == 3
    assert all(c.duration <= 40 for c in chunks)
    assert chunks[-1].end == pytest.approx(seconds, abs=0.1)
    # Nothing is re-encoded: the pieces put together are the file's own bytes.
    data = audio.read_bytes()
    assert b"".join(data[c.byte_start : c.byte_end] for c in chunks) == data
    loud = rms_around(audio, 5.0, span=3.0)
    for cut in chunks[1:]:
        assert rms_around(audio, cut.start) < loud / 100, f"cut at {cut.start:.2f} s is not quiet"


def test_chunks_stay_under_the_size_limit(speech_x3: tuple[Path, float]) -> None:
    audio, _ = speech_x3
    limit = audio.stat().st_size // 4
    chunks = plan_chunks(audio, max_bytes=limit, max_seconds=600)
    assert len(chunks) >= 4
    assert all(c.size <= limit for c in chunks)
    assert [c.start for c in chunks[1:]] == [c.end for c in chunks[:-1]]


@pytest.mark.slow
def test_speech_over_25_mb_transcribes_through_the_limit_as_well_as_in_one_piece(
    tmp_path: Path, whisper_server: WhisperServer, fault_proxy: StartProxy
) -> None:
    audio = tmp_path / "speech-12min-320k.mp3"
    seconds = repeated_speech(audio, 19, bitrate=320_000, sample_rate=32_000)
    assert audio.stat().st_size > OPENAI_MAX_BYTES and seconds > 12 * 60
    proxy = fault_proxy(whisper_server.root, max_body_bytes=OPENAI_MAX_BYTES)
    direct = openai.OpenAI(api_key="test-key", base_url=whisper_server.base_url, timeout=600)
    via_proxy = openai.OpenAI(api_key="test-key", base_url=proxy.base_url, max_retries=0)
    with audio.open("rb") as file, pytest.raises(openai.APIStatusError) as refused:
        via_proxy.audio.transcriptions.create(file=file, model="whisper-1")
    assert refused.value.status_code == 413

    with audio.open("rb") as file:
        whole = direct.audio.transcriptions.create(file=file, model="whisper-1")
    result = engine_for(proxy.base_url, max_chunk_seconds=600, timeout=600).transcribe(audio)

    reference = script(19)
    assert wer(reference, result.text) <= wer(reference, whole.text) + 0.02
    sent = proxy.transcriptions()[1:]  # after the refused whole file
    chunks = result.extra["chunks"]
    assert isinstance(chunks, int) and len(sent) == chunks >= 2
    assert all(s.status == 200 and s.size <= OPENAI_MAX_BYTES for s in sent)
    starts = [s.start for s in result.segments]
    assert starts == sorted(starts)
    assert result.segments[-1].end == pytest.approx(seconds, abs=2.0)
    assert result.duration == pytest.approx(seconds, abs=0.1)


@pytest.mark.slow
def test_accurate_mode_prompts_every_chunk_with_the_text_before_it(
    whisper_server: WhisperServer,
) -> None:
    progress: list[float] = []
    result = engine_for(whisper_server.base_url).transcribe(
        SPEECH, mode=Mode.ACCURATE, on_progress=progress.append
    )
    assert wer(script(1), result.text) <= MAX_WER, result.text
    chunks = result.extra["chunks"]
    assert isinstance(chunks, int) and chunks >= 2
    assert result.extra["chunks_prompted_with_previous_text"] == chunks - 1
    assert result.extra["parallelism"] == 1
    assert progress == sorted(progress)
    assert progress[-1] == pytest.approx(result.duration)
    assert all(s.avg_logprob is not None for s in result.segments)


@pytest.mark.slow
def test_models_without_segments_get_one_segment_per_chunk(whisper_server: WhisperServer) -> None:
    engine = engine_for(whisper_server.base_url, model="gpt-4o-mini-transcribe")
    result = engine.transcribe(SPEECH)
    assert result.extra["response_format"] == "json"
    assert len(result.segments) == result.extra["chunks"]
    assert result.segments[0].start == 0
    assert [s.start for s in result.segments[1:]] == [s.end for s in result.segments[:-1]]
    assert wer(script(1), result.text) <= MAX_WER, result.text


@pytest.mark.slow
def test_whisper_models_are_asked_for_words_and_a_server_without_them_keeps_segments(
    whisper_server: WhisperServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_for(whisper_server.base_url)
    asked: list[dict[str, Any]] = []
    create = engine.client.audio.transcriptions.create

    def recording(**options: Any) -> Any:
        asked.append(options)
        return create(**options)

    monkeypatch.setattr(engine.client.audio.transcriptions, "create", recording)
    result = engine.transcribe(SPEECH, temperature=0.3)
    assert asked and all(
        (a["timestamp_granularities"], a["temperature"]) == (["word", "segment"], 0.3)
        for a in asked
    )
    # faster-whisper-server 0.0.3 ignores the granularities: no words, segments as before.
    assert len(result.segments) >= 2 and all(s.words is None for s in result.segments)
    assert wer(script(1), result.text) <= MAX_WER, result.text


def test_words_the_server_times_go_to_their_segments_at_global_times() -> None:
    chunk = Chunk(index=1, first=0, last=10, byte_start=0, byte_end=10, start=100.0, end=110.0)
    answer = TranscriptionVerbose.model_validate(
        {
            "duration": 10.0,
            "language": "english",
            "text": "Hello there. Bye.",
            "segments": [
                {**SEGMENT, "id": 0, "start": 0.0, "end": 2.0, "text": " Hello there."},
                {**SEGMENT, "id": 1, "start": 2.5, "end": 3.5, "text": " Bye."},
            ],
            "words": [
                {"word": "Hello", "start": 0.1, "end": 0.6},
                {"word": "there.", "start": 0.7, "end": 2.2},
                {"word": "Bye.", "start": 2.6, "end": 3.4},
            ],
        }
    )
    piece = _piece(answer, chunk, "key", previous_text=False)
    assert ChunkText.from_json(piece.to_json()) == piece
    first, second = _stitch([piece])
    assert first.words == (Word("Hello", 100.1, 100.6), Word("there.", 100.7, 102.2))
    assert second.words == (Word("Bye.", 102.6, 103.4),)


def test_a_checkpoint_saved_before_words_were_asked_for_still_resumes() -> None:
    old = (
        b'{"version": 1, "index": 0, "key": "k", "start": 0.0, "end": 5.0, "text": "Hi.", '
        b'"language": "english", "segments": [{"start": 0.5, "end": 1.0, "text": "Hi.", '
        b'"temperature": 0.0, "avg_logprob": -0.2, "compression_ratio": 1.0, '
        b'"no_speech_prob": 0.01}], "previous_text": false}'
    )
    piece = ChunkText.from_json(old)
    assert piece is not None
    (segment,) = _stitch([piece])
    assert (segment.text, segment.start, segment.words) == ("Hi.", 0.5, None)


@pytest.mark.slow
def test_retry_after_is_honoured(whisper_server: WhisperServer, fault_proxy: StartProxy) -> None:
    proxy = fault_proxy(whisper_server.root, script=["429"], retry_after=2)
    engine_for(proxy.base_url, max_chunk_seconds=60).transcribe(SPEECH)
    first, second = proxy.transcriptions()
    assert (first.status, second.status) == (429, 200)
    # Without Retry-After the SDK's first backoff is at most half a second.
    assert second.at - first.at >= 1.9


@pytest.mark.slow
def test_with_30_percent_of_requests_failing_every_job_succeeds(
    make_client: MakeClient, whisper_server: WhisperServer, fault_proxy: StartProxy
) -> None:
    proxy = fault_proxy(
        whisper_server.root, fault_rate=0.3, script=["429", "500", "stall"], stall_seconds=60
    )
    client = make_client(engine=engine_for(proxy.base_url, timeout=10.0))
    code = issue_code(client, seconds=600, max_uses=2).code
    jobs = [submit(client, code, SPEECH).json()["id"] for _ in range(2)]
    charged = 0
    for job_id in jobs:
        job = wait_for_job(client, code, job_id)
        assert job["status"] == "succeeded", job["error"]
        assert wer(script(1), job["text"]) <= MAX_WER, job["text"]
        assert job["charged_seconds"] == job["reserved_seconds"]
        charged += job["charged_seconds"]
    faults = {s.fault for s in proxy.transcriptions()}
    assert {"429", "500", "stall"} <= faults
    assert credits(client, code)["spent_seconds"] == charged


def test_with_every_request_failing_the_job_fails_clearly_and_is_refunded(
    make_client: MakeClient, fault_proxy: StartProxy
) -> None:
    proxy = fault_proxy(NOWHERE, fault_rate=1.0, faults=("429", "500"), retry_after=0.2)
    client = make_client(engine=engine_for(proxy.base_url, max_retries=2))
    code = issue_code(client, seconds=600).code
    before = credits(client, code)
    job = wait_for_job(client, code, submit(client, code, SPEECH).json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] in ("engine_rate_limited", "engine_unavailable")
    assert "of 3" in job["error"]["message"] and "3 attempts" in job["error"]["message"]
    after = credits(client, code)
    assert after["remaining_seconds"] == before["remaining_seconds"] == 600
    assert (after["reserved_seconds"], after["spent_seconds"], after["uses"]) == (0, 0, 0)
    assert services(client).blobs.list(f"jobs/{job['id']}") == []


def test_a_chunk_over_the_server_limit_fails_with_the_setting_to_change(
    fault_proxy: StartProxy,
) -> None:
    proxy = fault_proxy(NOWHERE, max_body_bytes=50_000)
    with pytest.raises(TranscriptionFailed, match="WHISPER_OPENAI_MAX_CHUNK_BYTES") as failed:
        engine_for(proxy.base_url, max_chunk_seconds=60).transcribe(SPEECH)
    assert failed.value.code == "engine_rejected"
    assert len(proxy.transcriptions()) == 1  # a 413 is not retried


def test_an_unreachable_server_fails_clearly() -> None:
    engine = engine_for(NOWHERE + "/v1", max_retries=1, timeout=2.0)
    with pytest.raises(TranscriptionFailed, match="could not be reached") as failed:
        engine.transcribe(SPEECH)
    assert failed.value.code == "engine_unreachable"


def test_build_engine_reads_the_openai_settings() -> None:
    settings = WorkerSettings(
        engine="openai",
        openai_api_key="sk-test",
        openai_base_url="http://127.0.0.1:1/v1",
        openai_parallelism=3,
        openai_max_retries=7,
    )
    engine = build_engine(settings)
    assert isinstance(engine, OpenAIEngine)
    assert (engine.model, engine.parallelism, engine.max_retries) == ("whisper-1", 3, 7)
    assert engine.client.max_retries == 7
    assert str(engine.client.base_url).startswith("http://127.0.0.1:1/v1")


def test_build_engine_refuses_to_start_without_an_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        build_engine(WorkerSettings(engine="openai"))


@pytest.mark.slow
def test_a_killed_transcriber_resumes_sending_only_the_missing_chunks_and_charges_once(
    tmp_path: Path,
    start_server: Callable[..., Server],
    whisper_server: WhisperServer,
    fault_proxy: StartProxy,
) -> None:
    audio = tmp_path / "speech-x2.mp3"
    repeated_speech(audio, 2)
    planned = len(plan_chunks(audio, max_bytes=24 * 1024 * 1024, max_seconds=10))
    proxy = fault_proxy(whisper_server.root)
    server = start_server(
        env={
            "WHISPER_ENGINE": "openai",
            "OPENAI_API_KEY": "test-key",
            "OPENAI_BASE_URL": proxy.base_url,
            "WHISPER_OPENAI_MAX_CHUNK_SECONDS": "10",
            "WHISPER_OPENAI_PARALLELISM": "1",
        }
    )
    code = server.create_code()
    job_id = upload(server, code, audio)["id"]
    eventually(lambda: len(checkpoints(server, job_id)) >= 3, timeout=120, what="3 checkpoints")
    server.kill()
    done_before = len(checkpoints(server, job_id))
    assert 0 < done_before < planned
    sent_before = len(proxy.transcriptions())

    server.start()

    def finished() -> dict[str, Any] | None:
        job = get(server, code, f"/v1/transcriptions/{job_id}")
        return job if job["status"] in ("succeeded", "failed") else None

    job = eventually(finished, timeout=180, what="the resumed job finishing")
    assert job["status"] == "succeeded", job["error"]
    assert len(proxy.transcriptions()) - sent_before == planned - done_before
    assert wer(script(2), job["text"]) <= MAX_WER, job["text"]
    balance = get(server, code, "/v1/credits")
    assert balance["spent_seconds"] == job["charged_seconds"] == job["reserved_seconds"]
    assert (balance["reserved_seconds"], balance["uses"]) == (0, 1)
    assert checkpoints(server, job_id) == []


def checkpoints(server: Server, job_id: str) -> list[Path]:
    prefix = jobfiles.checkpoint_prefix(job_id)
    return sorted((server.data_dir / "blobs" / prefix).glob("*.json"))


def upload(server: Server, code: str, audio: Path) -> dict[str, Any]:
    """Submit through the native API, as ``whisperctl submit`` does."""
    response = httpx.post(
        server.base_url + "/v1/transcriptions",
        headers=auth(code),
        files={"file": (audio.name, audio.read_bytes(), "audio/mpeg")},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def get(server: Server, code: str, path: str) -> dict[str, Any]:
    response = httpx.get(server.base_url + path, headers=auth(code), timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.slow
def test_a_job_whose_chunks_are_all_checkpointed_sends_nothing_again(
    tmp_path: Path, whisper_server: WhisperServer, fault_proxy: StartProxy
) -> None:
    proxy = fault_proxy(whisper_server.root)
    blobs = LocalBlobStore(tmp_path / "blobs")
    store = BlobCheckpoints(blobs, jobfiles.checkpoint_prefix("tr_test"))
    engine = engine_for(proxy.base_url)
    first = engine.transcribe(SPEECH, checkpoints=store)
    sent = len(proxy.transcriptions())
    progress: list[float] = []
    again = engine.transcribe(SPEECH, checkpoints=store, on_progress=progress.append)
    assert len(proxy.transcriptions()) == sent
    assert again.text == first.text and again.segments == first.segments
    assert again.extra["resumed_chunks"] == again.extra["chunks"] == sent
    assert progress[-1] == pytest.approx(first.duration)
    # One checkpoint per chunk, all under the work prefix that the job's final tidy removes.
    assert len(blobs.list(jobfiles.checkpoint_prefix("tr_test"))) == sent
    JobFiles(blobs).tidy("tr_test", transcripts=False)
    assert blobs.list("jobs/tr_test") == []
