"""Schemathesis drives every documented operation in-process: no input may cause a server error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig

from gateway.app import create_app
from tests.fixtures.gateway import ADMIN, ADMIN_TOKEN, FixedEngine, auth
from transcription import ledger
from transcription.settings import GatewaySettings

# NUL characters are left to test_bad_input's test of them: PostgreSQL cannot store them (a bug).
FUZZING = SchemathesisConfig.from_dict({"generation": {"allow-x00": False}})
# Read from the app's schema without starting it, so a new route is covered without editing this.
OPERATIONS = [
    (method.upper(), path)
    for path, methods in create_app(GatewaySettings()).openapi()["paths"].items()
    for method in methods
]


@pytest.fixture
def api_schema(db_url: str, tmp_path: Path) -> Any:
    """The app's own OpenAPI schema; loading it starts the app, which schemathesis then owns."""
    config = GatewaySettings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        admin_token=ADMIN_TOKEN,
        progress_interval=0,
    )
    app = create_app(config, engine=FixedEngine())
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=FUZZING)


@pytest.fixture
def code_headers(api_schema: Any) -> dict[str, str]:
    """A bearer code that never runs out, minted straight into the running app's database."""
    services = api_schema.app.state.services
    with services.db.transaction() as session:
        issued = ledger.issue_code(
            session, services.code_key, seconds=10_000_000, max_uses=1_000_000
        )
    return auth(issued.code)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_request_causes_a_server_error(
    api_schema: Any, code_headers: dict[str, str], method: str, path: str
) -> None:
    headers = ADMIN if path.startswith("/v1/admin") else code_headers

    @given(case=api_schema[path][method].as_strategy())
    @settings(
        max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=[not_a_server_error])

    check()
