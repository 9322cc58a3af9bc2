"""Shared test configuration; server-starting fixtures live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.database",
    "tests.fixtures.gcs",
    "tests.fixtures.audio",
    "tests.fixtures.server",
    "tests.fixtures.gateway",
    "tests.fixtures.openai_server",
]
