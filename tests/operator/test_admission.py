"""Admission order, as a pure function of what the reconcile pass lists: first come, first
served, even while kopf is still accepting new TranscriptionJobs out of order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from transcription import resources
from transcription_operator.reconcile import ACCEPT_GRACE_SECONDS, select

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def tj(name: str, submitted: datetime, phase: str | None) -> dict[str, Any]:
    stamp = submitted.isoformat(timespec="microseconds")
    body: dict[str, Any] = {
        "metadata": {
            "name": name,
            "namespace": "whisper",
            "annotations": {resources.SUBMITTED_AT: stamp},
        }
    }
    if phase is not None:
        body["status"] = {"phase": phase}
    return body


def admitted(tjs: list[dict[str, Any]], cap: int = 5) -> list[str]:
    admit, _, _ = select(tjs, [], SimpleNamespace(max_running_jobs=cap), now=NOW)
    return [t["metadata"]["name"] for t in admit]


def test_queued_jobs_are_admitted_in_submission_order_up_to_the_cap() -> None:
    tjs = [tj(f"tr-{n}", NOW - timedelta(seconds=10 - n), "Queued") for n in (3, 1, 2)]
    assert admitted(tjs, cap=2) == ["tr-1", "tr-2"]


def test_a_recent_submission_not_yet_accepted_holds_back_later_ones() -> None:
    """tr-2 was submitted before tr-3 but kopf has not accepted it yet: tr-3 waits for it."""
    tjs = [
        tj("tr-1", NOW - timedelta(seconds=3), "Queued"),
        tj("tr-2", NOW - timedelta(seconds=2), None),
        tj("tr-3", NOW - timedelta(seconds=1), "Queued"),
    ]
    assert admitted(tjs) == ["tr-1"]


def test_one_left_unaccepted_past_the_grace_holds_nothing_back() -> None:
    old = NOW - timedelta(seconds=ACCEPT_GRACE_SECONDS + 1)
    tjs = [tj("tr-1", old, None), tj("tr-2", NOW - timedelta(seconds=1), "Queued")]
    assert admitted(tjs) == ["tr-2"]
