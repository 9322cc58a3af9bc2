"""``whisperctl jobs …`` and ``whisperctl credits`` against real servers, and Ctrl-C during
``submit --wait``: the ID and what to do next are printed, and the job runs on unless the user
asked for it to be cancelled."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.fixtures.gateway import eventually
from tests.fixtures.server import (
    WHISPERCTL,
    Server,
    clean_env,
    free_port,
    running_server,
    stalled_server,
)
from whisperctl import app, jobs

DATA = Path(__file__).parents[1] / "data"


def whisperctl(
    *args: str, server: Server | None = None, code: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``whisperctl ARGS`` as a user would, with the code and URL in the environment."""
    if server is not None:
        env["WHISPER_URL"] = server.base_url
    if code is not None:
        env["WHISPER_CODE"] = code
    return subprocess.run(
        [WHISPERCTL, *args],
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def api(server: Server, code: str, method: str, path: str) -> Any:
    response = httpx.request(
        method, server.base_url + path, headers={"Authorization": f"Bearer {code}"}, timeout=30
    )
    assert response.is_success, response.text
    return response.json() if "json" in response.headers["content-type"] else response.text


def upload(server: Server, code: str, audio: Path) -> str:
    response = httpx.post(
        server.base_url + "/v1/transcriptions",
        headers={"Authorization": f"Bearer {code}"},
        files={"file": (audio.name, audio.read_bytes(), "audio/mpeg")},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def refused(result: subprocess.CompletedProcess[str], status: int, message: str) -> None:
    """The command failed with ``status``, saying ``message`` on stderr and nothing else."""
    assert result.returncode == status, result.stdout + result.stderr
    assert message in " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stderr).split())
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that transcribes (the bundled tiny.en)."""
    with running_server(tmp_path_factory.mktemp("jobs") / "data") as server:
        yield server


@pytest.fixture(scope="module")
def stalled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with stalled_server(tmp_path_factory.mktemp("stalled") / "data") as server:
        yield server


@pytest.fixture(scope="module")
def finished(server: Server, mp3_5s: Path) -> tuple[str, list[str]]:
    """A code and its three succeeded jobs, oldest first."""
    code = server.create_code(seconds=600, max_uses=10)
    ids = [upload(server, code, mp3_5s) for _ in range(3)]
    for job_id in ids:
        eventually(
            lambda job_id=job_id: (
                api(server, code, "GET", f"/v1/transcriptions/{job_id}")["status"] == "succeeded"
            ),
            timeout=120,
            what=f"{job_id} succeeding",
        )
    return code, ids


def test_jobs_list_shows_the_codes_jobs_newest_first(
    server: Server, finished: tuple[str, list[str]]
) -> None:
    """A table for people, JSON for scripts, ``--limit`` and ``--status`` as filters."""
    code, ids = finished
    listed = whisperctl("jobs", "list", "--json", server=server, code=code)
    assert listed.returncode == 0, listed.stderr
    assert [job["id"] for job in json.loads(listed.stdout)] == ids[::-1]
    table = whisperctl("jobs", "list", server=server, code=code, COLUMNS="120")
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines() if line.strip().startswith("tr_")]
    assert [row[:2] for row in rows] == [[job_id, "succeeded"] for job_id in ids[::-1]]
    assert all(row[2:4] == ["5.0", "s"] for row in rows), table.stdout
    newest = whisperctl("jobs", "list", "--limit", "1", "--json", server=server, code=code)
    assert [job["id"] for job in json.loads(newest.stdout)] == [ids[-1]]
    assert (
        "more jobs: --limit 21 shows older ones"
        in whisperctl("jobs", "list", "--limit", "1", server=server, code=code).stderr
    )
    none = whisperctl("jobs", "list", "--status", "running", "--json", server=server, code=code)
    assert json.loads(none.stdout) == []


def test_jobs_list_follows_the_cursor_across_pages(
    server: Server, finished: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With pages of one job, the list still holds every job once, in order."""
    code, ids = finished
    monkeypatch.setattr(jobs, "PAGE", 1)
    env = {"WHISPER_URL": server.base_url, "WHISPER_CODE": code}
    result = CliRunner(env=env).invoke(app, ["jobs", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert [job["id"] for job in json.loads(result.stdout)] == ids[::-1]


def test_jobs_show_transcript_and_delete(
    server: Server, finished: tuple[str, list[str]], tmp_path: Path
) -> None:
    code, ids = finished
    job_id = ids[0]
    shown = whisperctl("jobs", "show", job_id, server=server, code=code)
    assert shown.returncode == 0, shown.stderr
    assert re.search(rf"^\s+id: {job_id}$", shown.stdout, re.MULTILINE)
    assert re.search(r"^\s+status: succeeded$", shown.stdout, re.MULTILINE)
    assert f"transcript: whisperctl jobs transcript {job_id} --url {server.base_url}" in (
        shown.stdout
    )
    as_json = json.loads(
        whisperctl("jobs", "show", job_id, "--json", server=server, code=code).stdout
    )
    assert as_json == api(server, code, "GET", f"/v1/transcriptions/{job_id}")
    for fmt in ("txt", "srt", "vtt", "json"):
        printed = whisperctl(
            "jobs", "transcript", job_id, "--format", fmt, server=server, code=code
        )
        assert printed.returncode == 0, printed.stderr
        expected = api(server, code, "GET", f"/v1/transcriptions/{job_id}/transcript.{fmt}")
        assert printed.stdout == (expected if isinstance(expected, str) else printed.stdout)
    saved = tmp_path / "t.vtt"
    written = whisperctl(
        "jobs", "transcript", job_id, "--format", "vtt", "-o", str(saved), server=server, code=code
    )
    assert written.returncode == 0, written.stderr
    assert saved.read_text().startswith("WEBVTT")
    assert f"transcript saved to {saved}" in written.stderr

    cancel = whisperctl("jobs", "cancel", job_id, server=server, code=code)
    refused(cancel, 1, f"error: job {job_id} has already succeeded: nothing to cancel")
    deleted = whisperctl("jobs", "delete", job_id, server=server, code=code)
    assert deleted.returncode == 0, deleted.stderr
    assert f"job {job_id} deleted, with its transcripts" in deleted.stderr
    gone = whisperctl("jobs", "show", job_id, server=server, code=code)
    refused(gone, 1, f"error: HTTP 404: No transcription with ID '{job_id}'. (not_found)")
    assert job_id not in whisperctl("jobs", "list", server=server, code=code).stdout


def test_credits_shows_the_balance(server: Server, finished: tuple[str, list[str]]) -> None:
    code, ids = finished
    balance = api(server, code, "GET", "/v1/credits")
    as_json = whisperctl("credits", "--json", server=server, code=code)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == balance
    human = whisperctl("credits", server=server, code=code)
    assert re.search(rf"^\s+remaining_seconds: {balance['remaining_seconds']}$", human.stdout, re.M)
    assert re.search(rf"^\s+uses: {len(ids)}$", human.stdout, re.MULTILINE)


def test_cancel_and_delete_of_unfinished_jobs(stalled: Server, mp3_5s: Path) -> None:
    """A queued job is cancelled and refunded with its use; a running one cannot be deleted
    before it is cancelled, and a cancelled one cannot be cancelled again."""
    code = stalled.create_code(seconds=100, max_uses=3)
    running, queued = upload(stalled, code, mp3_5s), upload(stalled, code, mp3_5s)
    eventually(
        lambda: api(stalled, code, "GET", f"/v1/transcriptions/{running}")["status"] == "running",
        timeout=60,
        what="the first job running",
    )
    reserved = api(stalled, code, "GET", f"/v1/transcriptions/{queued}")["reserved_seconds"]
    cancelled = whisperctl("jobs", "cancel", queued, server=stalled, code=code)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"job {queued} cancelled: its {reserved} s of credit were refunded in full" in (
        cancelled.stderr
    )
    assert api(stalled, code, "GET", "/v1/credits")["uses"] == 1
    again = whisperctl("jobs", "cancel", queued, server=stalled, code=code)
    refused(again, 1, f"error: job {queued} has already cancelled: nothing to cancel")

    deleted = whisperctl("jobs", "delete", running, server=stalled, code=code)
    refused(deleted, 1, f"error: job {running} is running: cancel it first")
    assert api(stalled, code, "GET", f"/v1/transcriptions/{running}")["status"] == "running"
    transcript = whisperctl("jobs", "transcript", running, server=stalled, code=code)
    refused(transcript, 1, "error: HTTP 409: No transcript: the job is running.")
    stopped = whisperctl("jobs", "cancel", running, server=stalled, code=code)
    assert stopped.returncode == 0, stopped.stderr
    job = api(stalled, code, "GET", f"/v1/transcriptions/{running}")
    assert job["status"] == "cancelled"
    assert whisperctl("jobs", "delete", running, server=stalled, code=code).returncode == 0


def submit_and_interrupt(
    server: Server, code: str, audio: Path, *args: str
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """Run ``submit --wait`` and press Ctrl-C (SIGINT) once it has printed the job ID."""
    command = [WHISPERCTL, "submit", str(audio), "--wait", "--url", server.base_url, *args]
    process = subprocess.Popen(
        command,
        env=clean_env({"WHISPER_CODE": code}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    seen = b""
    while not (printed := re.search(rb"job (tr_[0-9a-f]+): ", seen)):
        assert select.select([process.stderr], [], [], 60)[0], seen
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, f"submit ended before printing the job ID: {seen!r}"
        seen += chunk
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    result = subprocess.CompletedProcess(
        command, process.returncode, out.decode(), (seen + err).decode()
    )
    return printed.group(1).decode(), result


def test_ctrl_c_while_waiting_leaves_the_job_running(stalled: Server, mp3_5s: Path) -> None:
    """Exit 130 with the ID and how to follow or cancel it; the job carries on, reserved."""
    code = stalled.create_code(seconds=100, max_uses=3)
    job_id, result = submit_and_interrupt(stalled, code, mp3_5s)
    assert result.returncode == 130, result.stderr
    assert f"interrupted: stopped waiting; job {job_id} carries on in the service." in (
        result.stderr
    )
    assert f"follow it: whisperctl jobs show {job_id} --url {stalled.base_url} --wait" in (
        result.stderr
    )
    assert f"cancel it: whisperctl jobs cancel {job_id} --url {stalled.base_url}" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert api(stalled, code, "GET", f"/v1/transcriptions/{job_id}")["status"] in (
        "queued",
        "running",
    )
    job = api(stalled, code, "GET", f"/v1/transcriptions/{job_id}")
    assert api(stalled, code, "GET", "/v1/credits")["reserved_seconds"] == job["reserved_seconds"]

    # Following it again and pressing Ctrl-C once more says the same.
    followed = f'"GET /v1/transcriptions/{job_id}/events HTTP'
    before = stalled.log().count(followed)
    process = subprocess.Popen(
        [WHISPERCTL, "jobs", "show", job_id, "--wait", "--url", stalled.base_url],
        env=clean_env({"WHISPER_CODE": code}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Its first request reads the job, the next one follows it: interrupt while it follows.
    eventually(lambda: stalled.log().count(followed) > before, what="jobs show following")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert f"interrupted: stopped waiting; job {job_id} carries on in the service." in err
    assert whisperctl("jobs", "cancel", job_id, server=stalled, code=code).returncode == 0


def test_jobs_show_wait_follows_the_job_across_a_server_restart(
    stalled: Server, mp3_5s: Path
) -> None:
    """The event stream breaks when the server dies; the command opens it again once the server
    is back and ends with the job's final state."""
    code = stalled.create_code(seconds=100, max_uses=3)
    job_id = upload(stalled, code, mp3_5s)
    followed = f'"GET /v1/transcriptions/{job_id}/events HTTP'
    process = subprocess.Popen(
        [WHISPERCTL, "jobs", "show", job_id, "--wait", "--json", "--url", stalled.base_url],
        env=clean_env({"WHISPER_CODE": code}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    eventually(lambda: followed in stalled.log(), what="jobs show following")
    stalled.kill()
    stalled.start()
    eventually(lambda: stalled.log().count(followed) >= 2, what="jobs show following again")
    assert process.poll() is None, process.communicate()
    api(stalled, code, "DELETE", f"/v1/transcriptions/{job_id}")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert json.loads(out)["status"] == "cancelled"
    assert "Traceback" not in err


def test_ctrl_c_with_cancel_on_interrupt_cancels_and_says_what_it_cost(
    stalled: Server, mp3_5s: Path
) -> None:
    code = stalled.create_code(seconds=100, max_uses=3)
    job_id, result = submit_and_interrupt(stalled, code, mp3_5s, "--cancel-on-interrupt")
    assert result.returncode == 130, result.stderr
    assert re.search(
        rf"interrupted: job {job_id} cancelled(: its \d+ s of credit were refunded in full| "
        r"while running: \d+ s of the \d+ s reserved were charged)",
        result.stderr,
    ), result.stderr
    assert "Traceback" not in result.stderr
    job = api(stalled, code, "GET", f"/v1/transcriptions/{job_id}")
    assert job["status"] == "cancelled"
    assert api(stalled, code, "GET", "/v1/credits")["reserved_seconds"] == 0


@pytest.mark.parametrize(
    ("args", "env", "status", "message"),
    [
        (["jobs", "show", ""], {}, 2, "Invalid value for JOB_ID: is empty"),
        (["jobs", "show", "tr_1 "], {}, 2, "'tr_1 ' has spaces or line breaks around it"),
        (["jobs", "list", "--limit", "0"], {}, 2, "Invalid value for '--limit'"),
        (["jobs", "list", "--status", "done"], {}, 2, "Invalid value for '--status'"),
        (["credits", "--code", ""], {}, 2, "Invalid value for --code: is empty"),
        (["credits"], {"WHISPER_CODE": " wt_padded"}, 2, "has spaces or line breaks around it"),
        (["credits", "--code", "wt_a b"], {}, 2, "non-ASCII characters or spaces inside"),
        (["credits", "--code", "wt_é"], {}, 2, "non-ASCII characters or spaces inside"),
        (["credits"], {"WHISPER_CODE": ""}, 2, "error: WHISPER_CODE is empty"),
        (["credits", "--url", "localhost:8000"], {}, 2, "is not an http:// or https:// URL"),
        (["jobs", "transcript", "tr_1", "--format", "doc"], {}, 2, "Invalid value for '--format'"),
    ],
)
def test_usage_errors_exit_2_before_any_request(
    args: list[str], env: dict[str, str], status: int, message: str
) -> None:
    """Refused on the spot (the URL answers nothing, so no request was ever needed)."""
    env = {
        "WHISPER_CODE": "wt_" + "x" * 32,
        "WHISPER_URL": f"http://127.0.0.1:{free_port()}",
        **env,
    }
    refused(whisperctl(*args, **env), status, message)


def test_submit_refuses_a_wrong_mode_or_language_before_the_upload(mp3_5s: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for option, message in (
        (["--mode", "fastest"], "Invalid value for '--mode'"),
        (["--language", "english"], "Invalid value for --language: language must be an ISO-639-1"),
        (["--prompt", "x" * 2001], "prompt is limited to 2000 characters"),
        (["--idempotency-key", " key"], "--idempotency-key: ' key' has spaces or line breaks"),
        (["--idempotency-key", "clé"], "non-ASCII characters inside"),
    ):
        result = whisperctl("submit", str(mp3_5s), *option, "--url", url, WHISPER_CODE="wt_x")
        refused(result, 2, message)


def test_server_refusals_exit_1_with_the_servers_message(server: Server) -> None:
    unknown = whisperctl(
        "jobs", "show", "tr_0000000000000000", server=server, code=server.create_code()
    )
    refused(unknown, 1, "error: HTTP 404: No transcription with ID 'tr_0000000000000000'.")
    wrong = whisperctl("jobs", "list", server=server, code="wt_" + "x" * 32)
    refused(wrong, 1, "error: HTTP 401: The credit code is not valid. (invalid_code)")
    unreachable = f"http://127.0.0.1:{free_port()}"
    gone = whisperctl("credits", WHISPER_URL=unreachable, WHISPER_CODE="wt_x")
    refused(gone, 2, f"error: cannot reach {unreachable}")
