"""The web page in a real browser against a real server: upload, progress and transcript, a
double click, a reload and a server restart mid-job, cancel, and the server's own messages.

"Mid-job" needs a job that runs for a while: minutes of repeated speech, which the bundled
tiny.en model takes several seconds for even on an idle machine.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait
from sqlalchemy import select

from tests.fixtures.server import Server
from tests.speech import SCRIPT, SPEECH, repeated_speech, script
from tests.web.conftest import SERVER_ENV
from tests.web.page import UI_TIMEOUT, Page
from tests.wer import wer
from transcription.db.models import IdempotencyKey, Job

MAX_WER = 0.15
LONG_REPEATS = 6  # about four minutes of audio


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("web-audio") / "long-speech.mp3"
    repeated_speech(path, LONG_REPEATS)
    return path


def api(server: Server, code: str, path: str) -> Any:
    response = httpx.get(
        server.base_url + path, headers={"Authorization": f"Bearer {code}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def refusal(server: Server, code: str, files: dict[str, Any]) -> str:
    """The server's message for an upload it refuses, asked directly."""
    response = httpx.post(
        server.base_url + "/v1/transcriptions",
        headers={"Authorization": f"Bearer {code}"},
        files=files,
        timeout=30,
    )
    assert response.status_code >= 400, response.text
    message: str = response.json()["error"]["message"]
    return message


def assert_charged_once(server: Server, code: str) -> dict[str, Any]:
    """The code's one job, settled: one use spent, and the job's charge spent exactly once."""
    jobs = api(server, code, "/v1/transcriptions")["data"]
    assert len(jobs) == 1, jobs
    credit = api(server, code, "/v1/credits")
    assert credit["uses"] == 1, credit
    assert credit["reserved_seconds"] == 0, credit
    assert credit["spent_seconds"] == jobs[0]["charged_seconds"] > 0, (credit, jobs[0])
    job: dict[str, Any] = jobs[0]
    return job


def submit(page: Page, code: str, audio: Path) -> None:
    page.open()
    page.use_code(code)
    page.choose(audio)
    page.el("submit").click()


@pytest.mark.slow
def test_upload_shows_byte_progress_then_the_transcript(
    page: Page, web_server: Server, tmp_path: Path
) -> None:
    code = web_server.create_code()
    page.open()
    page.use_code(code)
    page.wait("the credit", lambda: page.text("credit").startswith("1 h of 1 h left"))
    page.choose(SPEECH)
    page.wait("the file chosen", lambda: page.text("file-info").startswith("speech.mp3"))
    Select(page.el("mode")).select_by_value("fast")
    page.el("language").send_keys("en")
    page.el("prompt").send_keys("A train journey to the coast.")
    page.throttle_upload(50_000)  # the 154 kB sample then takes about three seconds
    page.el("submit").click()

    def partly_uploaded() -> bool:
        sent, total = page.progress("upload-bar")
        return page.shown("upload-bar") and 0 < sent < total and total > SPEECH.stat().st_size

    page.wait("part of the upload's bytes on the bar", partly_uploaded)
    assert re.fullmatch(r"Uploading… \d+ kB of \d+ kB \(\d+ %\)", page.text("status"))
    assert not page.el("submit").is_enabled()

    text = page.wait_for_transcript()
    assert wer(SCRIPT, text) <= MAX_WER, text
    job = assert_charged_once(web_server, code)
    assert (job["language"], job["prompt"], job["mode"]) == (
        "en",
        "A train journey to the coast.",
        "fast",
    )
    assert page.text("job-id") == job["id"]
    assert page.text("job-status") == f"Done: {job['charged_seconds']} s charged."
    # The page followed the job through one event stream, not by asking for it again and again.
    log = web_server.log()
    assert log.count(f'"GET /v1/transcriptions/{job["id"]}/events HTTP') == 1
    assert log.count(f'"GET /v1/transcriptions/{job["id"]} HTTP') == 0
    page.wait("the credit spent", lambda: "1 of 1 use spent" in page.text("credit"))
    page.wait(
        "the job listed as succeeded",
        lambda: len(page.job_items()) == 1 and "succeeded" in page.job_items()[0].text,
    )

    # Downloads carry the code in a header, so the page fetches them and saves a blob.
    page.driver.find_element(By.CSS_SELECTOR, "#downloads button[aria-label$='.srt']").click()
    saved = tmp_path / "downloads" / "speech.srt"
    page.wait("the .srt saved", saved.exists)
    srt = httpx.get(
        f"{web_server.base_url}/v1/transcriptions/{job['id']}/transcript.srt",
        headers={"Authorization": f"Bearer {code}"},
    )
    assert saved.read_bytes() == srt.content

    page.driver.execute_cdp_cmd(
        "Browser.grantPermissions",
        {"origin": web_server.base_url, "permissions": ["clipboardReadWrite"]},
    )
    page.el("copy").click()
    page.wait("the copy confirmed", lambda: page.text("copy-note") == "Copied.")
    clipboard = page.driver.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0], (e) => arguments[0](String(e)))"
    )
    assert clipboard == text


