"""kopf operator for TranscriptionJob and CreditCode resources (see issue: Kubernetes plane)."""
