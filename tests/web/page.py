"""The web page as the tests use it: fields, buttons and what it says, by element ID."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

T = TypeVar("T")

#: Deadlines are generous: the suite may share the machine with other CPU-heavy tests.
UI_TIMEOUT = 30.0
JOB_TIMEOUT = 300.0

#: How the job panel's status starts once the job has finished.
FINISHED = ("Done", "Failed", "Cancelled")

#: What the page says, for a timeout's message.
_SAYS = ("connection", "credit", "status", "job-id", "job-status", "jobs-note")


class Page:
    def __init__(self, driver: WebDriver, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url

    def open(self, fragment: str = "") -> None:
        self.driver.get(f"{self.base_url}/{fragment}")

    def el(self, element_id: str) -> WebElement:
        return self.driver.find_element(By.ID, element_id)

    def text(self, element_id: str) -> str:
        return self.el(element_id).text

    def shown(self, element_id: str) -> bool:
        return self.el(element_id).is_displayed()

    def says(self) -> str:
        return "; ".join(f"#{i}={self.text(i)!r}" for i in _SAYS)

    def wait(self, what: str, condition: Callable[[], T], timeout: float = UI_TIMEOUT) -> T:
        """``condition()``'s first truthy value, polled; on timeout the error says what the page
        showed instead. Elements replaced while polling (the job list is redrawn) count as not
        yet."""
        waiter = WebDriverWait(
            self.driver,
            timeout,
            poll_frequency=0.1,
            ignored_exceptions=(StaleElementReferenceException,),
        )
        try:
            return waiter.until(lambda _: condition())
        except TimeoutException:
            raise TimeoutException(f"timed out waiting for {what}; {self.says()}") from None

    def progress(self, element_id: str) -> tuple[float, float]:
        """A ``<progress>`` element's value and max."""
        value, maximum = self.driver.execute_script(
            "const bar = document.getElementById(arguments[0]); return [bar.value, bar.max];",
            element_id,
        )
        return float(value), float(maximum)

    def use_code(self, code: str) -> None:
        """Enter the code and wait for the page's answer (the credit, or why not), which moves
        the form below it: a click computed before the move would miss its button."""
        self.el("code").clear()
        self.el("code").send_keys(code)
        self.driver.find_element(By.CSS_SELECTOR, "#code-form button[type=submit]").click()
        self.wait("the code's credit or error", lambda: self.text("credit"))

    def choose(self, path: Path) -> None:
        self.el("file").send_keys(str(path.absolute()))

    def throttle_upload(self, bytes_per_second: int) -> None:
        """Slow this tab's uploads (Chromium's DevTools network emulation), so an upload lasts
        long enough to be seen in flight."""
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {
                "offline": False,
                "latency": 0,
                "downloadThroughput": -1,
                "uploadThroughput": bytes_per_second,
            },
        )

    def job_progress(self) -> float:
        """The shown job's progress while its bar is up, else -1."""
        return self.progress("job-bar")[0] if self.shown("job-bar") else -1.0

    def wait_while_running(
        self, what: str, condition: Callable[[], bool], timeout: float = JOB_TIMEOUT
    ) -> None:
        """Wait for ``condition`` while the shown job runs; fail at once if it finishes first
        (the audio was too short for the test)."""

        def check() -> bool:
            status = self.text("job-status")
            assert not status.startswith(FINISHED), f"finished before {what}: {status!r}"
            return status.startswith("Running") and condition()

        self.wait(what, check, timeout)

    def wait_until_running(self, timeout: float = JOB_TIMEOUT) -> str:
        """The shown job's ID once the page shows it running."""
        self.wait_while_running("the job to run", lambda: True, timeout)
        return self.text("job-id")

    def wait_for_transcript(self, timeout: float = JOB_TIMEOUT) -> str:
        self.wait("the transcript", lambda: self.shown("result"), timeout)
        return self.text("text")

    def job_items(self) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, "#jobs li")

    def drop_file(self, name: str, content: str, media_type: str) -> None:
        """Drop a file on the page as a drag from the desktop would (WebDriver cannot drag
        files in, so the drop event is built in the page)."""
        self.driver.execute_script(
            """
            const [name, content, type] = arguments;
            const data = new DataTransfer();
            data.items.add(new File([content], name, { type }));
            const target = document.getElementById("drop");
            for (const kind of ["dragover", "drop"]) {
              target.dispatchEvent(new DragEvent(kind, { bubbles: true, cancelable: true, dataTransfer: data }));
            }
            """,
            name,
            content,
            media_type,
        )
