"""The limits on clients, through a real ``whisperctl serve`` (the ASGI test client would skip
uvicorn, where the header deadline and the connection limits live): what an abusive client
meets, and that honest requests still pass."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_memory import reset_peak, status_kib
from tests.fixtures.audio import make_mp3
from tests.fixtures.server import Server, running_server

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
#: Bytes a second an upload must average over each BODY_TIMEOUT window.
MIN_UPLOAD_RATE = 200
LIMITS = {
    "WHISPER_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
    "WHISPER_BODY_TIMEOUT": str(BODY_TIMEOUT),
    "WHISPER_MIN_UPLOAD_RATE": str(MIN_UPLOAD_RATE),
    "WHISPER_MAX_UPLOADS": "3",
    "WHISPER_MAX_UPLOADS_PER_CODE": "2",
    # The OpenAI route answers 409 transcription_pending then, rather than wait for the job.
    "WHISPER_SYNC_WAIT_SECONDS": "1",
}
#: How long to wait for something that should happen within a deadline above: generous, since
#: a loaded machine may be slow, but bounded, so that a limit that never acts fails the test.
WAIT = 20.0
BOUNDARY = "limits-test-boundary"
MAX_BODY_GROWTH_KIB = 32 * 1024
#: Far above an idle server's milliseconds, far below what a blocked event loop would take.
HEALTHZ_LATENCY = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module, with short deadlines; each test leaves no upload behind.
    Ready (its model loaded), so that loading it does not count as memory a request took."""
    data_dir = tmp_path_factory.mktemp("limits") / "data"
    with running_server(data_dir, env=LIMITS) as running:
        yield running


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def temp_files(server: Server) -> list[Path]:
    return sorted((server.data_dir / "uploads").iterdir())


