"""A Kubernetes API client for the gateway and the operator: in-cluster, else the kubeconfig."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubernetes import client

POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def api_client() -> client.ApiClient:
    """The service account's credentials inside a pod; otherwise ``$KUBECONFIG`` (read now,
    not when the kubernetes package was imported) or ``~/.kube/config``."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config(config_file=os.environ.get("KUBECONFIG") or None)


def pod_namespace() -> str | None:
    """The namespace this pod runs in, when it runs in one."""
    return POD_NAMESPACE_FILE.read_text().strip() if POD_NAMESPACE_FILE.exists() else None
