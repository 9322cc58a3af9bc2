"""Configuration read from the environment; each component builds its own settings object."""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path
from typing import Annotated, Literal, Self

from platformdirs import user_data_path
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from transcription.states import EngineKind

#: CTranslate2's precisions (https://opennmt.net/CTranslate2/quantization.html).
ComputeType = Literal[
    "default",
    "auto",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
]

#: How log lines are written; auto = json unless stderr is a terminal (transcription.logs).
LogFormat = Literal["auto", "json", "text"]

#: The per-user data directory's application name: ~/.local/share/whisperctl on Linux.
APP_NAME = "whisperctl"
KEY_FILE_NAME = "code-secret"


def default_data_dir() -> Path:
    """The platform's per-user data directory, so every command finds the same state wherever
    it runs from (XDG_DATA_HOME is honoured)."""
    return user_data_path(APP_NAME, appauthor=False)


class CoreSettings(BaseSettings):
    """Settings every component shares: where state lives and how codes are hashed."""

    model_config = SettingsConfigDict(env_prefix="WHISPER_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Directory for the SQLite database, blobs and the code secret.",
    )
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("DATABASE_URL", "WHISPER_DATABASE_URL", "database_url"),
        description="SQLAlchemy URL; default: a SQLite file in the data directory.",
    )
    blob_url: str | None = Field(
        None, description="file:///dir or gs://bucket/prefix; default: <data dir>/blobs."
    )
    code_secret: SecretStr | None = Field(
        None,
        description="Key for hashing credit codes; default: generated once into "
        "<data dir>/code-secret (the cluster shape requires it, as it does the database and "
        "blob URLs).",
    )
    max_audio_seconds: int = Field(3600, ge=1, description="Longest audio accepted, in seconds.")
    max_upload_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="Largest upload accepted, in bytes."
    )
    engine: EngineKind = Field(EngineKind.LOCAL, description="Whisper engine: local or openai.")
    model: str | None = Field(
        None,
        description="Model path or name; default: bundled tiny.en (local), whisper-1 (openai).",
    )

    max_attempts: int = Field(
        3,
        ge=1,
        description="Times a job is started before a lost worker or vanished Job fails it "
        "(refunded).",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port serving Prometheus metrics at /metrics, apart from the API; 0 = off.",
    )
    metrics_host: str = Field("127.0.0.1", description="Address the metrics port listens on.")
    log_format: LogFormat = Field(
        "auto",
        description="Log lines as json or text; auto = json unless stderr is a terminal.",
    )

    def _require_shared_state(self, who: str) -> None:
        """Refuse the data-directory defaults where several pods must see one state."""
        missing = [
            name
            for name, value in (
                ("DATABASE_URL", self.database_url),
                ("WHISPER_BLOB_URL", self.blob_url),
                ("WHISPER_CODE_SECRET", self.code_secret and self.code_secret.get_secret_value()),
            )
            if not value
        ]
        if missing:
            raise ValueError(
                f"{who} needs {', '.join(missing)} set: pods share no data directory, so the "
                "defaults kept in one (a SQLite file, a blob folder, a generated code key) would "
                "differ from pod to pod, and a credit code minted by one would fail in another"
            )

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'whisper.db').absolute()}"

    def resolved_blob_url(self) -> str:
        return self.blob_url or (self.data_dir / "blobs").absolute().as_uri()

    def ensure_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def code_key(self) -> bytes:
        """The HMAC key for credit codes, created once per data directory when not configured."""
        if self.code_secret is not None:
            return self.code_secret.get_secret_value().encode()
        self.ensure_data_dir()
        path = self.data_dir / KEY_FILE_NAME
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip().encode()
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        return path.read_text().strip().encode()