class Raw:
    """One HTTP/1.1 connection driven byte by byte, as a misbehaving client would."""

    def __init__(self, server: Server) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def head(self) -> tuple[int, dict[str, str]]:
        """The next response's status and headers (an interim 100 Continue included)."""
        status = int(self.reader.readline().split()[1])
        headers = {}
        while line := self.reader.readline().strip():
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = self.head()
        return status, headers, self.reader.read(int(headers.get("content-length", 0)))

    def at_eof(self) -> bool:
        """Whether the server has closed the connection (waits up to WAIT for it)."""
        try:
            return self.reader.read(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def error_code(body: bytes | httpx.Response) -> str:
    """The machine-readable code of an error in OpenAI's shape."""
    parsed: Any = json.loads(body.content if isinstance(body, httpx.Response) else body)
    assert {"message", "type", "param", "code"} <= set(parsed["error"]), parsed
    code: str = parsed["error"]["code"]
    return code


def start_upload(server: Server, code: str) -> Raw:
    """An upload whose server side has begun (it answered 100 Continue, so the request holds a
    slot) and whose file part has started; the rest of the body is never sent."""
    raw = Raw(server)
    raw.send(
        b"POST /v1/transcriptions HTTP/1.1\r\nHost: test\r\n"
        + f"Authorization: Bearer {code}\r\n".encode()
        + f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n".encode()
        + b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
    )
    status, _ = raw.head()
    assert status == 100
    raw.send(
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=file; filename=a.mp3\r\n"
        "Content-Type: audio/mpeg\r\n\r\n".encode()
        + b"\xff" * 1000
    )
    return raw


@contextmanager
def trickling(connections: list[Raw], data: bytes = b"\xff", every: float = 0.25) -> Iterator[None]:
    """Keep each connection's request going with ``data`` every ``every`` seconds."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            for raw in connections:
                with suppress(OSError):
                    raw.send(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def credits(server: Server, code: str) -> dict[str, Any]:
    response = httpx.get(
        server.base_url + "/v1/credits", headers={"Authorization": f"Bearer {code}"}, timeout=WAIT
    )
    assert response.status_code == 200, response.text
    return {k: response.json()[k] for k in ("reserved_seconds", "spent_seconds", "uses")}


def upload(
    server: Server, code: str, audio: Path, path: str = "/v1/transcriptions"
) -> httpx.Response:
    return httpx.post(
        server.base_url + path,
        headers={"Authorization": f"Bearer {code}"},
        files={"file": (audio.name, audio.read_bytes(), "audio/mpeg")},
        timeout=WAIT,
    )


def test_an_oversized_json_body_is_refused_unread_before_authentication(server: Server) -> None:
    """96 MiB of JSON to the admin API without a token: 413 ``request_too_large`` at once, and
    the server's peak memory barely moves; a declared length alone is refused before any body
    byte is sent, and a body without a length is cut off at the limit."""
    reset_peak(server.pid)
    baseline = status_kib(server.pid, "VmRSS")
    started = time.monotonic()
    response = httpx.post(
        server.base_url + "/v1/admin/codes",
        content=b"[" + b"0," * (48 << 20) + b"0]",
        headers={"Content-Type": "application/json"},
        timeout=WAIT,
    )
    assert response.status_code == 413, response.text
    assert error_code(response) == "request_too_large"
    assert "64 KiB" in response.json()["error"]["message"]
    assert time.monotonic() - started < WAIT
    assert status_kib(server.pid, "VmHWM") - baseline < MAX_BODY_GROWTH_KIB

    raw = Raw(server)
    raw.send(
        b"POST /v1/admin/codes HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100663296\r\n\r\n"
    )
    status, headers, body = raw.response()
    assert (status, error_code(body), headers["connection"]) == (413, "request_too_large", "close")
    assert raw.at_eof()
    raw.close()

    chunks = (b" " * (1 << 20) for _ in range(96))
    chunked = httpx.post(server.base_url + "/v1/admin/codes", content=chunks, timeout=WAIT)
    assert chunked.status_code == 413 and error_code(chunked) == "request_too_large"


def test_bodies_within_the_limit_and_uploads_above_it_pass(server: Server, tmp_path: Path) -> None:
    """A code is minted through the JSON API as before, and a 120 KB mp3 (above the JSON
    limit) is accepted on both upload routes."""
    code = server.create_code(seconds=600, max_uses=2)
    audio = tmp_path / "30s.mp3"
    make_mp3(audio, 30)
    assert audio.stat().st_size > 64 * 1024
    assert upload(server, code, audio).status_code == 202
    openai = upload(server, code, audio, "/v1/audio/transcriptions")
    assert openai.status_code in (200, 409), openai.text
    assert openai.status_code == 200 or error_code(openai) == "transcription_pending"


def test_a_json_body_that_stalls_is_answered_408(server: Server) -> None:
    raw = Raw(server)
    raw.send(b"POST /v1/admin/codes HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n{")
    started = time.monotonic()
    status, _, body = raw.response()
    assert (status, error_code(body)) == (408, "request_timeout")
    assert BODY_TIMEOUT * 0.9 < time.monotonic() - started < WAIT
    assert raw.at_eof()
    raw.close()


def test_slow_headers_are_cut_off_at_the_deadline_while_healthz_stays_fast(
    server: Server,
) -> None:
    """40 clients dripping header lines and 10 that connect and send nothing: each is cut off
    though it keeps sending (those that began a request told 408 ``request_timeout``), while
    /healthz answers promptly throughout."""
    with ExitStack() as stack:
        dripping = [Raw(server) for _ in range(40)]
        idle = [Raw(server) for _ in range(10)]
        for raw in [*dripping, *idle]:
            stack.callback(raw.close)
        for raw in dripping:
            raw.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        with trickling(dripping, b"X-Slow: yes\r\n", every=0.2):
            for _ in range(5):
                asked = time.monotonic()
                health = httpx.get(server.base_url + "/healthz", timeout=WAIT)
                assert health.status_code == 200
                assert time.monotonic() - asked < HEALTHZ_LATENCY
            for raw in dripping:
                status, _, body = raw.response()
                assert (status, error_code(body)) == (408, "request_timeout")
                assert raw.at_eof()
        for raw in idle:
            assert raw.at_eof()


def test_a_refused_upload_is_not_read_on_while_its_client_keeps_sending(server: Server) -> None:
    """An upload without a code, announcing 1 GB and sending on: 401, then the server closes
    the connection instead of reading and dropping the rest."""
    raw = Raw(server)
    raw.send(
        b"POST /v1/transcriptions HTTP/1.1\r\nHost: test\r\n"
        + f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n".encode()
        + b"Content-Length: 1000000000\r\n\r\n"
    )
    with trickling([raw], b"\xff" * 1024, every=0.05):
        status, _, body = raw.response()
        assert (status, error_code(body)) == (401, "missing_code")
        assert raw.at_eof()
    raw.close()


def test_headers_larger_than_the_limit_are_refused(server: Server) -> None:
    raw = Raw(server)
    # 20 KiB of headers, never ended: more than the 16 KiB held while headers are incomplete.
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + b"X-Filler: " + b"a" * 20480)
    status, _, body = raw.response()
    assert (status, error_code(body)) == (400, "invalid_http_request")
    assert "16 KiB" in json.loads(body)["error"]["message"]
    assert raw.at_eof()
    raw.close()


def test_a_malformed_request_is_answered_in_the_error_shape(server: Server) -> None:
    raw = Raw(server)
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\nNo colon here\r\n\r\n")
    status, _, body = raw.response()
    assert (status, error_code(body)) == (400, "invalid_http_request")
    assert raw.at_eof()
    raw.close()


def test_an_upload_that_stalls_is_answered_408_and_its_temp_file_removed(
    server: Server,
) -> None:
    """An upload that stops sending in its file part: 408 ``upload_timeout`` after the body
    deadline, the partial file deleted, the code not charged."""
    code = server.create_code()
    before = credits(server, code)
    raw = start_upload(server, code)
    wait_until(lambda: len(temp_files(server)) == 1, "the upload's temp file")
    status, headers, body = raw.response()
    assert (status, error_code(body), headers["connection"]) == (408, "upload_timeout", "close")
    assert raw.at_eof()
    raw.close()
    assert temp_files(server) == []
    assert credits(server, code) == before


def test_an_upload_trickling_under_the_minimum_rate_is_answered_408_and_removed(
    server: Server,
) -> None:
    """A byte every quarter second beats the idle deadline forever, but at 4 bytes a second it
    is refused ``upload_too_slow`` after one or two rate windows, the partial file deleted and
    the slot free again, nothing charged."""
    code = server.create_code()
    before = credits(server, code)
    raw = start_upload(server, code)
    started = time.monotonic()
    with trickling([raw]):
        status, headers, body = raw.response()
    held = time.monotonic() - started
    assert (status, error_code(body), headers["connection"]) == (408, "upload_too_slow", "close")
    assert "faster connection" in json.loads(body)["error"]["message"]
    assert BODY_TIMEOUT <= held < 2 * BODY_TIMEOUT + WAIT / 4, held
    raw.close()
    wait_until(lambda: temp_files(server) == [], "the slow upload's temp file to go")
    assert credits(server, code) == before


def test_concurrent_uploads_are_capped_per_code_and_in_total(server: Server, mp3_5s: Path) -> None:
    """Two uploads in flight for one code and three in all: the next one is refused at once
    with 429 ``too_many_uploads`` and a Retry-After, nothing charged; when the held uploads
    end, their slots and temp files are gone and the refused upload goes through."""
    first, second, third = (server.create_code() for _ in range(3))
    with ExitStack() as stack:
        held = [start_upload(server, code) for code in (first, first, second)]
        for raw in held:
            stack.callback(raw.close)
        # 1,024 bytes a second each: above the minimum rate, so the slots stay held.
        stack.enter_context(trickling(held, b"\xff" * 256))
        for code, says in ((first, "This code already has 2 uploads"), (third, "as many uploads")):
            before = credits(server, code)
            refused = upload(server, code, mp3_5s)
            assert refused.status_code == 429, refused.text
            assert error_code(refused) == "too_many_uploads"
            assert says in refused.json()["error"]["message"]
            assert int(refused.headers["retry-after"]) > 0
            assert credits(server, code) == before
        assert len(temp_files(server)) == 3
    wait_until(lambda: temp_files(server) == [], "the hung-up uploads' temp files to go")
    accepted = upload(server, third, mp3_5s)
    assert accepted.status_code == 202, accepted.text
    assert temp_files(server) == []


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with uvicorn's own limits set low: four connections, one-second keep-alive."""
    data_dir = tmp_path_factory.mktemp("crowded") / "data"
    env = {"WHISPER_MAX_CONNECTIONS": "4", "WHISPER_KEEP_ALIVE_TIMEOUT": "1"}
    with running_server(data_dir, env=env, ready=False) as running:
        yield running


def test_requests_past_the_connection_limit_are_answered_503(crowded: Server) -> None:
    with ExitStack() as stack:
        held = []
        for _ in range(3):
            raw = Raw(crowded)
            stack.callback(raw.close)
            raw.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            assert raw.response()[0] == 200
            # The next request's first line keeps the connection open past the keep-alive.
            raw.send(b"GET /healthz HTTP/1.1\r\n")
            held.append(raw)
        busy = httpx.get(crowded.base_url + "/healthz", timeout=WAIT)
        assert (busy.status_code, error_code(busy)) == (503, "server_busy")
        assert int(busy.headers["retry-after"]) > 0
    wait_until(
        lambda: httpx.get(crowded.base_url + "/healthz", timeout=WAIT).status_code == 200,
        "the server to take requests again",
    )


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout(
    crowded: Server,
) -> None:
    raw = Raw(crowded)
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    assert raw.response()[0] == 200
    started = time.monotonic()
    assert raw.at_eof()
    assert 0.5 < time.monotonic() - started < WAIT
    raw.close()
