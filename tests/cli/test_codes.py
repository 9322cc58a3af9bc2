"""``whisperctl codes``: minting, listing, showing, revoking and topping up credit codes."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from tests.fixtures.server import running_server
from whisperctl import app

Codes = Callable[..., Result]

# Unset for every invocation, so the caller's own service settings cannot leak into a test.
_CLEAN_ENV: dict[str, str | None] = {
    k: None for k in os.environ if k.startswith("WHISPER_") or k == "DATABASE_URL"
}


def plain(text: str) -> str:
    """CLI output without rich's box drawing and line wrapping, for matching messages."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def codes(data_dir: Path) -> Codes:
    """Run ``whisperctl codes ARGS --data-dir <tmp>`` in-process and return the result."""

    def run(*args: str, env: dict[str, str] | None = None) -> Result:
        runner = CliRunner(env={**_CLEAN_ENV, **(env or {})})
        return runner.invoke(app, ["codes", *args, "--data-dir", str(data_dir)])

    return run


def create(codes: Codes, *args: str) -> dict[str, Any]:
    result = codes("create", "--json", *args)
    assert result.exit_code == 0, result.output
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def show(codes: Codes, ref: str) -> dict[str, Any]:
    result = codes("show", ref, "--json")
    assert result.exit_code == 0, result.output
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def test_create_prints_only_the_code_on_stdout(codes: Codes) -> None:
    """The secret is the whole of stdout (so ``$(whisperctl codes create)`` works); the rest is
    on stderr."""
    result = codes("create", "--seconds", "120")
    assert result.exit_code == 0, result.output
    # wt_ plus at least 128 bits of base64url.
    assert re.fullmatch(r"wt_[A-Za-z0-9_-]{22,}\n", result.stdout), result.stdout
    assert "1 code(s) of 120 s, 1 use(s), expires never" in result.stderr
    assert "cannot be shown again" in result.stderr


def test_create_json_reports_every_setting(codes: Codes) -> None:
    """``--json`` gives the code with its ID, budget, uses and label in one object."""
    info = create(codes, "--seconds", "90", "--max-uses", "3", "--label", "acme")
    assert info["code"].startswith("wt_")
    assert info["id"].startswith("cc_")
    assert info["hint"] == "…" + info["code"][-4:]
    assert {k: info[k] for k in ("budget_seconds", "remaining_seconds", "max_uses", "uses")} == {
        "budget_seconds": 90,
        "remaining_seconds": 90,
        "max_uses": 3,
        "uses": 0,
    }
    assert (info["label"], info["state"], info["expires_at"]) == ("acme", "active", None)


def test_defaults_are_one_hour_and_single_use(codes: Codes) -> None:
    info = create(codes)
    assert (info["budget_seconds"], info["max_uses"]) == (3600, 1)


