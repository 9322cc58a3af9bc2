"""A code that cannot pay for anything is refused before its upload is read, through a real
``whisperctl serve``: the client has sent 64 KiB of a declared 256 MiB when the 402 arrives,
nothing reaches the upload folder, and the code's balance does not move."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.server import Server, running_server

DECLARED = 256 * 1024 * 1024
SENT = 64 * 1024
ANSWER_WITHIN = 10.0
BOUNDARY = "drained-code-boundary"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("drained") / "data") as server:
        yield server


def admin(server: Server, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    token = server.env["WHISPER_ADMIN_TOKEN"]
    response = httpx.request(
        method,
        server.base_url + path,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        **kwargs,
    )
    assert response.is_success, response.text
    body: dict[str, Any] = response.json()
    return body


def balance(server: Server, code: str) -> dict[str, Any]:
    response = httpx.get(
        server.base_url + "/v1/credits", headers={"Authorization": f"Bearer {code}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def spend(server: Server, code: str, audio: Path) -> dict[str, Any]:
    """Upload ``audio`` and wait until its job succeeded, so its charge is final."""
    headers = {"Authorization": f"Bearer {code}"}
    files = {"file": ("talk.mp3", audio.read_bytes(), "audio/mpeg")}
    response = httpx.post(
        server.base_url + "/v1/transcriptions", headers=headers, files=files, timeout=60
    )
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    deadline = time.monotonic() + 120
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job {job['id']} never finished"
        time.sleep(0.2)
        job = httpx.get(
            f"{server.base_url}/v1/transcriptions/{job['id']}", headers=headers, timeout=30
        ).json()
    assert job["status"] == "succeeded", job
    return job


def start_big_upload(server: Server, code: str, path: str) -> socket.socket:
    """Send the headers of a 256 MiB multipart upload and its first 64 KiB, no more."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=ANSWER_WITHIN)
    part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.mp3"\r\n'
        "Content-Type: audio/mpeg\r\n\r\n"
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {code}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {DECLARED}\r\n\r\n"
    ).encode()
    sock.sendall(head + part + b"\xff" * (SENT - len(part)))
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """The status, headers and JSON body of the response, read within ANSWER_WITHIN seconds."""
    data = b""
    deadline = time.monotonic() + ANSWER_WITHIN
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < length(data):
        assert time.monotonic() < deadline, f"no complete answer yet: {data!r}"
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body[: length(data)])


def length(data: bytes) -> int:
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            return int(line.split(":", 1)[1])
    return 1 << 62


def test_a_code_that_cannot_pay_is_refused_before_the_upload_is_read(
    server: Server, mp3_5s: Path
) -> None:
    """No seconds left, uses used up, revoked, expired: each is answered with its 402 (429
    ``insufficient_quota`` on the OpenAI route) while the client is still at 64 KiB of 256 MiB."""
    used = admin(server, "POST", "/v1/admin/codes", json={"seconds": 3600, "max_uses": 1})
    reserved = spend(server, used["code"], mp3_5s)["reserved_seconds"]
    empty = admin(server, "POST", "/v1/admin/codes", json={"seconds": reserved, "max_uses": 2})
    spend(server, empty["code"], mp3_5s)
    revoked = admin(server, "POST", "/v1/admin/codes", json={"seconds": 3600})
    admin(server, "DELETE", f"/v1/admin/codes/{revoked['id']}")
    expired = admin(server, "POST", "/v1/admin/codes", json={"seconds": 3600})
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    admin(server, "PATCH", f"/v1/admin/codes/{expired['id']}", json={"expires_at": past})

    cases = [
        (empty, "/v1/transcriptions", 402, "insufficient_credit"),
        (empty, "/v1/audio/transcriptions", 429, "insufficient_credit"),
        (used, "/v1/transcriptions", 402, "code_used"),
        (revoked, "/v1/transcriptions", 402, "code_revoked"),
        (expired, "/v1/transcriptions", 402, "code_expired"),
    ]
    before = {c["code"]: balance(server, c["code"]) for c, *_ in cases}
    for code, path, status, error in cases:
        with start_big_upload(server, code["code"], path) as sock:
            answer, headers, body = read_answer(sock)
        assert (answer, body["error"]["code"]) == (status, error), body
        assert "Retry-After" not in headers
    assert list((server.data_dir / "uploads").iterdir()) == []
    assert {c["code"]: balance(server, c["code"]) for c, *_ in cases} == before
    assert before[empty["code"]]["remaining_seconds"] == 0


def test_a_code_that_can_pay_is_read_on(server: Server) -> None:
    """The control: with a code that can pay, the same 64 KiB get no early answer, since the
    server waits for the rest of the file."""
    code = admin(server, "POST", "/v1/admin/codes", json={"seconds": 3600})["code"]
    with start_big_upload(server, code, "/v1/transcriptions") as sock:
        readable, _, _ = select.select([sock], [], [], 1.0)
        assert readable == []
