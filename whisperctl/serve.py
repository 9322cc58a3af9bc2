"""``whisperctl serve``: the embedded service (gateway + local worker pool) on one machine."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from transcription.settings import GatewaySettings, LogFormat
from whisperctl.options import DataDir, build_settings, describe_storage, open_data_dir

LOG_FILE_NAME = "serve.log"


def _default(name: str) -> str:
    return str(GatewaySettings.model_fields[name].default)


def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on.", show_default=_default("host"))
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to listen on.", show_default=_default("port"))
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Transcriptions at once.", show_default="automatic")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Port serving Prometheus metrics at /metrics, apart from the API (address: "
            "WHISPER_METRICS_HOST, default 127.0.0.1); 0: off.",
            show_default=_default("metrics_port"),
        ),
    ] = None,
    data_dir: DataDir = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_file: Annotated[
        str | None,
        typer.Option(
            envvar="WHISPER_LOG_FILE",
            help="Where the log goes: a file, or - for the terminal. Unset: the terminal, "
            f"except when started in the background at one (`whisperctl serve &`): then "
            f"<data dir>/{LOG_FILE_NAME}, so the log never mixes with other commands' output.",
            show_default=False,
        ),
    ] = None,
    log_format: Annotated[
        LogFormat | None,
        typer.Option(
            help="json lines or human text; auto: json unless stderr is a terminal "
            "(env WHISPER_LOG_FORMAT).",
            show_default=_default("log_format"),
        ),
    ] = None,
) -> None:
    """Run the HTTP API and the local Whisper workers (SQLite, local files, bundled tiny.en).

    One server per data directory: a second one refuses to start and names the first."""
    import logging

    import uvicorn
    from prometheus_client import start_http_server

    from gateway.app import create_app
    from gateway.limits import server_options
    from transcription.datadir import DataDirInUse, DataDirLock
    from transcription.logs import configure_logging, secret_values, use_json

    settings = build_settings(
        GatewaySettings,
        data_dir,
        host=host,
        port=port,
        concurrency=concurrency,
        metrics_port=metrics_port,
        log_format=log_format,
    )
    open_data_dir(settings)
    try:
        # Held until the process ends, however it ends; no other process can then hold leases
        # on this data directory's jobs, so the runner resumes a crashed run's jobs at once.
        lock = DataDirLock(settings.data_dir).acquire()
    except DataDirInUse as exc:
        typer.echo(f"whisper: {exc}", err=True)
        raise typer.Exit(1) from None
    metrics_url = f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
    if settings.metrics_port:
        try:
            # Its own port and thread: the API port never answers /metrics.
            start_http_server(settings.metrics_port, addr=settings.metrics_host)
        except OSError as exc:
            lock.release()
            typer.echo(f"whisper: cannot serve metrics on {metrics_url}: {exc.strerror}", err=True)
            raise typer.Exit(1) from None
    log_path = _log_path(log_file, settings.data_dir)
    # Decided by the stderr the user started it with, before a redirection to the log file: a
    # server backgrounded at a terminal writes text for the person who will tail its log.
    json_lines = use_json(settings.log_format, sys.stderr)
    started = (
        f"whisper: {describe_storage(settings)}, API on http://{settings.host}:{settings.port} "
        f"(docs at /docs){f', metrics on {metrics_url}' if settings.metrics_port else ''}"
        f"{f', log in {log_path.absolute()}' if log_path else ''}"
    )
    if log_path is not None or not json_lines:
        typer.echo(started, err=True)
    if log_path is not None:
        _redirect_output(log_path)
    configure_logging(log_level, "json" if json_lines else "text", secrets=secret_values(settings))
    if log_path is None and json_lines:
        # On a JSON stream even this line is a JSON line.
        logging.getLogger("whisperctl").info(started)
    app = create_app(settings, exclusive=True)
    # What the imports built lives as long as the process: keeping it out of the collector's
    # full passes, which hold the GIL (and so every request) while they walk the heap, took
    # them from 80-115 ms to under 40 ms under bench/abuse.py.
    gc.collect()
    gc.freeze()
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            # Ours (transcription.logs), not uvicorn's: its lines come out in the same format.
            log_config=None,
            timeout_graceful_shutdown=10,
            **server_options(settings),
        )
    finally:
        lock.release()


def _log_path(log_file: str | None, data_dir: Path) -> Path | None:
    """The file the log goes to, or None for the terminal (stderr)."""
    if log_file == "-":
        return None
    if log_file:
        return Path(log_file)
    return data_dir / LOG_FILE_NAME if _in_background_at_a_terminal() else None


def _in_background_at_a_terminal() -> bool:
    """Whether stderr is a terminal this process does not own: a shell with job control put
    it outside the terminal's foreground group, or a script's ``&`` gave it /dev/null as stdin."""
    if not sys.stderr.isatty():
        return False
    try:
        foreground = os.tcgetpgrp(sys.stderr.fileno()) == os.getpgrp()
    except OSError:
        return False
    return not foreground or not sys.stdin.isatty()


def _redirect_output(path: Path) -> None:
    """Send all the process writes to ``path``: uvicorn's log, warnings, and what native
    libraries print straight to file descriptors 1 and 2."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
