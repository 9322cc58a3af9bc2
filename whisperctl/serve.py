"""``whisperctl serve``: the embedded service (gateway + local worker pool) on one machine."""

from __future__ import annotations

from typing import Annotated

import typer

from whisperctl.options import DataDir, build_settings


def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on [default: 127.0.0.1].")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [default: 8000].")] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Transcriptions at once [default: automatic].")
    ] = None,
    data_dir: DataDir = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the HTTP API and the local Whisper workers (SQLite, local files, bundled tiny.en)."""
    import logging

    import uvicorn

    from gateway.app import create_app
    from transcription.settings import GatewaySettings

    settings = build_settings(
        GatewaySettings, data_dir, host=host, port=port, concurrency=concurrency
    )
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    typer.echo(
        f"whisper: data in {settings.data_dir.absolute()}, "
        f"API on http://{settings.host}:{settings.port} (docs at /docs)"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=10,
    )
