"""``whisperctl submit``: upload an mp3 over HTTP, follow the job, save the transcript."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer

from transcription.states import Mode
from transcription.transcript import OutputFormat
from whisperctl.client import (
    DEFAULT_URL,
    INTERRUPTED,
    RECONNECT_SECONDS,
    Code,
    Format,
    Service,
    Url,
    credit_code,
    header_value,
    job_path,
)
from whisperctl.options import in_a_directory


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


def submit(
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, readable=True, help="The .mp3 to transcribe."),
    ],
    code: Code = None,
    url: Url = DEFAULT_URL,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the transcript.")] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            dir_okay=False,
            callback=in_a_directory,
            help="Save the transcript here (implies --wait).",
        ),
    ] = None,
    fmt: Format = OutputFormat.TXT,
    language: Annotated[str | None, typer.Option(help="Spoken language, e.g. en.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Words or spellings to expect.")] = None,
    mode: Annotated[
        Mode, typer.Option(help="fast (batched) or accurate (sequential).")
    ] = Mode.FAST,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retry-safe key: resubmitting it never charges twice.")
    ] = None,
    cancel_on_interrupt: Annotated[
        bool,
        typer.Option(
            "--cancel-on-interrupt",
            help="Ctrl-C while waiting cancels the job (charged under the credit rules) "
            "instead of leaving it running.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Upload FILE; with --wait or -o, show progress and write the transcript."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from transcription.errors import InvalidRequest
    from transcription.joboptions import check_language, check_prompt

    try:
        language, prompt = check_language(language), check_prompt(prompt)
    except InvalidRequest as exc:  # refused here, not after the whole upload
        raise typer.BadParameter(exc.message, param_hint=f"--{exc.param}") from None
    headers = {}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = header_value(idempotency_key, "--idempotency-key")
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
    with Service(url, credit_code(code)) as service:
        try:
            with progress, file.open("rb") as raw:
                task = progress.add_task("uploading", total=file.stat().st_size)
                reader = _ProgressReader(raw, lambda n: progress.advance(task, n))
                job = service.call(
                    "POST",
                    "/v1/transcriptions",
                    files={"file": (file.name, reader, "audio/mpeg")},
                    data=data,
                    headers=headers,
                ).json()
        except KeyboardInterrupt:
            typer.echo(
                "interrupted before the service answered; had the upload finished, the job "
                "runs all the same: `whisperctl jobs list` shows it",
                err=True,
            )
            raise typer.Exit(INTERRUPTED) from None
        job_id = job["id"]
        # From here on the job exists: Ctrl-C, whenever it comes, must name it.
        try:
            typer.echo(
                f"job {job_id}: {job['audio_seconds']:.1f} s of audio, "
                f"{job['reserved_seconds']} s of credit reserved",
                err=True,
            )
            if not (wait or output):
                typer.echo(job_id)
                return
            job = service.follow(job, quiet=quiet)
            if job["status"] != "succeeded":
                why = (job.get("error") or {}).get("message")
                typer.echo(
                    f"job {job_id} {job['status']}{f': {why}' if why else ''} "
                    f"({job['charged_seconds'] or 0} s charged)",
                    err=True,
                )
                raise typer.Exit(1)
            transcript = service.call(
                "GET",
                job_path(job_id, f"/transcript.{fmt}"),
                patience=RECONNECT_SECONDS,
                job_id=job_id,
            )
        except KeyboardInterrupt:
            raise service.interrupted(job_id, cancel=cancel_on_interrupt) from None
    if output is None:
        sys.stdout.write(transcript.text)
    else:
        output.write_bytes(transcript.content)
        typer.echo(f"transcript saved to {output} ({job['charged_seconds']} s charged)", err=True)
