"""``whisperctl jobs`` and ``whisperctl credits``: a code holder's jobs and balance, over HTTP."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from transcription.states import FINISHED, JobStatus
from transcription.transcript import OutputFormat
from whisperctl.client import (
    DEFAULT_URL,
    Code,
    Format,
    JobId,
    Service,
    Url,
    credit_code,
    job_path,
)
from whisperctl.options import JsonOutput, in_a_directory, print_record

app = typer.Typer(
    help="List, follow, fetch, cancel and delete the jobs of your credit code.",
    no_args_is_help=True,
)

#: The most jobs the API returns in one page.
PAGE = 100


@app.command("list")
def list_jobs(
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many, newest first.")] = 20,
    status: Annotated[JobStatus | None, typer.Option(help="Only jobs in this state.")] = None,
    code: Code = None,
    url: Url = DEFAULT_URL,
    as_json: JsonOutput = False,
) -> None:
    """List the code's jobs, newest first."""
    jobs: list[dict[str, Any]] = []
    more = True
    with Service(url, credit_code(code)) as service:
        while more and len(jobs) < limit:
            params: dict[str, Any] = {"limit": min(PAGE, limit - len(jobs))}
            if status is not None:
                params["status"] = status.value
            if jobs:
                params["after"] = jobs[-1]["id"]
            page = service.call("GET", "/v1/transcriptions", params=params).json()
            jobs += page["data"]
            more = page["has_more"]
    if as_json:
        typer.echo(json.dumps(jobs, indent=2))
        return
    if not jobs:
        typer.echo("no jobs", err=True)
        return
    from rich import box
    from rich.console import Console
    from rich.table import Column, Table

    statuses = [
        f"{job['status']} {job['progress']:.0%}"
        if job["status"] == JobStatus.RUNNING
        else job["status"]
        for job in jobs
    ]
    # IDs are what the other job commands take, so a narrow terminal must not cut them short.
    table = Table(
        Column("ID", min_width=max(len(job["id"]) for job in jobs)),
        Column("Status", min_width=max(map(len, statuses))),
        Column("Audio", justify="right", no_wrap=True),
        Column("Charged", justify="right", no_wrap=True),
        Column("Created (UTC)", no_wrap=True),
        Column("File", min_width=8, no_wrap=True, overflow="ellipsis"),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for job, state in zip(jobs, statuses, strict=True):
        table.add_row(
            job["id"],
            state,
            f"{job['audio_seconds']:.1f} s",
            "-" if job["charged_seconds"] is None else f"{job['charged_seconds']} s",
            job["created_at"][:16].replace("T", " "),
            job["filename"] or "",
        )
    Console(file=sys.stdout).print(table)
    if more:
        typer.echo(f"more jobs: --limit {limit + 20} shows older ones", err=True)


@app.command()
def show(
    job_id: JobId,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the job with a progress bar until it ends.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    code: Code = None,
    url: Url = DEFAULT_URL,
    as_json: JsonOutput = False,
) -> None:
    """Show a job's status, progress and credit (and, with --json, its text once done)."""
    with Service(url, credit_code(code)) as service:
        job = service.job(job_id)
        if wait:
            try:
                job = service.follow(job, quiet=quiet)
            except KeyboardInterrupt:
                raise service.interrupted(job["id"], cancel=False) from None
        hint = service.command("jobs transcript", job["id"])
    if as_json:
        print_record(job, as_json)
        return
    error = job["error"]
    print_record(
        {
            **{k: job[k] for k in ("id", "status", "filename", "mode", "language")},
            "progress": f"{job['progress']:.0%}",
            **{k: job[k] for k in ("audio_seconds", "reserved_seconds", "charged_seconds")},
            **{k: job[k] for k in ("created_at", "started_at", "completed_at")},
            "error": f"{error['message']} ({error['code']})" if error else None,
            "transcript": hint if job["status"] == JobStatus.SUCCEEDED else None,
        },
        as_json=False,
    )


@app.command()
def cancel(job_id: JobId, code: Code = None, url: Url = DEFAULT_URL) -> None:
    """Cancel an unfinished job under the credit rules.

    A queued job is refunded in full; a running one pays for what was already transcribed."""
    with Service(url, credit_code(code)) as service:
        cancelled, outcome = service.cancel(job_id)
    if not cancelled:
        typer.echo(f"error: {outcome}", err=True)
        raise typer.Exit(1)
    typer.echo(outcome, err=True)


@app.command()
def delete(job_id: JobId, code: Code = None, url: Url = DEFAULT_URL) -> None:
    """Delete a finished job and its transcripts (no credit moves)."""
    with Service(url, credit_code(code)) as service:
        job = service.job(job_id)
        # DELETE of an unfinished job cancels it, which may cost credit: never as a side effect.
        if job["status"] not in FINISHED:
            typer.echo(
                f"error: job {job_id} is {job['status']}: cancel it first "
                f"({service.command('jobs cancel', job_id)})",
                err=True,
            )
            raise typer.Exit(1)
        service.call("DELETE", job_path(job_id))
    typer.echo(f"job {job_id} deleted, with its transcripts", err=True)


@app.command()
def transcript(
    job_id: JobId,
    fmt: Format = OutputFormat.TXT,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            dir_okay=False,
            callback=in_a_directory,
            help="Save it here instead of printing it.",
        ),
    ] = None,
    code: Code = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Print (or save) the transcript of a job that succeeded."""
    with Service(url, credit_code(code)) as service:
        response = service.call("GET", job_path(job_id, f"/transcript.{fmt}"))
    if output is None:
        sys.stdout.write(response.text)
    else:
        output.write_bytes(response.content)
        typer.echo(f"transcript saved to {output}", err=True)


def credits(code: Code = None, url: Url = DEFAULT_URL, as_json: JsonOutput = False) -> None:
    """Show your code's remaining seconds, uses, expiry and state."""
    with Service(url, credit_code(code)) as service:
        balance = service.call("GET", "/v1/credits").json()
    if not as_json:
        balance.pop("object", None)
    print_record(balance, as_json)
