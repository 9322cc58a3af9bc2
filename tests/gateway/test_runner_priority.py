"""Transcription yields the CPU to the HTTP event loop (bench/abuse.py measures the effect)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from gateway.runners.local import WORKER_NICENESS, yield_to_requests


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are Linux's")
def test_a_worker_thread_runs_at_lower_priority_and_the_server_thread_does_not() -> None:
    seen: list[int] = []

    def worker() -> None:
        yield_to_requests()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [max(before, WORKER_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
