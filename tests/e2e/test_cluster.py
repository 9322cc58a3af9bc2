"""Against a real cluster: the CRDs apply, and a CreditCode mints a code into its Secret.

Runs only when KUBECONFIG points at a cluster where the operator is deployed (``helm install``
of ``charts/``, or ``crds/`` + ``deploy/rbac/`` + ``whisperctl operator``); set
WHISPER_E2E_NAMESPACE to the namespace it watches (default ``default``).
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from pathlib import Path

import pytest

from transcription import resources

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        not os.environ.get("KUBECONFIG") or not Path(os.environ["KUBECONFIG"]).exists(),
        reason="needs a real cluster: set KUBECONFIG to its kubeconfig (the operator deployed)",
    ),
]

NAMESPACE = os.environ.get("WHISPER_E2E_NAMESPACE", "default")


def test_a_credit_code_is_minted_into_its_secret_and_revoked_on_delete() -> None:
    from kubernetes import client

    from transcription.kubeclient import api_client

    api = api_client()
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    name = f"e2e-{secrets.token_hex(4)}"
    body = {"apiVersion": resources.API_VERSION, "kind": "CreditCode",
            "metadata": {"name": name}, "spec": {"seconds": 60}}  # fmt: skip
    custom.create_namespaced_custom_object(
        resources.GROUP, resources.VERSION, NAMESPACE, "creditcodes", body
    )
    try:
        deadline = time.monotonic() + 60
        status: dict[str, object] = {}
        while time.monotonic() < deadline and status.get("state") != "active":
            time.sleep(1)
            found = custom.get_namespaced_custom_object(
                resources.GROUP, resources.VERSION, NAMESPACE, "creditcodes", name
            )
            status = dict(found.get("status") or {})  # type: ignore[union-attr]
        assert status.get("state") == "active", status
        secret = core.read_namespaced_secret(f"{name}-code", NAMESPACE)
        assert base64.b64decode((secret.data or {})["code"]).decode().startswith("wt_")
    finally:
        custom.delete_namespaced_custom_object(
            resources.GROUP, resources.VERSION, NAMESPACE, "creditcodes", name
        )