def test_count_mints_distinct_codes(codes: Codes) -> None:
    """``--count`` prints one code per line, or a JSON list with ``--json``."""
    result = codes("create", "--count", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert len(set(lines)) == 3
    assert all(line.startswith("wt_") for line in lines)
    batch = json.loads(codes("create", "--count", "2", "--json").stdout)
    assert [type(item) for item in batch] == [dict, dict]
    assert len({item["code"] for item in batch}) == len({item["id"] for item in batch}) == 2
    assert len(json.loads(codes("list", "--json").stdout)) == 5


@pytest.mark.parametrize(
    ("expires", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("2030-01-31T12:00:00Z", datetime(2030, 1, 31, 12, tzinfo=UTC)),
        ("2030-01-31T12:00:00+02:00", datetime(2030, 1, 31, 10, tzinfo=UTC)),
        ("2030-01-31", datetime(2030, 1, 31, tzinfo=UTC)),
    ],
)
def test_expires_takes_a_duration_or_an_iso_date(
    codes: Codes, expires: str, expected: timedelta | datetime
) -> None:
    """A duration counts from now; an ISO date without a zone is UTC."""
    before = datetime.now(UTC)
    info = create(codes, "--expires", expires)
    after = datetime.now(UTC)
    expires_at = datetime.fromisoformat(info["expires_at"])
    if isinstance(expected, timedelta):
        assert before + expected <= expires_at <= after + expected
    else:
        assert expires_at == expected
    assert info["state"] == "active"


def test_list_never_shows_secrets(codes: Codes, data_dir: Path) -> None:
    """Neither the table, nor ``--json``, nor any file in the data dir holds a code's secret."""
    minted = [create(codes, "--label", name) for name in ("alice", "bob")]
    table = codes("list")
    listing = codes("list", "--json")
    assert table.exit_code == listing.exit_code == 0, table.output + listing.output
    rows = json.loads(listing.stdout)
    assert [row["label"] for row in rows] == ["bob", "alice"]
    assert all("code" not in row for row in rows)
    files = [path.read_bytes() for path in data_dir.rglob("*") if path.is_file()]
    for info in minted:
        secret = info["code"].removeprefix("wt_")
        assert secret not in table.stdout
        assert secret not in listing.stdout
        assert not any(secret.encode() in content for content in files)
        # The ID is what show/revoke/top-up take: the table must print it whole.
        assert info["id"] in table.stdout


def test_show_by_id_and_by_code_agree(codes: Codes) -> None:
    """``show`` finds a code by its ID or by the code itself, and prints readable fields."""
    info = create(codes, "--seconds", "600", "--label", "by-both")
    by_id, by_code = show(codes, info["id"]), show(codes, info["code"])
    assert by_id == by_code
    assert by_id == {k: v for k, v in info.items() if k != "code"}
    human = codes("show", info["id"])
    assert human.exit_code == 0, human.output
    assert re.search(r"remaining_seconds: 600\n", human.stdout)
    assert info["code"].removeprefix("wt_") not in human.stdout


def test_revoke_marks_the_code_revoked(codes: Codes) -> None:
    info = create(codes)
    result = codes("revoke", info["code"], "--json")
    assert result.exit_code == 0, result.output
    revoked = json.loads(result.stdout)
    assert revoked["state"] == "revoked"
    assert revoked["revoked_at"] is not None
    assert show(codes, info["id"])["state"] == "revoked"


def test_top_up_adds_to_the_budget(codes: Codes) -> None:
    """Top-ups by ID and by code both add to the budget and the remaining seconds."""
    info = create(codes, "--seconds", "60")
    assert codes("top-up", info["id"], "--seconds", "30").exit_code == 0
    assert codes("top-up", info["code"], "--seconds", "10").exit_code == 0
    topped = show(codes, info["id"])
    assert (topped["budget_seconds"], topped["remaining_seconds"]) == (100, 100)


def test_data_dir_comes_from_the_environment(codes: Codes, data_dir: Path) -> None:
    """``WHISPER_DATA_DIR`` stands in for ``--data-dir``."""
    result = CliRunner(env={**_CLEAN_ENV, "WHISPER_DATA_DIR": str(data_dir)}).invoke(
        app, ["codes", "create", "--json", "--label", "from-env"]
    )
    assert result.exit_code == 0, result.output
    assert [row["label"] for row in json.loads(codes("list", "--json").stdout)] == ["from-env"]


def test_codes_live_in_postgresql_when_database_url_says_so(
    codes: Codes, data_dir: Path, pg_url: str
) -> None:
    """With DATABASE_URL every subcommand works on PostgreSQL, and no SQLite file appears."""
    env = {"DATABASE_URL": pg_url}
    result = codes("create", "--json", "--seconds", "60", "--label", "pg", env=env)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert codes("top-up", info["code"], "--seconds", "40", env=env).exit_code == 0
    assert codes("revoke", info["id"], env=env).exit_code == 0
    shown = json.loads(codes("show", info["id"], "--json", env=env).stdout)
    assert (shown["budget_seconds"], shown["state"]) == (100, "revoked")
    assert [row["id"] for row in json.loads(codes("list", "--json", env=env).stdout)] == [
        info["id"]
    ]
    assert not (data_dir / "whisper.db").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "--seconds", "0"], "Invalid value for '--seconds'"),
        (["create", "--seconds", "ten"], "Invalid value for '--seconds'"),
        (["create", "--max-uses", "0"], "Invalid value for '--max-uses'"),
        (["create", "--count", "0"], "Invalid value for '--count'"),
        (["create", "--expires", "soon"], "use a duration like 30d or 12h, or an ISO date"),
        (["create", "--expires", "2000-01-01"], "2000-01-01 is not in the future"),
        (["create", "--expires", "0d"], "0d is not in the future"),
        (["create", "--label", "x" * 201], "Invalid value for --label: at most 200 characters"),
        (["show", "cc_0000000000000000"], "No credit code with ID 'cc_0000000000000000'"),
        (["revoke", "wt_not-a-real-code"], "The credit code is not valid"),
        (["top-up", "cc_0000000000000000", "--seconds", "0"], "Invalid value for '--seconds'"),
        (["top-up", "cc_0000000000000000", "--seconds", "5"], "No credit code with ID"),
        (["create", "--seconds", "99999999999999999999"], "budget must be from 1 to 2000000000"),
        (["create", "--seconds", "2000000001"], "Invalid value for --seconds"),
        (["create", "--max-uses", "99999999999999999999"], "max_uses must be from 1 to"),
        (["create", "--expires", "999999999d"], "999999999d is too far in the future"),
        (["create", "--expires", "99999999999999999999w"], "is too far in the future"),
        (["top-up", "cc_0000000000000000"], "give --seconds, --max-uses or --expires"),
        (["top-up", "cc_0000000000000000", "--expires", "999999999d"], "too far in the future"),
        (["show", ""], "Invalid value for CODE: is empty"),
        (["show", " wt_padded "], "has spaces or line breaks around it"),
        (["revoke", "cc_padded\n"], "has spaces or line breaks around it"),
    ],
)
def test_bad_input_fails_clearly_and_changes_nothing(
    codes: Codes, args: list[str], message: str
) -> None:
    """Exit status 2, the reason on stderr, nothing on stdout, no traceback, no code minted."""
    result = codes(*args)
    assert result.exit_code == 2, result.output
    assert message in plain(result.stderr)
    assert result.stdout == ""
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert json.loads(codes("list", "--json").stdout) == []


