"""Job runners: where a submitted job is executed (in-process pool, or Kubernetes later)."""

from gateway.runners.base import JobRunner
from gateway.runners.local import LocalJobRunner

__all__ = ["JobRunner", "LocalJobRunner"]
