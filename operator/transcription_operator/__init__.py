"""kopf operator for TranscriptionJob and CreditCode resources: ``kopf run -m transcription_operator``."""

from transcription_operator import handlers

__all__ = ["handlers"]
