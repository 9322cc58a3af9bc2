"""``whisperctl submit``: upload an mp3 over HTTP, follow the job, save the transcript."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer

from transcription.states import FINISHED, Mode
from transcription.transcript import OutputFormat

RECONNECT_SECONDS = 120.0


class _ProgressReader:
    """A file wrapper that advances a progress bar as httpx reads the upload."""

    def __init__(self, file: BinaryIO, advance: Any) -> None:
        self.file = file
        self.advance = advance

    def read(self, size: int = -1) -> bytes:
        chunk = self.file.read(size)
        self.advance(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()


def _fail(response: Any) -> typer.Exit:
    try:
        error = response.json()["error"]
        message = f"{error['message']} ({error['code']})"
    except Exception:
        message = response.text[:500] or response.reason_phrase
    typer.echo(f"error: HTTP {response.status_code}: {message}", err=True)
    return typer.Exit(2)


def submit(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="The .mp3 to transcribe.")
    ],
    code: Annotated[
        str | None,
        typer.Option(
            envvar="WHISPER_CODE",
            help="Your credit code. A flag shows in `ps` and shell history to anyone on the "
            "machine: prefer WHISPER_CODE, or leave both out to be asked for it.",
        ),
    ] = None,
    url: Annotated[
        str, typer.Option(envvar="WHISPER_URL", help="The service's base URL.")
    ] = "http://127.0.0.1:8000",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the transcript.")] = False,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Save the transcript here (implies --wait)."),
    ] = None,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="txt, srt, vtt or json.")
    ] = OutputFormat.TXT,
    language: Annotated[str | None, typer.Option(help="Spoken language, e.g. en.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Words or spellings to expect.")] = None,
    mode: Annotated[
        Mode, typer.Option(help="fast (batched) or accurate (sequential).")
    ] = Mode.FAST,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retry-safe key: resubmitting it never charges twice.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Upload FILE; with --wait or -o, show progress and write the transcript."""
    import httpx
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    code = code or _ask_code()
    headers = {"Authorization": f"Bearer {code}"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    data = {
        k: v for k, v in {"language": language, "prompt": prompt, "mode": mode.value}.items() if v
    }
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        DownloadColumn(),
        TimeRemainingColumn(),
        disable=quiet,
        transient=True,
        # Progress goes to stderr: stdout carries only the job ID or the transcript, for scripts.
        console=Console(stderr=True),
    )
    with httpx.Client(
        base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(60, read=600)
    ) as client:
        with progress, file.open("rb") as raw:
            task = progress.add_task("uploading", total=file.stat().st_size)
            reader = _ProgressReader(raw, lambda n: progress.advance(task, n))
            try:
                response = client.post(
                    "/v1/transcriptions",
                    files={"file": (file.name, reader, "audio/mpeg")},  # type: ignore[dict-item]
                    data=data,
                )
            except httpx.HTTPError as exc:
                typer.echo(f"error: cannot reach {url}: {exc}", err=True)
                raise typer.Exit(2) from exc
        if response.status_code != 202:
            raise _fail(response)
        job = response.json()
        typer.echo(
            f"job {job['id']}: {job['audio_seconds']:.1f} s of audio, "
            f"{job['reserved_seconds']} s of credit reserved",
            err=True,
        )
        if not (wait or output):
            typer.echo(job["id"])
            return
        job = _follow(client, job, progress.console, quiet)
        if job["status"] != "succeeded":
            error = job.get("error") or {}
            typer.echo(
                f"job {job['id']} {job['status']}: {error.get('message', '')} "
                "(the credit was refunded)",
                err=True,
            )
            raise typer.Exit(1)
        transcript = _get(client, f"/v1/transcriptions/{job['id']}/transcript.{fmt}", job["id"])
        if transcript.status_code != 200:
            raise _fail(transcript)
    if output is None:
        sys.stdout.write(transcript.text)
    else:
        output.write_bytes(transcript.content)
        typer.echo(f"transcript saved to {output} ({job['charged_seconds']} s charged)", err=True)


def _ask_code() -> str:
    """The code typed at the terminal without echo; a script without one fails at once rather
    than wait for an answer that never comes."""
    if not sys.stdin.isatty():
        typer.echo("error: no credit code: set WHISPER_CODE (or pass --code)", err=True)
        raise typer.Exit(2)
    code: str = typer.prompt("Credit code", hide_input=True, err=True)
    return code.strip()


def _get(client: Any, path: str, job_id: str) -> Any:
    """GET ``path``, riding out a restart of the service: connection errors are retried for
    ``RECONNECT_SECONDS`` (the job is durable and resumes when the service is back)."""
    import httpx

    deadline = time.monotonic() + RECONNECT_SECONDS
    while True:
        try:
            return client.get(path)
        except httpx.TransportError as exc:
            if time.monotonic() > deadline:
                typer.echo(
                    f"error: lost contact with the service ({exc}); job {job_id} carries on "
                    f"there: fetch it later from /v1/transcriptions/{job_id}",
                    err=True,
                )
                raise typer.Exit(2) from exc
            time.sleep(1.0)


def _follow(client: Any, job: dict[str, Any], console: Any, quiet: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        disable=quiet,
        transient=True,
        console=console,
    ) as bar:
        task = bar.add_task("queued", total=1.0)
        delay = 0.25
        while job["status"] not in FINISHED:
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
            response = _get(client, f"/v1/transcriptions/{job['id']}", job["id"])
            if response.status_code != 200:
                raise _fail(response)
            job = response.json()
            bar.update(task, completed=job["progress"], description=job["status"])
    return job
