"""A Kubernetes API client for the gateway and the operator: in-cluster, else the kubeconfig."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubernetes import client

POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def api_client(*, retries: bool = True) -> client.ApiClient:
    """The service account's credentials inside a pod; otherwise ``$KUBECONFIG`` (read now,
    not when the kubernetes package was imported) or ``~/.kube/config``. ``retries=False``
    turns off urllib3's retries of failed connections, so a call's timeout bounds all of it."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        configuration = client.Configuration.get_default_copy()
    except config.ConfigException:
        configuration = client.Configuration()
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration
        )
    if not retries:
        configuration.retries = False
    return client.ApiClient(configuration)


def pod_namespace() -> str | None:
    """The namespace this pod runs in, when it runs in one."""
    return POD_NAMESPACE_FILE.read_text().strip() if POD_NAMESPACE_FILE.exists() else None