class WorkerSettings(CoreSettings):
    """Settings of whatever runs the transcription (the local pool or the transcriber Job)."""

    cpu_threads: int = Field(0, ge=0, description="Inference threads; 0 = one per core.")
    batch_size: int = Field(8, ge=1, description="Batch size of the fast (batched) mode.")
    compute_type: ComputeType = Field(
        "int8", description="CTranslate2 precision of the local engine's fast mode."
    )
    accurate_compute_type: ComputeType = Field(
        "float32", description="CTranslate2 precision of the local engine's accurate mode."
    )
    progress_interval: float = Field(
        1.0, ge=0, description="Seconds between progress writes to the database."
    )
    openai_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("OPENAI_API_KEY", "WHISPER_OPENAI_API_KEY", "openai_api_key"),
        description="API key of the OpenAI engine (any non-empty value for servers without keys).",
    )
    openai_base_url: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "OPENAI_BASE_URL", "WHISPER_OPENAI_BASE_URL", "openai_base_url"
        ),
        description="Base URL of an OpenAI-compatible server; default: the OpenAI API.",
    )
    openai_max_chunk_bytes: int = Field(
        24 * 1024 * 1024,
        ge=64 * 1024,
        description="Largest piece of audio sent in one request (the OpenAI API refuses 25 MiB).",
    )
    openai_max_chunk_seconds: float = Field(
        600.0, ge=10, description="Longest piece of audio sent in one request, in seconds."
    )
    openai_parallelism: int = Field(
        4, ge=1, description="Requests one job sends to the OpenAI engine at once."
    )
    openai_max_retries: int = Field(
        5,
        ge=0,
        description="Retries of each request after a 429, 5xx, timeout or connection error.",
    )
    openai_timeout: float = Field(
        300.0, gt=0, description="Seconds to wait for the answer to one request."
    )