def test_a_budget_create_accepts_is_one_top_up_can_grow(codes: Codes) -> None:
    """The largest budget minting accepts is the most a top-up reaches: both follow one rule."""
    info = create(codes, "--seconds", "1999999990")
    assert codes("top-up", info["id"], "--seconds", "10").exit_code == 0
    refused = codes("top-up", info["id"], "--seconds", "1")
    assert refused.exit_code == 2
    assert "at most 0 s can be added" in plain(refused.stderr)
    assert "Traceback" not in refused.output
    assert show(codes, info["id"])["budget_seconds"] == 2_000_000_000


def test_top_up_of_a_revoked_code_is_refused(codes: Codes) -> None:
    """Seconds, uses or a new expiry for a revoked code: exit 1 saying why, nothing changed."""
    info = create(codes, "--seconds", "60")
    assert codes("revoke", info["id"]).exit_code == 0
    for change in (["--seconds", "60"], ["--max-uses", "3"], ["--expires", "30d"]):
        result = codes("top-up", info["id"], *change)
        assert result.exit_code == 1, result.output
        assert "error: This credit code has been revoked, for good" in result.stderr
        assert "issue a new code instead" in result.stderr
        assert result.stdout == ""
    after = show(codes, info["id"])
    assert (after["budget_seconds"], after["max_uses"], after["expires_at"]) == (60, 1, None)


