"""The in-process notifier and the watch loop behind ``?wait=`` and the events stream."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from gateway import jobwatch
from gateway.jobwatch import JobNotifier, watch


@dataclass
class Seen:
    status: str
    progress: float = 0.0


class Row:
    """A job "in the database": changed by the test, read by the watch loop."""

    def __init__(self) -> None:
        self.value = Seen("queued")
        self.reads = 0

    def read(self) -> Seen:
        self.reads += 1
        return self.value


def test_a_notification_from_another_thread_wakes_only_that_jobs_waiters() -> None:
    notifier = JobNotifier()

    async def scenario() -> tuple[bool, bool, float]:
        with notifier.subscribe("tr_a") as a, notifier.subscribe("tr_b") as b:
            started = time.monotonic()
            threading.Timer(0.05, notifier.notify, args=("tr_a",)).start()
            woke_a = await a.wait(10)
            took = time.monotonic() - started
            woke_b = await b.wait(0.05)
        return woke_a, woke_b, took

    woke_a, woke_b, took = asyncio.run(scenario())
    assert woke_a and not woke_b
    assert took < 5, "the waiter slept through its notification"
    assert notifier._subscriptions == {}


def test_a_notification_before_the_wait_is_not_lost_and_is_used_once() -> None:
    notifier = JobNotifier()

    async def scenario() -> tuple[bool, bool]:
        with notifier.subscribe("tr_a") as sub:
            notifier.notify("tr_a")
            await asyncio.sleep(0)  # the loop runs the wake-up before anyone waits
            return await sub.wait(10), await sub.wait(0.01)

    assert asyncio.run(scenario()) == (True, False)


def test_notify_without_waiters_or_loop_does_nothing() -> None:
    notifier = JobNotifier()
    notifier.notify("tr_a")  # no loop yet

    async def subscribe_once() -> None:
        with notifier.subscribe("tr_a"):
            pass

    asyncio.run(subscribe_once())
    notifier.notify("tr_a")  # its loop is closed now, and nobody waits
    assert notifier._subscriptions == {}


def test_watch_ends_when_the_job_finishes_and_is_woken_by_a_notification() -> None:
    notifier, row = JobNotifier(), Row()

    async def scenario() -> tuple[list[Seen], float]:
        seen = []
        started = time.monotonic()
        async for job in watch(notifier, "tr_a", row.read):
            seen.append(job)
            if len(seen) == 1:
                row.value = Seen("running", 0.5)
                notifier.notify("tr_a")
            elif len(seen) == 2:
                row.value = Seen("succeeded", 1.0)
                threading.Thread(target=notifier.notify, args=("tr_a",)).start()
        return seen, time.monotonic() - started

    seen, took = asyncio.run(scenario())
    assert [s.status for s in seen] == ["queued", "running", "succeeded"]
    assert took < jobwatch.REREAD_SECONDS, "a notified change waited for the re-read"


def test_watch_rereads_without_any_notification(monkeypatch: pytest.MonkeyPatch) -> None:
    """A change made elsewhere (no notification) is seen at the next re-read."""
    monkeypatch.setattr(jobwatch, "REREAD_SECONDS", 0.05)
    notifier, row = JobNotifier(), Row()

    async def scenario() -> list[str]:
        statuses = []
        async for job in watch(notifier, "tr_a", row.read, seconds=30):
            statuses.append(job.status)
            if row.reads == 3:
                row.value = Seen("failed")
        return statuses

    assert asyncio.run(scenario()) == ["queued", "queued", "queued", "failed"]


def test_watch_gives_up_after_its_seconds_with_the_job_as_it_is() -> None:
    notifier, row = JobNotifier(), Row()

    async def scenario() -> tuple[list[str], float]:
        started = time.monotonic()
        statuses = [job.status async for job in watch(notifier, "tr_a", row.read, seconds=0.3)]
        return statuses, time.monotonic() - started

    statuses, took = asyncio.run(scenario())
    assert set(statuses) == {"queued"}
    assert 0.3 <= took < 0.3 + jobwatch.REREAD_SECONDS
    assert notifier._subscriptions == {}
