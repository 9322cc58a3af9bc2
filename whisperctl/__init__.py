"""``whisperctl``: one command line for every component; heavy imports happen per command."""

from __future__ import annotations

import typer

from whisperctl import cluster, codes, db, jobs, serve, submit

app = typer.Typer(
    name="whisperctl",
    help="Whisper transcription service: run it, issue credit codes, submit audio, manage jobs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(codes.app, name="codes")
app.add_typer(db.app, name="db")
app.command("serve")(serve.serve)
app.command("submit")(submit.submit)
app.add_typer(jobs.app, name="jobs")
app.command("credits")(jobs.credits)
app.command("operator")(cluster.operator)
app.command("transcribe-job")(cluster.transcribe_job)


def main() -> None:
    app()
