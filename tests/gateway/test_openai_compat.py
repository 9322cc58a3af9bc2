"""The OpenAI-compatible endpoint, used as people use it: the official ``openai`` SDK pointed at
a real gateway (uvicorn) whose OpenAI engine talks to faster-whisper-server."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from openai.types.audio import (
    Transcription,
    TranscriptionTextDeltaEvent,
    TranscriptionTextDoneEvent,
    TranscriptionVerbose,
    TranscriptionWord,
)

from gateway.app import create_app
from gateway.services import Services
from tests.fixtures.gateway import (
    ADMIN,
    ADMIN_TOKEN,
    BlockingEngine,
    audit,
    auth,
    eventually,
    serve,
)
from tests.fixtures.openai_server import StartProxy, WhisperServer
from tests.fixtures.server import Server
from tests.speech import SPEECH, script
from tests.wer import wer
from transcriber.engines.base import Engine
from transcriber.engines.openai import OpenAIEngine
from transcription.settings import GatewaySettings

MAX_WER = 0.15
SPEECH_SECONDS = 39  # what the fixture's 38.3 s reserve and charge
NOWHERE = "http://127.0.0.1:9/v1"
"""An engine address for tests whose requests are refused before any transcription."""


@dataclass
class Gateway:
    """A gateway served over HTTP on a free port."""

    url: str
    app: FastAPI

    @property
    def services(self) -> Services:
        found: Services = self.app.state.services
        return found

    def sdk(self, code: str, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=code, **options)

    def issue(self, seconds: int = 3600, max_uses: int = 1) -> str:
        response = httpx.post(
            self.url + "/v1/admin/codes",
            json={"seconds": seconds, "max_uses": max_uses},
            headers=ADMIN,
        )
        assert response.status_code == 201, response.text
        code: str = response.json()["code"]
        return code

    def get(self, code: str, path: str) -> Any:
        response = httpx.get(self.url + path, headers=auth(code), timeout=30)
        assert response.status_code == 200, response.text
        return response.json()


StartGateway = Callable[..., Gateway]


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[StartGateway]:
    """Factory: ``start_gateway(base_url, **settings)`` serves a gateway whose OpenAI engine
    (model ``tiny.en``) sends to ``base_url``; ``engine=`` serves another engine instead."""
    with ExitStack() as stack:

        def start(
            base_url: str = NOWHERE,
            *,
            timeout: float = 60.0,
            engine: Engine | None = None,
            **settings: Any,
        ) -> Gateway:
            engine = engine or OpenAIEngine(
                "tiny.en", api_key="test-key", base_url=base_url, max_retries=2, timeout=timeout
            )
            config = GatewaySettings(
                data_dir=tmp_path / "data",
                admin_token=ADMIN_TOKEN,
                **{"progress_interval": 0, "concurrency": 1, **settings},
            )
            app = create_app(config, engine=engine)
            return Gateway(stack.enter_context(serve(app)), app)

        yield start


@pytest.mark.slow
def test_every_response_format_works_through_the_sdk_and_charges_once(
    start_gateway: StartGateway, whisper_server: WhisperServer
) -> None:
    gateway = start_gateway(whisper_server.base_url)
    code = gateway.issue()
    client = gateway.sdk(code)
    answers: dict[str, Any] = {}
    for fmt in ("json", "text", "srt", "vtt", "verbose_json"):
        with SPEECH.open("rb") as file:
            answers[fmt] = client.audio.transcriptions.create(
                file=file,
                model="tiny.en" if fmt == "srt" else "whisper-1",
                response_format=fmt,
                # The SDK sends no Idempotency-Key of its own; with one, an upload is one job.
                extra_headers={"Idempotency-Key": "talk-1"},
                extra_body={"mode": "accurate"},
            )

    reference = script(1)
    assert isinstance(answers["json"], Transcription)
    assert wer(reference, answers["json"].text) <= MAX_WER
    assert isinstance(answers["text"], str) and wer(reference, answers["text"]) <= MAX_WER
    srt = answers["srt"]
    assert isinstance(srt, str) and srt.startswith("1\n00:00:") and " --> " in srt
    spoken = [
        line for line in srt.splitlines() if line and "-->" not in line and not line.isdigit()
    ]
    assert wer(reference, " ".join(spoken)) <= MAX_WER
    assert isinstance(answers["vtt"], str) and answers["vtt"].startswith("WEBVTT\n")
    verbose = answers["verbose_json"]
    assert isinstance(verbose, TranscriptionVerbose)
    assert verbose.duration == pytest.approx(38.3, abs=0.5)
    assert wer(reference, verbose.text) <= MAX_WER
    assert verbose.segments is not None and len(verbose.segments) >= 2
    starts = [s.start for s in verbose.segments]
    assert starts == sorted(starts) and all(s.start < s.end for s in verbose.segments)
    assert all(s.avg_logprob is not None for s in verbose.segments)

    balance = gateway.get(code, "/v1/credits")
    assert (balance["spent_seconds"], balance["uses"]) == (SPEECH_SECONDS, 1)
    (job,) = gateway.get(code, "/v1/transcriptions")["data"]
    assert (job["mode"], job["model"], job["charged_seconds"]) == (
        "accurate",
        "tiny.en",
        SPEECH_SECONDS,
    )

    # The code is single-use: another upload is refused the way OpenAI refuses an empty quota.
    with SPEECH.open("rb") as file, pytest.raises(openai.RateLimitError) as exhausted:
        client.audio.transcriptions.create(file=file, model="whisper-1")
    assert exhausted.value.code == "code_used"
    assert "used" in exhausted.value.message
    assert exhausted.value.response.headers["x-should-retry"] == "false"
    assert gateway.get(code, "/v1/credits")["spent_seconds"] == SPEECH_SECONDS


def test_refusals_are_the_sdks_typed_errors_and_cost_nothing(
    start_gateway: StartGateway, wav_renamed_mp3: Path, mp3_over_hour: Path
) -> None:
    gateway = start_gateway(NOWHERE)
    code = gateway.issue(seconds=600, max_uses=5)

    def create(file: Path, client: openai.OpenAI | None = None, **options: Any) -> Any:
        with file.open("rb") as opened:
            return (client or gateway.sdk(code)).audio.transcriptions.create(
                file=opened, **{"model": "whisper-1", **options}
            )

    with pytest.raises(openai.AuthenticationError) as unknown:
        create(SPEECH, gateway.sdk("wt_not-a-real-code"))
    assert unknown.value.code == "invalid_code"
    with pytest.raises(openai.BadRequestError) as wav:
        create(wav_renamed_mp3)
    assert wav.value.code == "unsupported_media_type" and "WAV" in wav.value.message
    with pytest.raises(openai.UnprocessableEntityError) as too_long:
        create(mp3_over_hour)
    assert too_long.value.code == "audio_too_long"
    with pytest.raises(openai.BadRequestError) as model:
        create(SPEECH, model="whisper-large")
    assert (model.value.code, model.value.param) == ("model_not_found", "model")
    assert "whisper-1" in model.value.message and "tiny.en" in model.value.message
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"timestamp_granularities": ["word"]}, "timestamp_granularities[]"),  # json has none
        (
            {"response_format": "verbose_json", "timestamp_granularities": ["sentence"]},
            "timestamp_granularities[]",
        ),
        ({"response_format": "srt", "stream": True}, "stream"),
        ({"include": ["logprobs"]}, "include[]"),
        ({"temperature": 1.5}, "temperature"),
        ({"extra_body": {"chunking_strategy": "server_vad"}}, "chunking_strategy"),
        ({"response_format": "diarized_json"}, "response_format"),
        ({"extra_body": {"word_timestamps": "maybe"}}, "word_timestamps"),
        (
            {
                "response_format": "verbose_json",
                "timestamp_granularities": ["word"],
                "extra_body": {"word_timestamps": "false"},
            },
            "timestamp_granularities[]",
        ),
    ]
    for options, param in refusals:
        with pytest.raises(openai.BadRequestError) as refused:
            create(SPEECH, **options)
        assert refused.value.param == param, options
        assert refused.value.code == "invalid_request"
    with pytest.raises(openai.BadRequestError) as language:
        create(SPEECH, language="de")
    assert language.value.param == "language"
    poor = gateway.issue(seconds=10)
    with pytest.raises(openai.RateLimitError) as broke:
        create(SPEECH, gateway.sdk(poor))
    assert broke.value.code == "insufficient_credit"
    assert broke.value.response.headers["x-should-retry"] == "false"

    balance = gateway.get(code, "/v1/credits")
    assert (balance["spent_seconds"], balance["reserved_seconds"], balance["uses"]) == (0, 0, 0)
    assert gateway.get(code, "/v1/transcriptions")["data"] == []
    assert gateway.services.blobs.list("jobs") == []
    # The native API keeps its own status for the same refusal.
    native = httpx.post(
        gateway.url + "/v1/transcriptions",
        headers=auth(poor),
        files={"file": ("speech.mp3", SPEECH.read_bytes(), "audio/mpeg")},
    )
    assert (native.status_code, native.json()["error"]["code"]) == (402, "insufficient_credit")


def test_models_lists_what_the_endpoint_accepts(start_gateway: StartGateway) -> None:
    gateway = start_gateway(NOWHERE)
    client = gateway.sdk(gateway.issue())
    assert [m.id for m in client.models.list()] == ["whisper-1", "tiny.en"]
    assert client.models.retrieve("tiny.en").owned_by == "openai"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.AuthenticationError):
        gateway.sdk("wt_unknown").models.list()


@pytest.mark.slow
def test_a_job_past_the_wait_answers_with_its_id_and_goes_on(
    start_gateway: StartGateway, whisper_server: WhisperServer, fault_proxy: StartProxy
) -> None:
    # The first request to the engine stalls for 3 s, then the connection drops and is retried.
    proxy = fault_proxy(whisper_server.root, script=["stall"], stall_seconds=3)
    gateway = start_gateway(proxy.base_url, sync_wait_seconds=1)
    code = gateway.issue()
    with SPEECH.open("rb") as file, pytest.raises(openai.ConflictError) as pending:
        gateway.sdk(code).audio.transcriptions.create(file=file, model="whisper-1")
    job_id = pending.value.param
    assert pending.value.code == "transcription_pending"
    assert isinstance(job_id, str) and job_id in pending.value.message
    assert isinstance(pending.value.body, dict) and pending.value.body["job_id"] == job_id
    assert pending.value.response.headers["x-should-retry"] == "false"

    def finished() -> dict[str, Any] | None:
        job: dict[str, Any] = gateway.get(code, f"/v1/transcriptions/{job_id}")
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = eventually(finished, timeout=120, what="the job finishing after the answer")
    assert job["status"] == "succeeded" and wer(script(1), job["text"]) <= MAX_WER
    assert gateway.get(code, "/v1/credits")["spent_seconds"] == SPEECH_SECONDS


def test_a_caller_that_hangs_up_on_a_stalled_job_cancels_it_and_its_use_stays_spent(
    start_gateway: StartGateway, fault_proxy: StartProxy
) -> None:
    """The engine never answers, so nothing is transcribed: the cancel charges nothing, but the
    job was running, so the single use stays spent and the code cannot start another."""
    proxy = fault_proxy(NOWHERE, fault_rate=1.0, faults=("stall",), stall_seconds=30)
    gateway = start_gateway(proxy.base_url, timeout=5.0)
    code = gateway.issue()
    impatient = gateway.sdk(code, timeout=2.0, max_retries=0)
    with SPEECH.open("rb") as file, pytest.raises(openai.APITimeoutError):
        impatient.audio.transcriptions.create(file=file, model="whisper-1")

    def cancelled() -> dict[str, Any] | None:
        (job,) = gateway.get(code, "/v1/transcriptions")["data"]
        return job if job["status"] == "cancelled" else None

    job = eventually(cancelled, timeout=30, what="the cancel")
    assert job["started_at"] is not None and job["progress"] == 0
    assert (job["charged_seconds"], job["text"], job["transcript"]) == (0, None, None)
    balance = gateway.get(code, "/v1/credits")
    assert (balance["spent_seconds"], balance["reserved_seconds"], balance["uses"]) == (0, 0, 1)
    with SPEECH.open("rb") as file, pytest.raises(openai.RateLimitError) as used:
        gateway.sdk(code).audio.transcriptions.create(file=file, model="whisper-1")
    assert used.value.code == "code_used"
    audit(gateway.services.db)


def test_hanging_up_is_a_cancel_under_the_credit_rules(start_gateway: StartGateway) -> None:
    """Hanging up on a running job charges what was transcribed and keeps the use spent, so an
    impatient client gets no free transcription; hanging up while queued refunds in full."""
    engine = BlockingEngine()  # holds every job at half its audio until released
    gateway = start_gateway(engine=engine)
    running_code, blocker_code, queued_code = (gateway.issue() for _ in range(3))

    with SPEECH.open("rb") as file, pytest.raises(openai.APITimeoutError):
        gateway.sdk(running_code, timeout=2.0, max_retries=0).audio.transcriptions.create(
            file=file, model="whisper-1"
        )

    def finished(code: str) -> dict[str, Any] | None:
        (job,) = gateway.get(code, "/v1/transcriptions")["data"]
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    running = eventually(lambda: finished(running_code), what="the hang-up cancelling the job")
    assert (running["status"], running["progress"]) == ("cancelled", 0.5)
    assert running["charged_seconds"] == math.ceil(0.5 * running["audio_seconds"]) == 20
    assert (running["text"], running["transcript"]) == (None, None)
    balance = gateway.get(running_code, "/v1/credits")
    assert (balance["spent_seconds"], balance["reserved_seconds"], balance["uses"]) == (20, 0, 1)
    with SPEECH.open("rb") as file, pytest.raises(openai.RateLimitError) as used:
        gateway.sdk(running_code).audio.transcriptions.create(file=file, model="whisper-1")
    assert used.value.code == "code_used"

    # Another job holds the only worker, so the next caller's job is still queued when it
    # hangs up: that cancel refunds everything and gives the use back.
    blocker = httpx.post(
        gateway.url + "/v1/transcriptions",
        headers=auth(blocker_code),
        files={"file": ("speech.mp3", SPEECH.read_bytes(), "audio/mpeg")},
    )
    assert blocker.status_code == 202, blocker.text
    eventually(
        lambda: (
            gateway.get(blocker_code, f"/v1/transcriptions/{blocker.json()['id']}")["progress"] > 0
        ),
        what="the blocking job running",
    )
    with SPEECH.open("rb") as file, pytest.raises(openai.APITimeoutError):
        gateway.sdk(queued_code, timeout=1.0, max_retries=0).audio.transcriptions.create(
            file=file, model="whisper-1"
        )
    queued = eventually(lambda: finished(queued_code), what="the hang-up cancelling the job")
    assert (queued["status"], queued["started_at"], queued["charged_seconds"]) == (
        "cancelled",
        None,
        0,
    )
    balance = gateway.get(queued_code, "/v1/credits")
    assert (balance["spent_seconds"], balance["reserved_seconds"], balance["uses"]) == (0, 0, 0)

    engine.release()
    assert eventually(lambda: finished(blocker_code), what="the blocker")["status"] == "succeeded"
    assert len(engine.calls) == 2  # the queued job never reached the engine
    audit(gateway.services.db)


def test_a_job_cancelled_while_its_caller_waits_is_a_409_that_says_what_it_cost(
    start_gateway: StartGateway,
) -> None:
    engine = BlockingEngine()
    gateway = start_gateway(engine=engine)
    code = gateway.issue()

    def transcribe() -> Any:
        with SPEECH.open("rb") as file:
            return gateway.sdk(code, max_retries=0).audio.transcriptions.create(
                file=file, model="whisper-1"
            )

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(transcribe)

        def halfway() -> str | None:
            jobs = gateway.get(code, "/v1/transcriptions")["data"]
            return jobs[0]["id"] if jobs and jobs[0]["progress"] > 0 else None

        job_id = eventually(halfway, what="the job running")
        deleted = httpx.delete(f"{gateway.url}/v1/transcriptions/{job_id}", headers=auth(code))
        assert deleted.status_code == 200, deleted.text
        with pytest.raises(openai.ConflictError) as cancelled:
            waiting.result(timeout=30)
    assert (cancelled.value.code, cancelled.value.param) == ("transcription_cancelled", job_id)
    assert "charged 20 s" in cancelled.value.message
    assert "use stays spent" in cancelled.value.message
    engine.release()
    audit(gateway.services.db)


def test_a_job_the_engine_cannot_do_is_a_502_that_names_it_and_refunds(
    start_gateway: StartGateway, fault_proxy: StartProxy
) -> None:
    proxy = fault_proxy(NOWHERE, fault_rate=1.0, faults=("500",))
    gateway = start_gateway(proxy.base_url)
    code = gateway.issue()
    with SPEECH.open("rb") as file, pytest.raises(openai.InternalServerError) as failed:
        gateway.sdk(code).audio.transcriptions.create(file=file, model="whisper-1")
    assert failed.value.status_code == 502
    assert failed.value.code == "engine_unavailable"
    assert "HTTP 500" in failed.value.message and "refunded" in failed.value.message
    assert failed.value.param is not None and failed.value.param.startswith("tr_")
    assert len(proxy.transcriptions()) == 3  # the engine's own retries; the SDK made none
    balance = gateway.get(code, "/v1/credits")
    assert (balance["spent_seconds"], balance["reserved_seconds"], balance["uses"]) == (0, 0, 0)


@pytest.mark.slow
def test_the_sdk_reads_timed_words_and_segments_and_streams_the_same_text(
    start_server: Callable[..., Server],
) -> None:
    """Against a real ``whisperctl serve`` (local engine, tiny.en, fast mode by default)."""
    server = start_server()
    code = server.create_code(seconds=600, max_uses=3)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=code, max_retries=0)

    with SPEECH.open("rb") as file:
        verbose = client.audio.transcriptions.create(
            file=file,
            model="whisper-1",
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
            temperature=0.2,
        )
    assert isinstance(verbose, TranscriptionVerbose)
    assert (verbose.language, verbose.duration) == ("english", pytest.approx(38.3, abs=0.5))
    assert verbose.usage is not None
    assert (verbose.usage.type, verbose.usage.seconds) == ("duration", SPEECH_SECONDS)
    assert wer(script(1), verbose.text) <= MAX_WER
    words, segments = verbose.words, verbose.segments
    assert words is not None and segments is not None and len(segments) >= 5
    assert all(isinstance(w, TranscriptionWord) for w in words)
    assert set(words[0].model_dump()) == {"word", "start", "end"}
    assert wer(script(1), " ".join(w.word for w in words)) <= MAX_WER
    assert [w.start for w in words] == sorted(w.start for w in words)
    assert all(0 <= w.start <= w.end <= verbose.duration for w in words)
    assert all(
        any(s.start - 0.5 <= w.start and w.end <= s.end + 0.5 for s in segments) for w in words
    )
    # The engine decoded at the temperature asked for (batched decoding reports its own).
    assert {s.temperature for s in segments} == {0.2}

    with SPEECH.open("rb") as file:
        plain = client.audio.transcriptions.create(file=file, model="whisper-1")
    with SPEECH.open("rb") as file:
        stream = client.audio.transcriptions.create(file=file, model="whisper-1", stream=True)
        events = list(stream)
    *deltas, done = events
    assert len(deltas) >= 2
    assert all(isinstance(d, TranscriptionTextDeltaEvent) for d in deltas)
    assert isinstance(done, TranscriptionTextDoneEvent)
    assert "".join(d.delta for d in deltas if isinstance(d, TranscriptionTextDeltaEvent)) == (
        done.text
    )
    assert done.text == plain.text
    assert wer(script(1), done.text) <= MAX_WER


def test_a_streamed_job_past_the_wait_is_an_error_event_and_hanging_up_cancels(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keep-alive comments while the job runs; the SDK skips them.
    monkeypatch.setattr("gateway.routers.openai_compat.KEEPALIVE_SECONDS", 0.1)
    engine = BlockingEngine()
    gateway = start_gateway(engine=engine, sync_wait_seconds=1)
    code = gateway.issue(max_uses=2)
    with SPEECH.open("rb") as file:
        stream = gateway.sdk(code, max_retries=0).audio.transcriptions.create(
            file=file, model="whisper-1", stream=True
        )
    with pytest.raises(openai.APIError) as pending:
        list(stream)
    assert isinstance(pending.value.body, dict)
    assert pending.value.body["code"] == "transcription_pending"
    job_id = pending.value.body["job_id"]
    assert gateway.get(code, f"/v1/transcriptions/{job_id}")["status"] == "running"

    # The first job holds the only worker, so the next one waits in the queue; its caller hangs
    # up, which cancels it as it would a non-streamed call: refunded in full.
    with SPEECH.open("rb") as file:
        stream = gateway.sdk(code, max_retries=0).audio.transcriptions.create(
            file=file, model="whisper-1", stream=True
        )
    queued = eventually(
        lambda: [j for j in gateway.get(code, "/v1/transcriptions")["data"] if j["id"] != job_id],
        what="the second job",
    )
    stream.close()

    def cancelled() -> dict[str, Any] | None:
        job: dict[str, Any] = gateway.get(code, f"/v1/transcriptions/{queued[0]['id']}")
        return job if job["status"] == "cancelled" else None

    job = eventually(cancelled, what="the hang-up cancelling the streamed job")
    assert (job["started_at"], job["charged_seconds"]) == (None, 0)
    engine.release()
    finished = eventually(
        lambda: gateway.get(code, f"/v1/transcriptions/{job_id}")["status"] == "succeeded",
        what="the first job",
    )
    assert finished
    audit(gateway.services.db)