@pytest.mark.slow
def test_a_double_click_makes_one_job_and_one_charge(page: Page, web_server: Server) -> None:
    # Two uses and credit for both: the server would take a second job, so only the page and
    # its Idempotency-Key stand between a double click and a double charge.
    code = web_server.create_code(max_uses=2)
    page.open()
    page.use_code(code)
    page.choose(SPEECH)
    page.throttle_upload(100_000)
    ActionChains(page.driver).double_click(page.el("submit")).perform()
    page.wait("the button disabled while uploading", lambda: not page.el("submit").is_enabled())
    # Enter in a field submits too, past the disabled button.
    page.driver.execute_script("document.getElementById('form').requestSubmit()")

    text = page.wait_for_transcript()
    assert wer(SCRIPT, text) <= MAX_WER, text
    assert page.el("submit").is_enabled()
    job = assert_charged_once(web_server, code)
    code_id = api(web_server, code, "/v1/credits")["id"]
    with web_server.database() as db, db.read() as session:
        keys = session.execute(
            select(IdempotencyKey.key, IdempotencyKey.job_id).where(
                IdempotencyKey.code_id == code_id
            )
        ).all()
    assert [(uuid.UUID(key).version, job_id) for key, job_id in keys] == [(4, job["id"])]
    page.wait(
        "exactly one job listed",
        lambda: [li.get_attribute("data-job-id") for li in page.job_items()] == [job["id"]],
    )
    page.wait("one use spent", lambda: "1 of 2 uses spent" in page.text("credit"))


@pytest.mark.slow
def test_a_reload_mid_job_shows_the_job_again_with_its_progress_until_it_finishes(
    page: Page, web_server: Server, long_speech: Path
) -> None:
    code = web_server.create_code()
    submit(page, code, long_speech)
    job_id = page.wait_until_running()
    assert page.driver.current_url.endswith(f"#job={job_id}")
    assert code not in page.driver.current_url

    page.driver.refresh()
    page.wait_while_running("the job shown again", lambda: page.text("job-id") == job_id)
    assert page.el("code").get_property("value") == code

    def progress_shown() -> bool:
        said = re.fullmatch(r"Running: (\d+) % of .+ transcribed\.", page.text("job-status"))
        return said is not None and int(said[1]) > 0 and 0 < page.job_progress() < 1

    page.wait_while_running("progress shown", progress_shown)
    text = page.wait_for_transcript()
    assert wer(script(LONG_REPEATS), text) <= MAX_WER, text
    assert_charged_once(web_server, code)


