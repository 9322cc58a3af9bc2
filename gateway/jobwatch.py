"""Waiting for a job to change without polling hard or holding a thread: ``?wait=`` and the
events stream.

A waiter reads the job in a short session off the event loop, then sleeps on an asyncio event
until this process's lifecycle changes the job (``JobNotifier``) or ``REREAD_SECONDS`` pass,
and reads it again. The notification only shortens the wait; the re-read is what sees changes
made by other processes (the operator, another gateway replica), so nothing depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Protocol, TypeVar

from fastapi.concurrency import run_in_threadpool

from transcription.states import JobStatus

#: Longest a waiter goes without reading the job again from the database.
REREAD_SECONDS = 1.0


class Status(Protocol):
    @property
    def status(self) -> str: ...


S = TypeVar("S", bound=Status)


class Subscription:
    """One waiter's interest in one job: set when the job changes, cleared when waited on."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()

    async def wait(self, seconds: float) -> bool:
        """Sleep until the job changes or ``seconds`` pass; whether it changed."""
        try:
            async with asyncio.timeout(max(seconds, 0.0)):
                await self.changed.wait()
        except TimeoutError:
            return False
        self.changed.clear()
        return True


class JobNotifier:
    """Wakes the subscriptions of a job when ``notify`` is called for it, from any thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscriptions: dict[str, set[Subscription]] = {}

    @contextlib.contextmanager
    def subscribe(self, job_id: str) -> Iterator[Subscription]:
        """Subscribe, on the event loop, for the block's duration."""
        self._loop = asyncio.get_running_loop()
        subscription = Subscription()
        self._subscriptions.setdefault(job_id, set()).add(subscription)
        try:
            yield subscription
        finally:
            waiting = self._subscriptions.get(job_id, set())
            waiting.discard(subscription)
            if not waiting:
                self._subscriptions.pop(job_id, None)

    def notify(self, job_id: str) -> None:
        """Called after a change to the job is committed; cheap when nobody waits for it."""
        loop = self._loop
        if loop is None or job_id not in self._subscriptions:
            return
        # A closed loop (the app stopped) has nobody left to wake.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._wake, job_id)

    def _wake(self, job_id: str) -> None:
        for subscription in self._subscriptions.get(job_id, ()):
            subscription.changed.set()


async def watch(
    notifier: JobNotifier, job_id: str, read: Callable[[], S], *, seconds: float | None = None
) -> AsyncIterator[S]:
    """The job as ``read()`` (run in a worker thread for a moment) finds it now, then after each
    change notified and each re-read interval, until it has finished or ``seconds`` have
    passed."""
    deadline = None if seconds is None else time.monotonic() + seconds
    with notifier.subscribe(job_id) as subscription:
        while True:
            current = await run_in_threadpool(read)
            yield current
            if JobStatus(current.status).finished:
                return
            pause = REREAD_SECONDS
            if deadline is not None:
                pause = min(pause, deadline - time.monotonic())
                if pause <= 0:
                    return
            await subscription.wait(pause)
