"""What the speed targets rest on, checked without timing: the model is loaded once however many
jobs run, accurate mode really feeds the decoder the previous text, fast-mode segments are cut
for subtitles at their words, and uploads enter the local blob store without being copied."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from faster_whisper import WhisperModel
from faster_whisper.transcribe import Segment as WhisperSegment
from faster_whisper.transcribe import Word as WhisperWord

from tests.fixtures.gateway import MakeClient, auth, eventually, issue_code, submit
from tests.speech import repeated_speech
from transcriber.engines import default_threads
from transcriber.engines.local import LocalEngine, _segments
from transcription.blobstore.local import LocalBlobStore
from transcription.states import Mode

SPEECH = Path(__file__).parents[1] / "data" / "speech.mp3"


@pytest.mark.slow
def test_several_jobs_through_the_gateway_load_the_model_once(make_client: MakeClient) -> None:
    engine = LocalEngine(cpu_threads=default_threads(2))
    client = make_client(engine=engine, concurrency=2)
    modes = ["fast", "accurate", "fast", "accurate"]
    code = issue_code(client, seconds=3600, max_uses=len(modes)).code
    ids = []
    for mode in modes:
        response = submit(client, code, SPEECH, data={"mode": mode})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])

    def finished() -> list[dict[str, Any]] | None:
        jobs = [client.get(f"/v1/transcriptions/{i}", headers=auth(code)).json() for i in ids]
        return jobs if all(j["status"] == "succeeded" for j in jobs) else None

    jobs = eventually(finished, timeout=600, what="four real transcriptions")
    assert [j["mode"] for j in jobs] == modes
    # One load per precision (int8 for fast, float32 for accurate), never one per job.
    assert engine.loads == 2


@pytest.mark.slow
def test_accurate_mode_gives_the_decoder_the_previous_text(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    audio = tmp_path / "long.mp3"
    repeated_speech(audio, 2)  # over a minute: several 30-second windows
    context: list[int] = []
    real = WhisperModel.get_prompt

    def recording(
        self: WhisperModel, tokenizer: Any, previous_tokens: list[int], *a: Any, **k: Any
    ) -> Any:
        context.append(len(previous_tokens))
        return real(self, tokenizer, previous_tokens, *a, **k)

    monkeypatch.setattr(WhisperModel, "get_prompt", recording)
    engine = LocalEngine(cpu_threads=default_threads())

    accurate = engine.transcribe(audio, mode=Mode.ACCURATE)
    assert accurate.extra["condition_on_previous_text"] is True
    assert len(context) >= 2 and context[0] == 0
    assert all(n > 0 for n in context[1:]), context

    context.clear()
    fast = engine.transcribe(audio, mode=Mode.FAST)
    assert fast.extra["condition_on_previous_text"] is False
    assert context and all(n == 0 for n in context), context


def test_fast_mode_chunks_are_cut_into_sentences_timed_by_their_words() -> None:
    spoken = [" One", " two", " three.", " Four", " five", " six!", " Ten?"]
    words = [WhisperWord(10.0 + 2 * i, 11.0 + 2 * i, w, 0.9) for i, w in enumerate(spoken)]
    piece = WhisperSegment(
        id=1,
        seek=0,
        start=10.0,
        end=30.0,
        text="".join(spoken),
        tokens=[],
        avg_logprob=-0.1,
        compression_ratio=1.0,
        no_speech_prob=0.0,
        words=words,
        temperature=0.0,
    )
    parts = _segments(piece, batched=True, first_id=4)
    assert [p.text for p in parts] == ["One two three.", "Four five six!", "Ten?"]
    assert [(p.id, p.start, p.end) for p in parts] == [
        (4, 10.0, 15.0),
        (5, 16.0, 21.0),
        (6, 22.0, 23.0),
    ]
    assert [len(p.words or ()) for p in parts] == [3, 3, 1]
    assert all(p.avg_logprob == -0.1 for p in parts)
    # Accurate mode keeps Whisper's own segment and its times, words attached.
    (whole,) = _segments(piece, batched=False, first_id=0)
    assert (whole.start, whole.end, len(whole.words or ())) == (10.0, 30.0, 7)


def test_a_private_upload_is_linked_into_the_local_store_not_copied(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    upload = tmp_path / "upload.part"
    upload.write_bytes(b"ID3 not really audio")
    upload.chmod(0o600)
    store.put_file("jobs/tr_a/audio.mp3", upload)
    stored = store.local_path("jobs/tr_a/audio.mp3")
    assert os.path.samefile(stored, upload)
    upload.unlink()
    assert stored.read_bytes() == b"ID3 not really audio"

    shared = tmp_path / "shared.mp3"
    shared.write_bytes(b"readable by others")
    shared.chmod(0o644)
    store.put_file("jobs/tr_b/audio.mp3", shared)
    copy = store.local_path("jobs/tr_b/audio.mp3")
    assert not os.path.samefile(copy, shared)
    assert (copy.stat().st_mode & 0o777) == 0o600
