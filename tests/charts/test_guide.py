"""The GKE guide: its helm commands render, its manifests are valid, its Secrets and teardown fit."""

from __future__ import annotations

import re
import shlex
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from tests.charts.conftest import REQUIRED, ROOT, Helm, Render
from tests.charts.test_chart import (
    GKE_VALUES,
    K8S_VERSION,
    by_kind,
    crd_schema,
    pod_specs,
    secrets_named,
    transcriber_job_of,
)
from transcription.settings import GatewaySettings

GUIDE = ROOT / "docs" / "deploy-gke.md"
#: gcloud verbs that make something the teardown must remove, and those that remove it.
CREATES = {"create", "create-auto", "connect", "add-iam-policy-binding"}
DELETES = {"delete", "rm", "remove-iam-policy-binding"}


def guide_sections() -> dict[str, str]:
    """The guide's text under each ``## N. Title`` heading, by title."""
    parts = re.split(r"^## (?:\d+\. )?(.+)$", GUIDE.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def guide_blocks(language: str, text: str | None = None) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text or GUIDE.read_text(), re.S)


def guide_variables() -> dict[str, str]:
    """The example names the guide exports (``export NAME=value``), computed ones left out."""
    names: dict[str, str] = {}
    for block in guide_blocks("bash"):
        for line in block.splitlines():
            if line.startswith("export ") and "$(" not in line:
                for assignment in shlex.split(line)[1:]:
                    name, _, value = assignment.partition("=")
                    names[name] = expand(value, names)
    return names


def expand(text: str, names: dict[str, str]) -> str:
    """``$NAME`` replaced by its example value; a name the guide does not export stays as it is."""
    return re.sub(r"\$(\w+)", lambda m: names.get(m.group(1), m.group(0)), text)


