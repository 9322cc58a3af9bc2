"""Domain errors: each carries a machine-readable ``code``; the gateway maps classes to HTTP."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error a user can cause or see; ``code`` is stable and documented."""

    code = "error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def details(self) -> dict[str, str]:
        """Fields the error body carries besides message, type, param and code."""
        return {}


class InvalidRequest(DomainError):
    """The request is malformed (a missing or invalid field)."""

    code = "invalid_request"


class Unauthenticated(DomainError):
    """No credit code, or one the service does not know."""

    code = "invalid_code"


class AdminRequired(DomainError):
    """The admin token is missing or wrong."""

    code = "invalid_admin_token"


class AdminDisabled(DomainError):
    """The admin API is off because no admin token is configured."""

    code = "admin_api_disabled"


class CreditError(DomainError):
    """The code exists but cannot pay for this request."""

    code = "insufficient_credit"


class InsufficientCredit(CreditError):
    code = "insufficient_credit"


class UsesExhausted(CreditError):
    code = "code_used"


class CodeExpired(CreditError):
    code = "code_expired"


class CodeRevoked(CreditError):
    code = "code_revoked"


class ClusterUnavailable(DomainError):
    """The cluster's API server could not take the job in time; the job was refunded."""

    code = "cluster_unavailable"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerBusy(DomainError):
    """The server holds as many connections as it may; nothing was done."""

    code = "server_busy"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotFound(DomainError):
    code = "not_found"


class Conflict(DomainError):
    code = "conflict"


class TranscriptNotReady(Conflict):
    code = "transcript_not_ready"


class TranscriptionPending(Conflict):
    """The job did not finish within the wait of a synchronous request; poll it by its ID."""

    code = "transcription_pending"

    def __init__(self, message: str, *, job_id: str) -> None:
        super().__init__(message, param=job_id)
        self.job_id = job_id

    def details(self) -> dict[str, str]:
        return {"job_id": self.job_id}


class IdempotencyKeyInUse(Conflict):
    """The same Idempotency-Key is still being processed by another request."""

    code = "idempotency_key_in_use"


class IdempotencyKeyReused(DomainError):
    """The same Idempotency-Key was sent with a different request."""

    code = "idempotency_key_reused"


class UploadTooLarge(DomainError):
    code = "file_too_large"


class RequestTooLarge(DomainError):
    """A request body other than an upload is larger than the server reads."""

    code = "request_too_large"


class RequestTimeout(DomainError):
    """The client stopped sending its request before it was complete; nothing was stored."""

    code = "request_timeout"


class UploadTimeout(RequestTimeout):
    code = "upload_timeout"


class TooManyRequests(DomainError):
    """The caller must wait ``retry_after`` seconds before trying again; nothing was done."""

    code = "rate_limited"

    def __init__(
        self, message: str, *, retry_after: int, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after


class TooManyUploads(TooManyRequests):
    code = "too_many_uploads"


class UnsupportedMediaType(DomainError):
    """The upload is not an MP3 stream, whatever its name says."""

    code = "unsupported_media_type"


class InvalidAudio(DomainError):
    """The upload looks like an MP3 but cannot be used: empty, undecodable or too long."""

    code = "invalid_audio"


class EmptyAudio(InvalidAudio):
    code = "empty_file"


class UndecodableAudio(InvalidAudio):
    code = "audio_undecodable"


class AudioTooLong(InvalidAudio):
    code = "audio_too_long"


class TranscriptionFailed(DomainError):
    """The engine could not transcribe the audio; the job fails and its credit is released."""

    code = "transcription_failed"


class EngineUnavailable(TranscriptionFailed):
    """The transcription service (e.g. the OpenAI API) could not be used even after retries:
    rate limits, outages, timeouts, a refused key. Not the audio's fault."""

    code = "engine_unavailable"


def _codes(cls: type[DomainError]) -> set[str]:
    return {cls.code}.union(*(_codes(sub) for sub in cls.__subclasses__()))


#: Every error code the project itself gives: its error classes' and those named where a job is
#: failed or an error raised (engines, lifecycle, runners, operator, transcriber, gateway). A
#: code outside it came from somewhere untrusted, such as a transcriber pod's record.
KNOWN_CODES: frozenset[str] = frozenset(
    _codes(DomainError)
    | {
        # transcriber engines
        "engine_error",
        "engine_rate_limited",
        "engine_rejected",
        "engine_timeout",
        "engine_unauthorized",
        "engine_unreachable",
        # lifecycle, runners, operator and transcriber
        "audio_missing",
        "audio_rejected",
        "internal_error",
        "invalid_job_environment",
        "invalid_spec",
        "job_lost",
        "transcript_missing",
        "worker_lost",
        # gateway
        "invalid_http_request",
        "missing_code",
        "model_not_found",
        "transcription_cancelled",
        "upload_too_slow",
    }
)