@pytest.mark.slow
def test_the_page_recovers_from_a_server_restart_mid_job(
    browser: WebDriver, start_server: Callable[..., Server], long_speech: Path
) -> None:
    server = start_server(env=SERVER_ENV)
    page = Page(browser, server.base_url)
    code = server.create_code()
    submit(page, code, long_speech)
    job_id = page.wait_until_running()

    server.kill()
    with server.database() as db, db.read() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "running", (
            "finished before the kill: audio too short"
        )
    page.wait(
        "the page to say it is reconnecting",
        lambda: page.shown("connection") and page.text("connection").startswith("Reconnecting…"),
    )
    port = server.port
    server.start()
    assert server.port == port, "the restarted server took another port; no page could follow"

    text = page.wait_for_transcript()
    assert wer(script(LONG_REPEATS), text) <= MAX_WER, text
    assert not page.shown("connection")
    assert "Failed to fetch" not in page.says()
    assert_charged_once(server, code)


@pytest.mark.slow
def test_cancel_stops_the_job_and_says_what_it_cost(
    page: Page, web_server: Server, long_speech: Path
) -> None:
    code = web_server.create_code()
    submit(page, code, long_speech)
    page.wait_until_running()
    page.el("cancel").click()
    WebDriverWait(page.driver, UI_TIMEOUT).until(expected_conditions.alert_is_present())
    page.driver.switch_to.alert.accept()

    page.wait("the job cancelled", lambda: page.text("job-status").startswith("Cancelled"))
    job = api(web_server, code, "/v1/transcriptions")["data"][0]
    assert job["status"] == "cancelled"
    if job["charged_seconds"]:
        assert "charged for the audio transcribed before it stopped" in page.text("job-status")
    else:
        assert page.text("job-status").endswith("Your credit was refunded.")
    assert not page.shown("cancel")
    page.wait(
        "the list to show it cancelled",
        lambda: (
            "cancelled" in page.job_items()[0].text
            and not page.job_items()[0].find_elements(By.XPATH, ".//button[text()='Cancel']")
        ),
    )


def test_a_wrong_code_shows_the_servers_message_at_phone_width(
    page: Page, web_server: Server
) -> None:
    page.driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 375, "height": 740, "deviceScaleFactor": 2, "mobile": True},
    )
    wrong = "wt_not-a-code-anyone-minted"
    expected = httpx.get(
        web_server.base_url + "/v1/credits", headers={"Authorization": f"Bearer {wrong}"}
    ).json()["error"]["message"]
    page.open()
    page.use_code(wrong)
    page.wait("the server's message for the code", lambda: page.text("credit") == expected)
    page.choose(SPEECH)
    page.el("submit").click()
    page.wait("the server's message for the upload", lambda: page.text("status") == expected)
    assert "error" in (page.el("status").get_attribute("class") or "")
    assert page.el("submit").is_enabled()
    assert page.driver.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth"
    ), "the page is wider than a phone's screen"


def test_a_file_that_is_not_mp3_shows_the_servers_message(
    page: Page, web_server: Server, wav_renamed_mp3: Path
) -> None:
    code = web_server.create_code()
    page.open()
    page.use_code(code)
    page.wait("the credit", lambda: "0 of 1 use spent" in page.text("credit"))

    page.drop_file("notes.txt", "Not audio at all.", "text/plain")
    page.wait("the dropped file chosen", lambda: page.text("file-info").startswith("notes.txt"))
    page.el("submit").click()
    expected = refusal(
        web_server, code, {"file": ("notes.txt", b"Not audio at all.", "text/plain")}
    )
    page.wait("the server's message for a text file", lambda: page.text("status") == expected)

    page.choose(wav_renamed_mp3)
    page.el("submit").click()
    expected = refusal(
        web_server,
        code,
        {"file": (wav_renamed_mp3.name, wav_renamed_mp3.read_bytes(), "audio/mpeg")},
    )
    page.wait("the server's message for a WAV file", lambda: page.text("status") == expected)

    credit = api(web_server, code, "/v1/credits")
    assert (credit["uses"], credit["reserved_seconds"], credit["spent_seconds"]) == (0, 0, 0)
    page.el("refresh").click()
    page.wait("no jobs listed", lambda: page.text("jobs-note") == "No jobs yet.")