def guide_commands(text: str | None = None) -> list[list[str]]:
    """Every gcloud, kubectl and helm command of the guide's bash blocks, expanded and split."""
    names = guide_variables()
    commands = []
    for block in guide_blocks("bash", text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(expand(line, names), comments=True)
            if words and words[0] in ("gcloud", "kubectl", "helm"):
                commands.append(words)
    return commands


def guide_manifests() -> list[dict[str, Any]]:
    """Every manifest the guide shows or applies: yaml blocks and ``apply -f - <<YAML`` heredocs."""
    heredoc = re.compile(r"^kubectl .*apply -f - <<(\w+)\n(.*?)^\1$", re.S | re.M)
    texts = [*guide_blocks("yaml")]
    for block in guide_blocks("bash"):
        texts += [body for _, body in heredoc.findall(block)]
    return [doc for text in texts for doc in yaml.safe_load_all(text) if doc]


def guide_releases(helm: Helm) -> list[list[dict[str, Any]]]:
    """The objects of each ``helm install``/``upgrade``/``template`` command of the guide."""
    releases = []
    for command in guide_commands():
        if command[1] in ("install", "upgrade", "template"):
            assert not any("$" in a for a in command), f"unknown variable in {command}"
            flags = [a for a in command[2:] if a not in ("--install", "--wait", "--atomic")]
            assert str(GKE_VALUES.relative_to(ROOT)) in flags, command
            out = helm("template", *flags).stdout
            releases.append([d for d in yaml.safe_load_all(out) if d])
    assert releases, "the guide installs with helm"
    return releases


def test_every_helm_install_of_the_guide_renders(helm: Helm) -> None:
    names = guide_variables()
    assert {"PROJECT", "REGION", "REPO", "BUCKET", "GSA", "TRANSCRIBER_GSA", "HOST"} <= names.keys()
    assert names["GSA"] != names["TRANSCRIBER_GSA"]
    for objects in guide_releases(helm):
        accounts = {a["metadata"]["name"]: a["metadata"]["annotations"]
                    for a in by_kind(objects, "ServiceAccount")}  # fmt: skip
        for name, annotated in accounts.items():
            gsa = names["TRANSCRIBER_GSA" if name == "whisper-transcriber" else "GSA"]
            assert annotated["iam.gke.io/gcp-service-account"] == gsa, name
        assert transcriber_job_of(objects)["spec"]["template"]["spec"]["serviceAccountName"] in (
            accounts
        )
        (proxy,) = pod_specs(objects)["Deployment/whisper-gateway"]["initContainers"]
        assert proxy["args"][-1] == f"{names['PROJECT']}:{names['REGION']}:whisper"
        (route,) = by_kind(objects, "HTTPRoute")
        assert route["spec"]["hostnames"] == [names["HOST"]]
        # The guide promises the load balancer outwaits the synchronous call.
        (policy,) = by_kind(objects, "GCPBackendPolicy")
        assert policy["spec"]["targetRef"] == {"group": "", "kind": "Service",
                                               "name": "whisper-gateway"}  # fmt: skip
        sync_wait = GatewaySettings.model_fields["sync_wait_seconds"].default
        assert policy["spec"]["default"]["timeoutSec"] == 3600 > sync_wait


def test_every_manifest_the_guide_applies_is_valid(render: Render) -> None:
    manifests = guide_manifests()
    assert {"CreditCode", "Gateway"} <= {m["kind"] for m in manifests}
    schema = crd_schema(render(*REQUIRED), "CreditCode")
    for manifest in manifests:
        if manifest["kind"] == "CreditCode":
            jsonschema.Draft4Validator(schema).validate(manifest)
            continue
        try:
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            # GKE's Gateway API types are CRDs: the next test checks the Gateway by its use.
            assert manifest["apiVersion"] == "gateway.networking.k8s.io/v1", manifest["kind"]


def test_the_guide_gateway_is_the_one_the_route_attaches_to(render: Render) -> None:
    (gateway,) = [m for m in guide_manifests() if m["kind"] == "Gateway"]
    (route,) = by_kind(render("-f", str(GKE_VALUES)), "HTTPRoute")
    (parent,) = route["spec"]["parentRefs"]
    assert parent == {"name": gateway["metadata"]["name"],
                      "namespace": gateway["metadata"]["namespace"]}  # fmt: skip
    assert gateway["spec"]["gatewayClassName"].startswith("gke-l7-")
    (listener,) = gateway["spec"]["listeners"]
    assert listener["protocol"] == "HTTPS" and listener["allowedRoutes"]["namespaces"]["from"] == (
        "All"
    )
    certificates = [c[4] for c in guide_commands() if c[1:4] == ["compute", "ssl-certificates",
                                                                   "create"]]  # fmt: skip
    assert listener["tls"]["options"]["networking.gke.io/pre-shared-certs"] in certificates


def secret_keys(obj: Any) -> set[tuple[str, str]]:
    """Every (Secret, key) a manifest reads through ``secretKeyRef``."""
    if isinstance(obj, dict):
        ref = obj.get("secretKeyRef")
        found = {(ref["name"], ref["key"])} if isinstance(ref, dict) else set()
        return found.union(*(secret_keys(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(secret_keys(v) for v in obj))
    return set()


def created_secrets(text: str | None = None) -> dict[str, set[str]]:
    """The keys of each Secret the guide's ``kubectl create secret generic`` commands make."""
    created: dict[str, set[str]] = {}
    for command in guide_commands(text):
        if command[0] == "kubectl" and "secret" in command and "create" in command:
            name = command[command.index("generic") + 1]
            literals = [a.removeprefix("--from-literal=") for a in command
                        if a.startswith("--from-literal=")]  # fmt: skip
            created.setdefault(name, set()).update(a.partition("=")[0] for a in literals)
    return created


def test_the_guide_creates_exactly_the_secrets_the_chart_reads(helm: Helm) -> None:
    created = created_secrets(guide_sections()["Secrets"])
    # Elsewhere (the upgrade) the guide only recreates step 7's Secrets.
    for name, keys in created_secrets().items():
        assert keys <= created.get(name, set()), name
    assert set(created) == {
        "whisper-database",
        "whisper-code-secret",
        "whisper-admin",
        "whisper-transcriber",
    }
    for objects in guide_releases(helm):
        job = transcriber_job_of(objects)
        assert set(created) == secrets_named(objects) | secrets_named(job)
        for name, key in secret_keys(objects):
            assert key in created[name], f"the guide's Secret {name} has no {key}"
        # The transcriber's Secret becomes its whole environment: the engine's key, nothing else.
        (engine,) = secrets_named(job)
        assert created[engine] == {"OPENAI_API_KEY"}


def gcloud_resource(command: list[str]) -> tuple[str, tuple[str, ...], str, dict[str, str]]:
    """A gcloud command as (verb, group, name, flags); the name is the first positional argument
    after the verb (a service account's email cut to its ID), else the ``--network``."""
    at = next(i for i, w in enumerate(command) if w in CREATES | DELETES)
    rest = command[at + 1 :]
    flags = dict(w[2:].partition("=")[::2] for w in rest if w.startswith("--"))
    positional = [w for w in rest if not w.startswith("-")]
    name = positional[0] if positional else flags.get("network", "")
    return command[at], tuple(command[1:at]), name.rstrip("/").split("@")[0], flags


def test_the_teardown_deletes_everything_the_guide_creates(render: Render) -> None:
    teardown = guide_commands(guide_sections()["Uninstall"])
    everything = guide_commands()
    deleted: set[tuple[Any, ...]] = set()
    for command in teardown:
        if command[0] == "gcloud" and set(command) & DELETES:
            verb, group, name, flags = gcloud_resource(command)
            if verb == "rm" and "--recursive" in command:
                deleted.add((("storage", "buckets"), name))
            elif verb == "remove-iam-policy-binding":
                deleted.add((group, name, flags["member"], flags["role"]))
            else:
                deleted.add((group, name))
        elif command[:3] == ["kubectl", "delete", "namespace"]:
            deleted.add(("namespace", command[3]))
        elif command[:3] == ["kubectl", "delete", "crd"]:
            deleted |= {("crd", name) for name in command[3:]}
        elif command[:2] == ["helm", "uninstall"]:
            deleted.add(("release", command[2]))

    needed: set[tuple[Any, ...]] = set()
    for command in everything:
        if command[0] == "gcloud" and set(command) & CREATES:
            verb, group, name, flags = gcloud_resource(command)
            if verb == "add-iam-policy-binding" and group == ("projects",):
                needed.add((group, name, flags["member"], flags["role"]))
            elif verb == "add-iam-policy-binding":
                needed.add((group, name))  # the binding goes with the bucket or the account
            elif "instance" in flags:
                needed.add((("sql", "instances"), flags["instance"]))  # databases, users
            else:
                needed.add((group, name))
        elif command[:3] == ["kubectl", "create", "namespace"]:
            needed.add(("namespace", command[3]))
        elif command[0] == "helm" and command[1] in ("install", "upgrade"):
            needed.add(("release", next(a for a in command[2:] if not a.startswith("-"))))
    needed |= {("namespace", m["metadata"]["namespace"]) for m in guide_manifests()
               if "namespace" in m["metadata"]}  # fmt: skip
    # The chart keeps its CRDs on uninstall (crds.keep), so removing everything names them.
    needed |= {("crd", c["metadata"]["name"])
               for c in by_kind(render(*REQUIRED), "CustomResourceDefinition")}  # fmt: skip
    assert needed - deleted == set()

    # Safe order: the cluster goes after everything in it, the certificate after the Gateway
    # (its load balancer holds it), the service accounts after their project binding.
    def position(*prefix: str) -> int:
        return next(i for i, c in enumerate(teardown) if c[: len(prefix)] == list(prefix))

    cluster = position("gcloud", "container", "clusters", "delete")
    assert all(i < cluster for i, c in enumerate(teardown) if c[0] in ("kubectl", "helm"))
    assert position("kubectl", "-n", "infra", "delete", "gateway") < position(
        "gcloud", "compute", "ssl-certificates", "delete"
    )
    assert position("gcloud", "projects", "remove-iam-policy-binding") < position(
        "gcloud", "iam", "service-accounts", "delete"
    )