def test_top_up_of_a_used_up_code_says_seconds_do_not_help(codes: Codes, data_dir: Path) -> None:
    """A code whose uses are spent stays unusable after a top-up of seconds, and says so;
    ``--max-uses`` is what makes it usable again."""
    from tests.transcription.test_ledger import submit_job
    from transcription.db.session import Database
    from transcription.settings import CoreSettings

    info = create(codes, "--seconds", "60")
    database = Database(CoreSettings(data_dir=data_dir).resolved_database_url())
    try:
        submit_job(database, info["id"], 30)
    finally:
        database.dispose()
    topped = codes("top-up", info["id"], "--seconds", "600")
    assert topped.exit_code == 0, topped.output
    assert "note: This credit code has been used 1 of 1 times." in topped.stderr
    assert "seconds do not help; allow more jobs with --max-uses" in topped.stderr
    assert show(codes, info["id"])["state"] == "exhausted"
    raised = codes("top-up", info["id"], "--max-uses", "2", "--json")
    assert raised.exit_code == 0, raised.output
    assert "note:" not in raised.stderr
    assert json.loads(raised.stdout)["state"] == "active"
    assert (show(codes, info["id"])["max_uses"], show(codes, info["id"])["uses"]) == (2, 1)


def test_top_up_moves_the_expiry_of_an_expired_code(codes: Codes) -> None:
    """Seconds do not revive an expired code (the note says to move the expiry); ``--expires``
    does, and ``never`` lifts it."""
    info = create(codes, "--expires", "1s")
    time.sleep(1.1)
    topped = codes("top-up", info["code"], "--seconds", "60")
    assert topped.exit_code == 0, topped.output
    assert "It still cannot start a job: move the expiry with --expires" in topped.stderr
    extended = json.loads(codes("top-up", info["id"], "--expires", "30d", "--json").stdout)
    assert extended["state"] == "active"
    assert datetime.fromisoformat(extended["expires_at"]) > datetime.now(UTC) + timedelta(days=29)
    assert (
        json.loads(codes("top-up", info["id"], "--expires", "never", "--json").stdout)["expires_at"]
        is None
    )


def test_verbose_names_the_data_directory(codes: Codes, data_dir: Path) -> None:
    for args in (["create", "-v"], ["list", "--verbose"]):
        result = codes(*args)
        assert result.exit_code == 0, result.output
        assert f"whisper: data in {data_dir.absolute()}" in result.stderr
    assert "data in" not in codes("list").stderr


def test_cli_codes_pay_on_a_server_with_the_same_data_dir(
    codes: Codes, data_dir: Path, mp3_5s: Path
) -> None:
    """Codes minted before and while the server runs authenticate; CLI top-ups and revocations
    take effect on the running server."""
    early = create(codes, "--seconds", "50")
    with (
        running_server(data_dir, ready=False) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as client,
    ):
        late = create(codes, "--seconds", "100")

        def credits(info: dict[str, Any]) -> httpx.Response:
            return client.get("/v1/credits", headers={"Authorization": f"Bearer {info['code']}"})

        assert credits(early).json()["id"] == early["id"]
        assert credits(late).json()["budget_seconds"] == 100
        assert codes("top-up", late["id"], "--seconds", "20").exit_code == 0
        assert credits(late).json()["budget_seconds"] == 120
        assert codes("revoke", early["id"]).exit_code == 0
        refused = client.post(
            "/v1/transcriptions",
            headers={"Authorization": f"Bearer {early['code']}"},
            files={"file": ("tone.mp3", mp3_5s.read_bytes(), "audio/mpeg")},
        )
        assert refused.status_code == 402, refused.text
        assert refused.json()["error"]["code"] == "code_revoked"
        assert credits({"code": "wt_" + "x" * 32}).status_code == 401