class GatewaySettings(WorkerSettings):
    """Settings of the HTTP gateway and its embedded job runner."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, description="Port to listen on.")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for /v1/admin; admin API disabled when unset."
    )
    runner: Literal["local", "kubernetes"] = Field(
        "local",
        description="Where jobs run: the in-process pool, or TranscriptionJobs in a cluster.",
    )
    kubernetes_namespace: str | None = Field(
        None,
        description="Namespace of the TranscriptionJobs (kubernetes runner); default: the pod's own.",
    )
    concurrency: int = Field(
        0, ge=0, description="Transcriptions run at once by the local runner; 0 = automatic."
    )
    lease_seconds: float = Field(
        30.0,
        gt=0,
        description="How long a local worker's claim on a running job lasts without renewal; "
        "a job whose worker died runs again after it.",
    )
    migrate_on_start: bool = Field(True, description="Apply database migrations at startup.")
    idempotency_ttl_hours: int = Field(24, ge=24, description="How long Idempotency-Keys live.")
    sync_wait_seconds: float = Field(
        300.0,
        gt=0,
        description="How long POST /v1/audio/transcriptions waits for its job before answering "
        "with the job ID to poll.",
    )
    # Limits on clients. 0 turns one off where allowed, so a benchmark can show what it buys.
    max_body_bytes: int = Field(
        64 * 1024,
        ge=0,
        description="Largest body of any request but an upload, in bytes; refused (413) before "
        "it is parsed or authenticated.",
    )
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description="Most bytes of a request's unfinished line and headers held; beyond, 400.",
    )
    header_timeout: float = Field(
        10.0,
        ge=0,
        description="Seconds a client has for a request's line and headers, from connecting or "
        "from the request's first byte on a kept-alive connection; the connection is closed then.",
    )
    body_timeout: float = Field(
        30.0,
        ge=0,
        description="Seconds a request body (an upload included) may go without a byte arriving "
        "before the request is refused (408).",
    )
    min_upload_rate: int = Field(
        4096,
        ge=0,
        description="Bytes a second an upload must average over each body_timeout window "
        "(30 s when that is 0), or it is refused (408 upload_too_slow); 0 = no minimum.",
    )
    max_uploads: int = Field(
        12, ge=0, description="Uploads received at once by this process, over every code."
    )
    max_uploads_per_code: int = Field(
        2, ge=0, description="Uploads received at once by this process for one credit code."
    )
    max_connections: int = Field(
        1000,
        ge=0,
        description="Connections (or requests in progress) at once, the new one included, at "
        "which a request is answered 503.",
    )
    keep_alive_timeout: int = Field(
        5, ge=1, description="Seconds an idle kept-alive connection stays open."
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Addresses or CIDR ranges of the proxies in front of the gateway (e.g. the "
        "load balancer's), comma-separated; only their X-Forwarded-For is believed. Empty: the "
        "client address is the connection's peer.",
    )
    auth_failure_limit: int = Field(
        20,
        ge=0,
        description="Wrong credit codes or admin tokens one client address may send within the "
        "window before its authenticated requests are refused (429), per process; 0 = no limit.",
    )
    auth_failure_window_seconds: int = Field(
        60, ge=1, description="The moving window of auth_failure_limit, in seconds."
    )
    auth_failure_delay: float = Field(
        1.0,
        ge=0,
        le=10,
        description="Seconds a wrong credit code or admin token (and a refusal under "
        "auth_failure_limit) waits before it is answered, so a guesser gets at most one answer "
        "per connection per delay; 0 = answer at once.",
    )
    kubernetes_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds the kubernetes runner waits for the API server to create or delete "
        "a TranscriptionJob; a submission it cannot create in time is refunded (503).",
    )

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxy_networks(cls, value: object) -> object:
        """Split the comma-separated form and refuse what is no address or network, which
        uvicorn would otherwise take as a host name and silently never match."""
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            return value
        return [
            str(ipaddress.ip_network(item.strip(), strict=False)) for item in items if item.strip()
        ]

    @model_validator(mode="after")
    def _cluster_shares_state(self) -> Self:
        if self.runner == "kubernetes":
            self._require_shared_state("The kubernetes runner (WHISPER_RUNNER=kubernetes)")
        return self


class OperatorSettings(CoreSettings):
    """Settings of the kopf operator and of the transcriber Jobs it creates."""

    max_running_jobs: int = Field(
        4, ge=0, description="Transcriber Jobs running at once; the rest wait Queued (0 = no cap)."
    )
    transcriber_image: str = Field(
        "whisper-transcriber:latest", description="Container image of the transcriber Job."
    )
    transcriber_env_secret: str | None = Field(
        None,
        description="Secret whose keys become the transcriber's environment: the engine's own "
        "settings (OPENAI_API_KEY, …). Never the database: the transcriber has none.",
    )
    transcriber_service_account: str = Field(
        "whisper-transcriber", description="Service account the transcriber pods run as."
    )
    job_backoff_limit: int = Field(2, ge=0, description="Retries of a Job whose pod crashed.")
    job_deadline_seconds: int = Field(
        3 * 3600, ge=60, description="activeDeadlineSeconds of a transcriber Job."
    )
    job_ttl_seconds: int = Field(
        3600, ge=0, description="How long a finished Job and its pods are kept."
    )
    job_cpu_request: str = Field("1", description="CPU request of a transcriber pod.")
    job_memory_request: str = Field("1Gi", description="Memory request of a transcriber pod.")
    job_cpu_limit: str = Field("2", description="CPU limit of a transcriber pod.")
    job_memory_limit: str = Field("3Gi", description="Memory limit of a transcriber pod.")
    kueue_queue_name: str | None = Field(
        None, description="Kueue LocalQueue for the Jobs; they start suspended when set."
    )
    namespace: str | None = Field(
        None, description="Namespace the operator watches; every namespace when unset."
    )
    reconcile_interval: float = Field(
        5.0,
        gt=0,
        description="Seconds between reconciliation passes (database, TranscriptionJobs and "
        "Jobs compared and repaired, progress copied) besides the event-driven ones.",
    )

    @model_validator(mode="after")
    def _cluster_shares_state(self) -> Self:
        self._require_shared_state("The operator")
        return self

    @property
    def jobs_namespace(self) -> str:
        """Where a TranscriptionJob the gateway failed to create is created instead."""
        return self.namespace or "default"
