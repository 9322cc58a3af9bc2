"""Bad input gets a documented 4xx in OpenAI's error shape, and nothing is stored or charged."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.fixtures.gateway import (
    ADMIN,
    MakeClient,
    auth,
    decoded_seconds,
    issue_code,
    services,
    submit,
    wait_for_job,
)
from transcription.db.models import CreditCode, IdempotencyKey, Job, LedgerEntry

KEY = {"Idempotency-Key": "bad-input-attempt"}


def stored(client: TestClient) -> dict[str, Any]:
    """Everything a request could leave behind: rows, counters, blobs and upload temp files."""
    svc = services(client)
    with svc.db.transaction() as session:
        state: dict[str, Any] = {
            "codes": [
                tuple(row)
                for row in session.execute(
                    select(
                        CreditCode.id,
                        CreditCode.budget_seconds,
                        CreditCode.reserved_seconds,
                        CreditCode.spent_seconds,
                        CreditCode.uses,
                    ).order_by(CreditCode.id)
                )
            ],
            "jobs": sorted(session.scalars(select(Job.id))),
            "ledger": session.scalar(select(func.count()).select_from(LedgerEntry)),
            "idempotency_keys": sorted(session.scalars(select(IdempotencyKey.key))),
        }
    data = svc.settings.data_dir
    state["files"] = sorted(
        str(path.relative_to(data))
        for folder in ("blobs", "uploads")
        for path in (data / folder).rglob("*")
        if path.is_file()
    )
    return state


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is ``status`` with OpenAI's error body carrying ``code`` and a sentence."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert error["code"] == code, error
    assert isinstance(error["type"], str) and error["type"]
    assert len(error["message"].split()) >= 3, error
    return error


def assert_rejected(
    client: TestClient, send: Callable[[], httpx.Response], status: int, code: str
) -> dict[str, Any]:
    """``send()`` is rejected as documented and leaves no trace at all."""
    before = stored(client)
    error = assert_error(send(), status, code)
    assert stored(client) == before
    return error


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    return make_client()


@pytest.mark.parametrize(
    ("audio", "status", "code", "says"),
    [
        ("not_audio_file", 415, "unsupported_media_type", "only MP3"),
        ("wav_renamed_mp3", 415, "unsupported_media_type", "WAV"),
        ("empty_file", 422, "empty_file", "empty"),
        ("damaged_mp3", 422, "audio_undecodable", "does not decode"),
        ("mp3_over_hour", 422, "audio_too_long", "1h 0m 5s"),
        ("lying_header_mp3", 422, "audio_too_long", "1h 10m"),
    ],
)
def test_unusable_audio_is_rejected_and_the_code_stays_unspent(
    client: TestClient,
    request: pytest.FixtureRequest,
    mp3_5s: Path,
    audio: str,
    status: int,
    code: str,
    says: str,
) -> None:
    path: Path = request.getfixturevalue(audio)
    issued = issue_code(client)

    error = assert_rejected(
        client, lambda: submit(client, issued.code, path, headers=KEY), status, code
    )
    assert says in error["message"]
    assert error["param"] == "file"
    # The single-use code and the Idempotency-Key are both still good for a real upload.
    assert submit(client, issued.code, mp3_5s, headers=KEY).status_code == 202


def test_a_truncated_mp3_is_accepted_and_charged_what_decodes(
    client: TestClient, truncated_mp3: Path
) -> None:
    issued = issue_code(client)
    seconds = decoded_seconds(truncated_mp3)

    response = submit(client, issued.code, truncated_mp3)
    assert response.status_code == 202, response.text
    assert response.json()["audio_seconds"] == pytest.approx(seconds, abs=0.01)
    assert response.json()["reserved_seconds"] == math.ceil(seconds)
    job = wait_for_job(client, issued.code, response.json()["id"])
    assert (job["status"], job["charged_seconds"]) == ("succeeded", math.ceil(seconds))


@pytest.mark.parametrize("size", [20_000, 200_000], ids=["streamed", "declared"])
def test_an_oversize_upload_is_rejected_before_it_is_stored(
    make_client: MakeClient, size: int
) -> None:
    client = make_client(max_upload_bytes=8192)
    issued = issue_code(client)
    payload = b"\xff" * size  # the limit applies before anything looks at the content

    assert_rejected(
        client, lambda: submit(client, issued.code, payload, headers=KEY), 413, "file_too_large"
    )


def test_the_oversize_message_states_a_limit_below_one_mib(make_client: MakeClient) -> None:
    client = make_client(max_upload_bytes=8192)
    issued = issue_code(client)
    error = assert_error(submit(client, issued.code, b"\xff" * 20_000), 413, "file_too_large")
    assert not re.search(r"\b0 MiB", error["message"]), error["message"]


def _multipart(body: bytes) -> Callable[[str], dict[str, Any]]:
    def build(code: str) -> dict[str, Any]:
        content_type = {"Content-Type": "multipart/form-data; boundary=x"}
        return {"content": body, "headers": {**auth(code), **content_type}}

    return build


@pytest.mark.parametrize(
    ("build", "param"),
    [
        (lambda code: {"files": {"audio": ("a.mp3", b"x")}, "headers": auth(code)}, "file"),
        (lambda code: {"data": {"language": "en"}, "headers": auth(code)}, "file"),
        (lambda code: {"json": {"file": "a.mp3"}, "headers": auth(code)}, "file"),
        (lambda code: {"content": b"\xff\xfb", "headers": auth(code)}, "file"),
        (_multipart(b"garbage"), None),
        (_multipart(b"--x\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--x--\r\n"), None),
    ],
    ids=["file-in-another-field", "no-file", "json-body", "raw-body", "not-parts", "nameless-part"],
)
def test_a_request_without_a_multipart_file_is_a_400(
    client: TestClient, build: Callable[[str], dict[str, Any]], param: str | None
) -> None:
    issued = issue_code(client)
    error = assert_rejected(
        client,
        lambda: client.post("/v1/transcriptions", **build(issued.code)),
        400,
        "invalid_request",
    )
    assert error["param"] == param


def test_a_multipart_body_cut_off_before_its_end_is_a_400(client: TestClient, mp3_5s: Path) -> None:
    issued = issue_code(client)
    head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n\r\n'
    cut = _multipart(head + mp3_5s.read_bytes())  # no closing "--x--": the upload stopped early
    assert_rejected(
        client,
        lambda: client.post("/v1/transcriptions", **cut(issued.code)),
        400,
        "invalid_request",
    )


@pytest.mark.parametrize(
    ("data", "headers", "param"),
    [
        ({"language": "english"}, {}, "language"),
        ({"language": "de"}, {}, "language"),  # the model is English-only
        ({"mode": "turbo"}, {}, "mode"),
        ({"prompt": "word " * 500}, {}, "prompt"),
        ({}, {"Idempotency-Key": "k" * 256}, "Idempotency-Key"),
    ],
    ids=["language-name", "language-the-model-lacks", "mode", "prompt-too-long", "long-key"],
)
def test_invalid_options_are_a_400_naming_the_field(
    client: TestClient,
    mp3_5s: Path,
    data: dict[str, str],
    headers: dict[str, str],
    param: str,
) -> None:
    issued = issue_code(client)
    error = assert_rejected(
        client,
        lambda: submit(client, issued.code, mp3_5s, data=data, headers={**KEY, **headers}),
        400,
        "invalid_request",
    )
    assert error["param"] == param


def _unknown(client: TestClient, audio: Path) -> str | None:
    return "wt_" + "A" * 32


def _missing(client: TestClient, audio: Path) -> str | None:
    return None


def _expired(client: TestClient, audio: Path) -> str | None:
    yesterday = datetime.now(UTC) - timedelta(days=1)
    return issue_code(client, expires_at=yesterday.isoformat()).code


def _revoked(client: TestClient, audio: Path) -> str | None:
    issued = issue_code(client)
    assert client.delete(f"/v1/admin/codes/{issued.id}", headers=ADMIN).status_code == 200
    return issued.code


def _used_up(client: TestClient, audio: Path) -> str | None:
    issued = issue_code(client)
    wait_for_job(client, issued.code, submit(client, issued.code, audio).json()["id"])
    return issued.code


def _short_of_seconds(client: TestClient, audio: Path) -> str | None:
    return issue_code(client, seconds=math.floor(decoded_seconds(audio)), max_uses=5).code


@pytest.mark.parametrize(
    ("holder", "status", "code"),
    [
        (_unknown, 401, "invalid_code"),
        (_missing, 401, "missing_code"),
        (_expired, 402, "code_expired"),
        (_revoked, 402, "code_revoked"),
        (_used_up, 402, "code_used"),
        (_short_of_seconds, 402, "insufficient_credit"),
    ],
    ids=["unknown", "missing", "expired", "revoked", "used-up", "too-few-seconds"],
)
def test_a_code_that_cannot_pay_is_refused_without_charging(
    client: TestClient,
    mp3_5s: Path,
    holder: Callable[[TestClient, Path], str | None],
    status: int,
    code: str,
) -> None:
    token = holder(client, mp3_5s)
    response_headers: dict[str, str] = {}

    def send() -> httpx.Response:
        response = submit(client, token, mp3_5s, headers=KEY)
        response_headers.update(response.headers)
        return response

    assert_rejected(client, send, status, code)
    if status == 401:
        assert response_headers["www-authenticate"] == "Bearer"


def test_a_non_bearer_authorization_header_is_a_missing_code(
    client: TestClient, mp3_5s: Path
) -> None:
    issued = issue_code(client)
    assert_rejected(
        client,
        lambda: client.post(
            "/v1/transcriptions",
            files={"file": ("a.mp3", mp3_5s.read_bytes())},
            headers={"Authorization": f"Basic {issued.code}"},
        ),
        401,
        "missing_code",
    )


def test_nul_characters_never_crash_the_database(
    db_url: str, make_client: MakeClient, mp3_5s: Path
) -> None:
    client = make_client(db_url=db_url, raise_server_exceptions=False)
    issued = issue_code(client)
    holder, nul = auth(issued.code), "a\x00b"
    attempts: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/v1/transcriptions/tr_%00", {"headers": holder}),
        ("DELETE", "/v1/transcriptions/tr_%00", {"headers": holder}),
        ("GET", "/v1/transcriptions/tr_%00/transcript.txt", {"headers": holder}),
        ("GET", "/v1/transcriptions?after=tr_%00", {"headers": holder}),
        ("GET", "/v1/admin/codes/cc_%00", {"headers": ADMIN}),
        ("PATCH", "/v1/admin/codes/cc_%00", {"headers": ADMIN, "json": {"max_uses": 2}}),
        ("DELETE", "/v1/admin/codes/cc_%00", {"headers": ADMIN}),
        ("GET", "/v1/admin/codes?after=cc_%00", {"headers": ADMIN}),
        ("GET", "/v1/admin/transcriptions?code_id=cc_%00", {"headers": ADMIN}),
        ("POST", "/v1/admin/codes", {"headers": ADMIN, "json": {"label": nul}}),
        (
            "POST",
            "/v1/transcriptions",
            {
                "headers": holder,
                "files": {"file": ("a.mp3", mp3_5s.read_bytes())},
                "data": {"prompt": nul},
            },
        ),
    ]
    crashed = []
    for method, path, options in attempts:
        response = client.request(method, path, **options)
        if response.status_code >= 500:
            crashed.append(f"{method} {path} {options.get('json') or options.get('data') or ''}")
        elif response.status_code >= 400:
            assert_error(response, response.status_code, response.json()["error"]["code"])
    assert crashed == []
