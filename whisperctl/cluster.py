"""``whisperctl operator`` and ``whisperctl transcribe-job``: the cluster shape's two processes."""

from __future__ import annotations

from typing import Annotated

import typer


def operator(
    namespace: Annotated[
        list[str] | None,
        typer.Option(help="Namespace to watch (repeatable) [default: every namespace]."),
    ] = None,
    liveness: Annotated[
        str, typer.Option(help="Liveness endpoint for the kubelet's probe.")
    ] = "http://0.0.0.0:8080/healthz",
) -> None:
    """Run the kopf operator that turns TranscriptionJobs into Jobs and CreditCodes into codes."""
    import kopf

    import transcription_operator  # noqa: F401  (registers the handlers)
    from transcription.logs import configure_logging, secret_values
    from transcription.settings import OperatorSettings
    from whisperctl.options import build_settings

    # Refused here with one clear line, not retried for ever inside kopf's startup handler.
    settings = build_settings(OperatorSettings, None)

    # Instead of kopf.configure: kopf's lines come out as the rest of the service's do, in one
    # format with the same fields (its JSON would name them differently).
    configure_logging("INFO", settings.log_format, secrets=secret_values(settings))
    kopf.run(
        standalone=True,
        clusterwide=not namespace,
        namespaces=namespace or (),
        liveness_endpoint=liveness,
    )


def transcribe_job() -> None:
    """Run the transcription named by WHISPER_JOB_ID and write a JSON termination message."""
    from transcriber.job import main

    raise typer.Exit(main())
