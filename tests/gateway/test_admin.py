"""The admin API (codes and every transcription) and the health probes."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select

from gateway.app import create_app
from tests.fixtures.gateway import (
    ADMIN,
    ADMIN_TOKEN,
    BlockingEngine,
    FixedEngine,
    MakeClient,
    SlowLoadingEngine,
    auth,
    credits,
    eventually,
    issue_code,
    serve,
    services,
    submit,
)
from transcription.db.models import Base
from transcription.settings import GatewaySettings


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    return make_client()


def admin_get(client: TestClient, path: str, **params: Any) -> dict[str, Any]:
    response = client.get(path, params=params, headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def patch(client: TestClient, code_id: str, **changes: Any) -> dict[str, Any]:
    response = client.patch(f"/v1/admin/codes/{code_id}", json=changes, headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_the_admin_api_is_off_without_a_configured_token(make_client: MakeClient) -> None:
    client = make_client(admin_token=None)
    for method, path in (("POST", "/v1/admin/codes"), ("GET", "/v1/admin/transcriptions")):
        response = client.request(method, path, json={}, headers=ADMIN)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "admin_api_disabled"


@pytest.mark.parametrize("headers", [{}, auth("not-the-token"), {"Authorization": "Basic x"}])
def test_the_admin_api_needs_the_exact_token(client: TestClient, headers: dict[str, str]) -> None:
    for method, path in (("POST", "/v1/admin/codes"), ("GET", "/v1/admin/codes")):
        response = client.request(method, path, json={"seconds": 60}, headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_admin_token"
    assert admin_get(client, "/v1/admin/codes")["data"] == []


def test_a_credit_code_is_not_an_admin_token(client: TestClient) -> None:
    issued = issue_code(client)
    response = client.get("/v1/admin/codes", headers=auth(issued.code))
    assert response.status_code == 401


def test_a_new_code_is_shown_once_and_stored_only_as_a_hash(client: TestClient) -> None:
    expires = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    response = client.post(
        "/v1/admin/codes",
        json={
            "seconds": 120,
            "max_uses": 3,
            "label": "workshop",
            "expires_at": expires.isoformat(),
        },
        headers=ADMIN,
    )
    assert response.status_code == 201, response.text
    created = response.json()
    code = created["code"]
    assert code.startswith("wt_") and len(code) >= 3 + 22  # at least 128 bits in base64
    assert created["hint"].endswith(code[-4:])
    assert (created["budget_seconds"], created["max_uses"], created["label"]) == (
        120,
        3,
        "workshop",
    )
    assert created["expires_at"].startswith("2031-01-02T03:04:05")
    assert (created["state"], created["uses"], created["remaining_seconds"]) == ("active", 0, 120)

    shown = client.get(f"/v1/admin/codes/{created['id']}", headers=ADMIN)
    listed = client.get("/v1/admin/codes", headers=ADMIN)
    for response in (shown, listed):
        assert response.status_code == 200
        assert code not in response.text
        assert '"code"' not in response.text
    assert shown.json() == {k: v for k, v in created.items() if k != "code"}
    with services(client).db.transaction() as session:
        for table in Base.metadata.sorted_tables:
            rows = session.execute(select(table)).all()
            assert code not in repr(rows), table.name
    # The secret is what the holder presents, and it works.
    assert credits(client, code)["id"] == created["id"]


def test_codes_are_listed_newest_first_in_pages(client: TestClient) -> None:
    ids = [issue_code(client, label=f"code {n}").id for n in range(3)]

    first = admin_get(client, "/v1/admin/codes", limit=2)
    assert [c["id"] for c in first["data"]] == [ids[2], ids[1]]
    assert first["has_more"] is True
    rest = admin_get(client, "/v1/admin/codes", limit=2, after=ids[1])
    assert [c["id"] for c in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False
    unknown = client.get("/v1/admin/codes", params={"after": "cc_nope"}, headers=ADMIN)
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "after"


def test_patch_tops_up_extends_clears_expiry_and_changes_uses(
    client: TestClient, mp3_5s: Path
) -> None:
    issued = issue_code(client, seconds=5)
    too_short = submit(client, issued.code, mp3_5s)
    assert too_short.json()["error"]["code"] == "insufficient_credit"

    topped = patch(client, issued.id, add_seconds=100)
    assert (topped["budget_seconds"], topped["remaining_seconds"]) == (105, 105)
    assert submit(client, issued.code, mp3_5s).status_code == 202
    assert submit(client, issued.code, mp3_5s).json()["error"]["code"] == "code_used"

    assert patch(client, issued.id, max_uses=2)["max_uses"] == 2
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    assert patch(client, issued.id, expires_at=past)["state"] == "expired"
    assert submit(client, issued.code, mp3_5s).json()["error"]["code"] == "code_expired"
    future = datetime.now(UTC) + timedelta(days=30)
    extended = patch(client, issued.id, expires_at=future.isoformat())
    assert datetime.fromisoformat(extended["expires_at"]) == pytest.approx(
        future, abs=timedelta(seconds=1)
    )
    assert patch(client, issued.id, expires_at=None)["expires_at"] is None
    assert submit(client, issued.code, mp3_5s).status_code == 202
    assert credits(client, issued.code)["uses"] == 2

    below_uses = client.patch(f"/v1/admin/codes/{issued.id}", json={"max_uses": 1}, headers=ADMIN)
    assert below_uses.status_code == 400
    assert below_uses.json()["error"]["param"] == "max_uses"
    unknown_field = client.patch(
        f"/v1/admin/codes/{issued.id}", json={"budget_seconds": 9}, headers=ADMIN
    )
    assert unknown_field.status_code == 400
    assert admin_get(client, f"/v1/admin/codes/{issued.id}")["budget_seconds"] == 105


@pytest.mark.parametrize("how", ["patch", "delete"])
def test_a_revoked_code_cannot_start_jobs(client: TestClient, mp3_5s: Path, how: str) -> None:
    issued = issue_code(client)
    if how == "patch":
        revoked = patch(client, issued.id, revoked=True)
    else:
        response = client.delete(f"/v1/admin/codes/{issued.id}", headers=ADMIN)
        assert response.status_code == 200, response.text
        revoked = response.json()
    assert revoked["state"] == "revoked"
    assert revoked["revoked_at"] is not None

    response = submit(client, issued.code, mp3_5s)
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "code_revoked"
    assert credits(client, issued.code)["state"] == "revoked"
    # Revocation is for good: more seconds or uses are refused rather than seeming applied.
    for body in ({"add_seconds": 60}, {"max_uses": 5}):
        refused = client.patch(f"/v1/admin/codes/{issued.id}", json=body, headers=ADMIN)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "code_revoked"
    unchanged = admin_get(client, f"/v1/admin/codes/{issued.id}")
    assert (unchanged["budget_seconds"], unchanged["max_uses"]) == (3600, 1)


@pytest.mark.parametrize(
    ("method", "body"), [("GET", None), ("PATCH", {"max_uses": 2}), ("DELETE", None)]
)
def test_an_unknown_code_id_is_a_404(client: TestClient, method: str, body: Any) -> None:
    response = client.request(method, "/v1/admin/codes/cc_missing", json=body, headers=ADMIN)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"


def test_admin_sees_every_transcription_filtered_by_code_and_status(
    make_client: MakeClient, mp3_5s: Path
) -> None:
    engine = BlockingEngine()
    client = make_client(engine=engine)
    alice, bob = issue_code(client), issue_code(client)
    running = submit(client, alice.code, mp3_5s).json()["id"]
    engine.wait_started()
    queued = submit(client, bob.code, mp3_5s).json()["id"]
    cancelled = client.delete(f"/v1/transcriptions/{queued}", headers=auth(bob.code))
    assert cancelled.status_code == 200

    def ids(**params: Any) -> list[str]:
        return [j["id"] for j in admin_get(client, "/v1/admin/transcriptions", **params)["data"]]

    assert ids() == [queued, running]
    assert ids(code_id=alice.id) == [running]
    assert ids(code_id=bob.id) == [queued]
    assert ids(status="running") == [running]
    assert ids(status="cancelled") == [queued]
    assert ids(code_id=bob.id, status="running") == []
    assert ids(limit=1, after=queued) == [running]
    bad_status = client.get("/v1/admin/transcriptions?status=paused", headers=ADMIN)
    assert bad_status.status_code == 400
    assert client.get("/v1/admin/transcriptions", headers=auth(alice.code)).status_code == 401


def test_healthz_answers_while_readyz_waits_for_the_model(make_client: MakeClient) -> None:
    engine = SlowLoadingEngine()
    client = make_client(engine=engine)
    assert client.get("/healthz").json() == {"status": "ok"}
    waiting = client.get("/readyz")
    assert waiting.status_code == 503
    assert waiting.json()["checks"] == {"database": "ok", "runner": "starting"}

    engine.release()
    eventually(lambda: client.get("/readyz").status_code == 200, what="readiness")
    assert client.get("/readyz").json()["status"] == "ok"


def test_readyz_stays_unready_when_the_model_cannot_load(make_client: MakeClient) -> None:
    engine = SlowLoadingEngine(load_error=RuntimeError("model.bin is missing"))
    client = make_client(engine=engine)
    engine.release()
    assert engine.load_finished.wait(10)
    time.sleep(0.1)  # time enough for a runner that ignored the failure to report ready
    response = client.get("/readyz")
    assert response.status_code == 503
    # The reason is named, so an operator reading the probe knows it will not come up by itself.
    assert response.json()["checks"]["runner"].startswith("error: ")
    assert "model.bin is missing" in response.json()["checks"]["runner"]


def test_a_code_is_usable_the_moment_its_creation_is_answered(tmp_path: Path) -> None:
    """The admin API commits before it answers: with every commit slowed down, the code it
    returns works on the very next request (a real server; TestClient hides the ordering)."""
    config = GatewaySettings(data_dir=tmp_path / "data", admin_token=ADMIN_TOKEN, concurrency=1)
    app = create_app(config, engine=FixedEngine())
    with serve(app) as url:
        engine = app.state.services.db.engine
        event.listen(engine, "commit", lambda _connection: time.sleep(0.5))
        for _ in range(3):
            created = httpx.post(
                url + "/v1/admin/codes", json={"seconds": 60}, headers=ADMIN, timeout=30
            )
            assert created.status_code == 201, created.text
            balance = httpx.get(url + "/v1/credits", headers=auth(created.json()["code"]))
            assert balance.status_code == 200, balance.text
