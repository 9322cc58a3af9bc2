"""Shared domain of the Whisper transcription service: credit ledger, lifecycle, storage, audio."""
