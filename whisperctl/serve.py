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
    """Run the HTTP API and the local Whisper workers (SQLite, local files, bundled tiny.en).

    One server per data directory: a second ``serve`` on a directory in use refuses to start
    and names the process that holds it."""
    import logging

    import uvicorn

    from gateway.app import create_app
    from gateway.limits import server_options
    from transcription.datadir import DataDirInUse, DataDirLock
    from transcription.settings import GatewaySettings

    settings = build_settings(
        GatewaySettings, data_dir, host=host, port=port, concurrency=concurrency
    )
    try:
        # Held until the process ends, however it ends; no other process can then hold leases
        # on this data directory's jobs, so the runner resumes a crashed run's jobs at once.
        lock = DataDirLock(settings.data_dir).acquire()
    except DataDirInUse as exc:
        typer.echo(f"whisper: {exc}", err=True)
        raise typer.Exit(1) from None
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    typer.echo(
        f"whisper: data in {settings.data_dir.absolute()}, "
        f"API on http://{settings.host}:{settings.port} (docs at /docs)"
    )
    try:
        uvicorn.run(
            create_app(settings, exclusive=True),
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            timeout_graceful_shutdown=10,
            **server_options(settings),
        )
    finally:
        lock.release()
