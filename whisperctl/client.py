"""Talking to the service over HTTP as a code holder: the code, the URL, the server's refusals,
following a job and what Ctrl-C while following says."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import typer

from transcription.states import FINISHED
from transcription.transcript import OutputFormat
from whisperctl.options import exact

if TYPE_CHECKING:
    import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
#: How long following a job rides out a restart of the service (the job is durable).
RECONNECT_SECONDS = 120.0
#: The exit status shells give a command stopped by Ctrl-C (128 + SIGINT).
INTERRUPTED = 130
#: What a header value can carry: printable ASCII (a credit code has no spaces either).
HEADER_VALUE = re.compile(r"[ -~]+")

Code = Annotated[
    str | None,
    typer.Option(
        envvar="WHISPER_CODE",
        help="Your credit code. A flag shows in `ps` and shell history to anyone on the "
        "machine: prefer WHISPER_CODE, or leave both out to be asked for it.",
        show_default=False,
    ),
]
Url = Annotated[str, typer.Option(envvar="WHISPER_URL", help="The service's base URL.")]
JobId = Annotated[str, typer.Argument(help="The job's ID (tr_…).", show_default=False)]
Format = Annotated[OutputFormat, typer.Option("--format", help="txt, srt, vtt or json.")]


def credit_code(given: str | None) -> str:
    """The code from ``--code`` or WHISPER_CODE, else typed at the terminal without echo; a
    script without one fails at once rather than wait for an answer that never comes."""
    if given is None:
        if not sys.stdin.isatty():
            empty = os.environ.get("WHISPER_CODE") == ""
            typer.echo(
                f"error: {'WHISPER_CODE is empty' if empty else 'no credit code'}: "
                "set WHISPER_CODE (or pass --code)",
                err=True,
            )
            raise typer.Exit(2)
        given = str(typer.prompt("Credit code", hide_input=True, err=True)).strip()
    return header_value(given, "--code", spaces=False)


def header_value(value: str, what: str, *, spaces: bool = True) -> str:
    """``value`` checked for the header it goes in, so what no header can carry is reported as
    such rather than as a network error (or a traceback)."""
    value = exact(value, what)
    if not HEADER_VALUE.fullmatch(value) or (" " in value and not spaces):
        raise typer.BadParameter(
            "has line breaks, non-ASCII characters"
            + ("" if spaces else " or spaces")
            + " inside, which an HTTP header cannot carry",
            param_hint=what,
        )
    return value


def job_path(job_id: str, tail: str = "") -> str:
    return f"/v1/transcriptions/{quote(exact(job_id, 'JOB_ID'), safe='')}{tail}"


class Service:
    """The service at ``url``, spoken to with a credit code; a failed call ends the command with
    one line: exit 1 when the server refused, 2 when it could not be reached."""

    def __init__(self, url: str, code: str) -> None:
        import httpx

        self.url = url.rstrip("/")
        try:
            base = httpx.URL(self.url)
        except httpx.InvalidURL:
            base = httpx.URL()
        if base.scheme not in ("http", "https") or not base.host:
            raise typer.BadParameter(
                f"{url!r} is not an http:// or https:// URL such as {DEFAULT_URL}",
                param_hint="--url",
            )
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {code}"},
            timeout=httpx.Timeout(60, read=600),
        )

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        patience: float = 0.0,
        job_id: str | None = None,
        **options: Any,
    ) -> httpx.Response:
        """The 2xx answer to the request; connection failures are retried for ``patience``
        seconds, and giving up names ``job_id``, which carries on in the service."""
        import httpx

        deadline = time.monotonic() + patience
        while True:
            try:
                response = self.http.request(method, path, **options)
                break
            except httpx.TransportError as exc:
                if time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                raise self.unreachable(exc, job_id) from None
        if not response.is_success:
            raise self.refusal(response)
        return response

    def unreachable(self, exc: Exception, job_id: str | None) -> typer.Exit:
        """Say the service cannot be reached (and that ``job_id`` carries on there); the command
        then exits 2."""
        carries_on = (
            f"; job {job_id} carries on there: {self.command('jobs show', job_id)}"
            if job_id
            else ""
        )
        typer.echo(f"error: cannot reach {self.url}: {exc}{carries_on}", err=True)
        return typer.Exit(2)

    def refusal(self, response: httpx.Response) -> typer.Exit:
        """Print the server's own reason for refusing; the command then exits 1."""
        try:
            error = response.json()["error"]
            message = f"{error['message']} ({error['code']})"
        except Exception:
            error = {}
            message = response.text[:500] or response.reason_phrase
        typer.echo(f"error: HTTP {response.status_code}: {message}", err=True)
        if error.get("code") == "invalid_code" and self._is_local():
            typer.echo(f"hint: {self._unknown_code_hint()}", err=True)
        return typer.Exit(1)

    def _is_local(self) -> bool:
        import httpx

        host = httpx.URL(self.url).host
        try:
            return host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _unknown_code_hint(self) -> str:
        from transcription.settings import CoreSettings
        from whisperctl.options import build_settings

        data_dir = build_settings(CoreSettings, None).data_dir.absolute()
        return (
            f"this code is not known to the server at {self.url}; codes minted with "
            f"`whisperctl codes create` live in the data directory {data_dir} (or the one "
            "--data-dir or WHISPER_DATA_DIR names): make sure the server and the command use "
            "the same one (`whisperctl serve` names its own when it starts)"
        )

    def command(self, name: str, job_id: str) -> str:
        """The ``whisperctl`` command line that does ``name`` to the job on this service."""
        url = "" if self.url == DEFAULT_URL else f" --url {self.url}"
        return f"whisperctl {name} {job_id}{url}"

    def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.call("GET", job_path(job_id)).json()
        return job

    def follow(self, job: dict[str, Any], *, quiet: bool) -> dict[str, Any]:
        """Follow the job until it finishes, with a progress bar on stderr (stdout carries only
        results, for scripts)."""
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            disable=quiet,
            transient=True,
            console=Console(stderr=True),
        ) as bar:
            task = bar.add_task(job["status"], total=1.0, completed=job["progress"])
            if job["status"] not in FINISHED:
                for update in self.events(job["id"]):
                    job = update
                    bar.update(task, completed=job["progress"], description=job["status"])
        return job

    def events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job now and at each change, from its event stream, until it finishes. A dropped
        stream is opened again (its first event is the job as it is then, so nothing is
        missed) for as long as a restart of the service may take."""
        import httpx

        last_id: str | None = None
        deadline = time.monotonic() + RECONNECT_SECONDS
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self.http.stream(
                    "GET", job_path(job_id, "/events"), headers=headers
                ) as response:
                    if not response.is_success:
                        response.read()
                        raise self.refusal(response)
                    for event in server_sent_events(response.iter_lines()):
                        deadline = time.monotonic() + RECONNECT_SECONDS
                        last_id = event.get("id", last_id)
                        job: dict[str, Any] = json.loads(event["data"])
                        yield job
                        if job["status"] in FINISHED:
                            return
            except httpx.TransportError as exc:
                if time.monotonic() >= deadline:
                    raise self.unreachable(exc, job_id) from None
                time.sleep(1.0)

    def cancel(self, job_id: str) -> tuple[bool, str]:
        """Cancel the job under the credit rules: whether it was cancelled, and what it cost or
        why not. A finished job is left alone, as DELETE would delete it."""
        job = self.job(job_id)
        if job["status"] in FINISHED:
            return False, f"job {job_id} has already {job['status']}: nothing to cancel"
        job = self.call("DELETE", job_path(job_id)).json()
        if job["status"] != "cancelled":
            return False, (
                f"job {job_id} {job['status']} just before the cancellation arrived, which then "
                "deleted it"
            )
        charged, reserved = job["charged_seconds"] or 0, job["reserved_seconds"]
        if charged == 0:
            return True, f"job {job_id} cancelled: its {reserved} s of credit were refunded in full"
        return True, (
            f"job {job_id} cancelled while running: {charged} s of the {reserved} s reserved "
            "were charged for what was already transcribed; the rest is back on the code"
        )

    def interrupted(self, job_id: str, *, cancel: bool) -> typer.Exit:
        """Stop waiting after Ctrl-C: cancel the job if asked, else say how to follow or cancel
        it; the command then exits 130."""
        if cancel:
            typer.echo(f"interrupted: {self.cancel(job_id)[1]}", err=True)
        else:
            typer.echo(
                f"interrupted: stopped waiting; job {job_id} carries on in the service.\n"
                f"  follow it: {self.command('jobs show', job_id)} --wait\n"
                f"  cancel it: {self.command('jobs cancel', job_id)}",
                err=True,
            )
        return typer.Exit(INTERRUPTED)


def server_sent_events(lines: Iterable[str]) -> Iterator[dict[str, str]]:
    """The events of a ``text/event-stream``, each as its fields (``event``, ``id``, ``data``);
    comments and events without data are skipped."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            event[name] = f"{event[name]}\n{value}" if name == "data" and name in event else value
