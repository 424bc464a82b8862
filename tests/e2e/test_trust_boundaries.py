"""Issue 14, items 3, 5 and 6, as attacks on the local cluster.

The operator runs from the chart under its own ServiceAccount (the node agent runs the operator
pod as a process with that account's token); the attacker is a ServiceAccount that may only
create QuantizedModels (and read the two Secrets meant for it), talking to the API server with a
token of its own, never the admin kubeconfig. Each test names the attack, and what it got before
the chart carried the policy (see docs/security.md, threat model).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from e2e_helpers import condition, qm_status
from fixtures import cluster_client
from hub_server import FakeHub
from kubernetes import client
from localcluster import services

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]
REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kquant"
PRIVATE_REPO = "acme/SmolLM2-private"
HUB_TOKEN = "hf_" + "a1B2c3D4" * 4
API_KEY = "sk-kquant-" + uuid.uuid4().hex


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Platform:
    """The chart installed with the local hub allowed, a tenant namespace and the tenant's client."""

    def __init__(self, cluster: cluster_client.Cluster, hub: FakeHub, tmp: pathlib.Path) -> None:
        self.cluster = cluster
        self.hub = hub
        self.admin = cluster.api_client()
        self.core = client.CoreV1Api(self.admin)
        suffix = uuid.uuid4().hex[:6]
        self.system = f"kq-sys-{suffix}"
        self.tenant = f"team-{suffix}"
        self.release = f"kq-{suffix}"
        self.operator_account = f"{self.release}-kquant"
        self.helm_env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "HELM_CACHE_HOME": str(tmp / "c"),
                         "HELM_CONFIG_HOME": str(tmp / "f"), "HELM_DATA_HOME": str(tmp / "d")}

    def helm(self, *args: str) -> str:
        done = subprocess.run([str(self.cluster.helm), *args], capture_output=True, text=True, env=self.helm_env,
                              timeout=300, check=False)
        assert done.returncode == 0, f"helm {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def install(self) -> None:
        allowed = ["https://huggingface.co", "https://www.modelscope.cn", self.hub.url]
        self.helm("install", self.release, str(CHART), "--namespace", self.system,
                  "--set", f"peering.name={self.release}", "--set", f"healthPort={_free_port()}",
                  "--set-json", f"policy.allowedEndpoints={json.dumps(allowed)}")
        selector = f"app.kubernetes.io/instance={self.release}"
        cluster_client.wait_for(lambda: _ready_pods(self.core, self.system, selector), timeout=180,
                                what="operator pod Ready")

    def token_client(self, namespace: str, account: str) -> client.ApiClient:
        """An API client that authenticates with a fresh token of ``account``: the API server's
        authorizer and admission see that ServiceAccount, as they would see a user's kubectl."""
        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(expiration_seconds=3600))
        token = self.core.create_namespaced_service_account_token(account, namespace, request).status.token
        admin = self.admin.configuration
        configuration = client.Configuration(host=admin.host, api_key={"BearerToken": token},
                                             api_key_prefix={"BearerToken": "Bearer"})
        configuration.ssl_ca_cert = admin.ssl_ca_cert
        return client.ApiClient(configuration)

    def make_tenant(self) -> None:
        """The attacker: may create QuantizedModels in its namespace and read two Secrets there
        (the hub token and the API key meant for it), nothing else."""
        self.core.create_namespaced_service_account(self.tenant, client.V1ServiceAccount(
            metadata=client.V1ObjectMeta(name="modeller")))
        rbac = client.RbacAuthorizationV1Api(self.admin)
        rbac.create_namespaced_role(self.tenant, {
            "metadata": {"name": "modeller"},
            "rules": [{"apiGroups": ["kquant.dev"], "resources": ["quantizedmodels"],
                       "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                      {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["hub-token", "chat-key"],
                       "verbs": ["get"]}]})
        rbac.create_namespaced_role_binding(self.tenant, {
            "metadata": {"name": "modeller"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "modeller"},
            "subjects": [{"kind": "ServiceAccount", "name": "modeller", "namespace": self.tenant}]})
        cluster_client.wait_for(lambda: self.core.list_namespaced_service_account(
            self.tenant, field_selector="metadata.name=modeller").items, what="the tenant's ServiceAccount")

    def as_tenant(self) -> client.ApiClient:
        return self.token_client(self.tenant, "modeller")

    def secret(self, name: str, data: dict[str, str], labels: dict[str, str] | None = None) -> None:
        self.core.create_namespaced_secret(self.tenant, client.V1Secret(
            metadata=client.V1ObjectMeta(name=name, labels=labels), string_data=data))


def _ready_pods(core: client.CoreV1Api, namespace: str, selector: str) -> bool:
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    return bool(pods) and all(any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
                              for p in pods)


def _model(name: str, endpoint: str | None, **changes: Any) -> dict[str, Any]:
    """SmolLM2 with one variant served on CPU (the smallest build the real quantizer makes)."""
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"]["name"] = name
    spec = body["spec"]
    spec["variants"] = [{"name": "q8", "type": "Q8_0"}]
    spec["serving"]["variant"] = "q8"
    spec["calibration"]["chunks"] = 4
    spec["evaluation"]["chunks"] = 2
    if endpoint is not None:
        spec["source"]["huggingface"]["endpoint"] = endpoint
    for path, value in changes.items():
        section, key = path.split("__")
        spec[section][key] = value
    return body


@pytest.fixture(scope="module")
def platform(cluster: cluster_client.Cluster, crd: None,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    from fixtures import smollm2

    with FakeHub() as hub:
        hub.add_repo(PRIVATE_REPO, smollm2.hf_dir(), token=HUB_TOKEN)
        platform = Platform(cluster, hub, tmp_path_factory.mktemp("helm"))
        for name in (platform.system, platform.tenant):
            platform.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        # Admitted before the platform installed its policy: the operator must refuse it itself.
        custom = client.CustomObjectsApi(platform.admin)
        legacy = _model("legacy", "http://hub.evil.invalid:8000")
        legacy["spec"]["source"]["huggingface"]["repo"] = PRIVATE_REPO
        cluster_client.wait_for(lambda: platform.core.list_namespaced_service_account(
            platform.tenant, field_selector="metadata.name=default").items, what="default ServiceAccount")
        custom.create_namespaced_custom_object("kquant.dev", "v1alpha1", platform.tenant, "quantizedmodels", legacy)
        try:
            platform.make_tenant()
            platform.install()
            yield platform
        finally:
            # Its admission policies are cluster-wide: never leave them to refuse later tests' models.
            platform.helm("uninstall", platform.release, "--namespace", platform.system, "--wait",
                          "--ignore-not-found")
            for name in (platform.tenant, platform.system):
                platform.core.delete_namespace(name)


def _refused(api_client: client.ApiClient, namespace: str, body: dict[str, Any]) -> str:
    custom = client.CustomObjectsApi(api_client)
    try:
        custom.create_namespaced_custom_object("kquant.dev", "v1alpha1", namespace, "quantizedmodels", body)
    except client.ApiException as exc:
        assert exc.status in (403, 422), exc.body
        message: str = json.loads(exc.body)["message"]
        return message
    raise AssertionError(f"QuantizedModel {body['metadata']['name']} was admitted")


def test_admission_refuses_what_the_platform_does_not_allow(platform: Platform) -> None:
    """Item 3 at `kubectl apply`: each attack the tenant tries is refused with a message."""
    tenant = platform.as_tenant()
    platform.secret("db-password", {"password": "hunter2-db"})
    hub = PRIVATE_REPO
    attacks = {
        "cleartext-hub": (_model("a1", "http://hub.evil.invalid"), "is not an allowed hub"),
        "lookalike-hub": (_model("a2", "https://huggingface.co.evil.invalid"), "is not an allowed hub"),
        "listed-hub-over-http": (_model("a3", "http://huggingface.co"), "is not an allowed hub"),
        "quantizer-image": (_model("a4", None, quantizer__image="evil.invalid/miner:1"),
                            "spec.quantizer.image is evil.invalid/miner:1, which is not an allowed quantizer image"),
        "server-image": (_model("a5", None, serving__image="evil.invalid/llama:1"),
                         "spec.serving.image is evil.invalid/llama:1, which is not an allowed server image"),
        "db-password-as-hub-token": (_model("a6", platform.hub.url), "may not get"),
        "db-password-as-api-key": (_model("a7", None), "may not get"),
        # A modelscope source: the same rules on its own fields, and its own default hub.
        "modelscope-lookalike-hub": (_model("a8", None), "spec.source.modelscope.endpoint is "
                                     "https://www.modelscope.cn.evil.invalid, which is not an allowed hub"),
        "modelscope-listed-hub-over-http": (_model("a9", None), "spec.source.modelscope.endpoint is "
                                            "http://www.modelscope.cn, which is not an allowed hub"),
        "db-password-as-modelscope-token": (_model("a10", None), "spec.source.modelscope.tokenSecretRef names "
                                            "Secret db-password, which"),
    }
    for name, endpoint in (("modelscope-lookalike-hub", "https://www.modelscope.cn.evil.invalid"),
                           ("modelscope-listed-hub-over-http", "http://www.modelscope.cn"),
                           ("db-password-as-modelscope-token", platform.hub.url)):
        source = {"repo": hub, **({"endpoint": endpoint} if endpoint else {})}
        attacks[name][0]["spec"]["source"] = {"modelscope": source}
    attacks["db-password-as-modelscope-token"][0]["spec"]["source"]["modelscope"]["tokenSecretRef"] = {
        "name": "db-password", "key": "password"}
    attacks["db-password-as-hub-token"][0]["spec"]["source"]["huggingface"].update(
        repo=hub, tokenSecretRef={"name": "db-password", "key": "password"})
    attacks["db-password-as-api-key"][0]["spec"]["serving"]["apiKeySecretRef"] = {"name": "db-password"}
    said = {name: _refused(tenant, platform.tenant, body) for name, (body, _) in attacks.items()}
    for name, (_, expected) in attacks.items():
        assert expected in said[name], (name, said[name])
    assert "policy.allowedEndpoints" in said["cleartext-hub"]
    assert f"system:serviceaccount:{platform.tenant}:modeller may not get" in said["db-password-as-hub-token"]
    assert "hunter2" not in json.dumps(said)
    # Nothing reached the hub (no build started) and the tenant still cannot read the Secret.
    with pytest.raises(client.ApiException) as caught:
        client.CoreV1Api(tenant).read_namespaced_secret("db-password", platform.tenant)
    assert caught.value.status == 403


def test_the_operator_refuses_what_was_admitted_before_the_policy(platform: Platform) -> None:
    """Item 3 in the operator: a model admitted before the policy (a disallowed endpoint), and
    one naming a Secret that did not opt in as a hub token (an admin may read it, so admission
    lets it through), get a condition and a Warning Event, and no Job."""
    custom = client.CustomObjectsApi(platform.admin)
    platform.secret("unlabelled-token", {"token": HUB_TOKEN})
    body = _model("unlabelled", platform.hub.url)
    body["spec"]["source"]["huggingface"].update(repo=PRIVATE_REPO, tokenSecretRef={"name": "unlabelled-token"})
    custom.create_namespaced_custom_object("kquant.dev", "v1alpha1", platform.tenant, "quantizedmodels", body)

    for name, expected in (("legacy", "spec.source.huggingface.endpoint is 'http://hub.evil.invalid:8000', which "
                                      "is not an allowed hub"),
                           ("unlabelled", "which is not labelled kquant.dev/hub-token=true")):
        def refused(name: str = name, expected: str = expected) -> dict[str, Any] | None:
            found = condition(qm_status(platform.cluster, platform.tenant, name), "Quantized")
            return found if found and expected in found["message"] else None

        found = cluster_client.wait_for(refused, timeout=120, what=f"{name} refused by the operator")
        assert found["status"] == "False" and "refused by the platform policy" in found["message"]
        events = platform.core.list_namespaced_event(
            platform.tenant, field_selector=f"involvedObject.name={name},type=Warning").items
        assert any(expected in (e.message or "") for e in events), [e.message for e in events]
    jobs = client.BatchV1Api(platform.admin).list_namespaced_job(platform.tenant).items
    assert jobs == [], [j.metadata.name for j in jobs]
    assert not any(request.authorization for request in platform.hub.requests), "the token went to the hub"


def _as_operator(platform: Platform) -> client.ApiClient:
    return platform.token_client(platform.system, platform.operator_account)


def test_the_operator_account_reaches_only_what_the_design_needs(platform: Platform) -> None:
    """Item 5: the operator's rights as the API server sees them (SelfSubjectRulesReview, what
    `kubectl auth can-i --list` prints), and what its token can still do if stolen."""
    operator = _as_operator(platform)
    auth = client.AuthorizationV1Api(operator)
    review = auth.create_self_subject_rules_review(
        client.V1SelfSubjectRulesReview(spec=client.V1SelfSubjectRulesReviewSpec(namespace=platform.tenant)))
    rules = {(group, resource): set(rule.verbs) for rule in review.status.resource_rules
             for group in rule.api_groups or [""] for resource in rule.resources or []}
    print("\n".join(f"{g or 'core'}/{r}: {sorted(v)}" for (g, r), v in sorted(rules.items())))
    # delete: superseded builds and a removed server; get: the ownership check before any write
    assert rules[("batch", "jobs")] == {"get", "list", "watch", "create", "delete"}
    assert rules[("rbac.authorization.k8s.io", "roles")] == {"get", "create", "delete"}
    assert rules[("", "secrets")] == {"get"}  # metadata of a named hub token; never list or watch
    assert rules[("", "pods")] == {"list", "watch"}
    assert "delete" not in rules[("", "persistentvolumeclaims")]  # the models' weights outlive a spec edit
    granted = {verb for verbs in rules.values() for verb in verbs}
    assert not granted & {"deletecollection", "update", "escalate", "bind", "impersonate", "*"}

    # RBAC adds rights and cannot subtract kube-system from a ClusterRole; the chart's guard
    # policy does, and it bounds what the operator's token creates anywhere.
    core, batch = client.CoreV1Api(operator), client.BatchV1Api(operator)
    rbac = client.RbacAuthorizationV1Api(operator)
    attacks: dict[str, Any] = {
        "configmap-in-kube-system": lambda: core.create_namespaced_config_map(
            "kube-system", {"metadata": {"name": "kquant-was-here"}}),
        "role-in-kube-public": lambda: rbac.create_namespaced_role(
            "kube-public", {"metadata": {"name": "kquant"}, "rules": []}),
        "job-with-another-image": lambda: batch.create_namespaced_job(platform.tenant, {
            "metadata": {"name": "steal"}, "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "x", "image": "busybox", "command": ["cat", "/secret/password"]}]}}}}),
        "role-over-secrets": lambda: rbac.create_namespaced_role(platform.tenant, {
            "metadata": {"name": "steal"}, "rules": [{"apiGroups": [""], "resources": ["configmaps", "secrets"],
                                                      "resourceNames": ["x"], "verbs": ["get"]}]}),
    }
    for name, attack in attacks.items():
        with pytest.raises(client.ApiException) as caught:
            attack()
        assert caught.value.status in (403, 422), (name, caught.value.body)
        assert "ValidatingAdmissionPolicy" in caught.value.body or "forbidden" in caught.value.body, name


def test_api_key_guards_the_server(platform: Platform) -> None:
    """Items 3 and 6 on the way that is allowed: the tenant's model fetches a private repo with an
    opted-in token from an allowed (listed http) hub, is built and served; its server pod has no
    ServiceAccount token, and answers only with the API key."""
    tenant = platform.as_tenant()
    platform.secret("hub-token", {"token": HUB_TOKEN}, labels={"kquant.dev/hub-token": "true"})
    platform.secret("chat-key", {"keys": API_KEY + "\n"})
    body = _model("chat", platform.hub.url)
    body["spec"]["source"]["huggingface"].update(repo=PRIVATE_REPO, tokenSecretRef={"name": "hub-token"})
    body["spec"]["serving"]["apiKeySecretRef"] = {"name": "chat-key", "key": "keys"}
    client.CustomObjectsApi(tenant).create_namespaced_custom_object(
        "kquant.dev", "v1alpha1", platform.tenant, "quantizedmodels", body)

    def ready() -> bool:
        status = qm_status(platform.cluster, platform.tenant, "chat")
        quantized = condition(status, "Quantized")
        if quantized and quantized["status"] == "False" and quantized["reason"] != "Building":
            assert quantized["reason"] not in ("BuildFailed", "BuildBlocked", "SecretNotFound"), quantized
        found = condition(status, "Ready")
        return bool(found and found["status"] == "True")

    cluster_client.wait_for(ready, timeout=900, interval=3, what="chat to be served")
    assert any(r.authorization == f"Bearer {HUB_TOKEN}" for r in platform.hub.requests)
    [pod] = [p for p in platform.core.list_namespaced_pod(platform.tenant, label_selector="kquant.dev/role=server")
             .items if not p.metadata.deletion_timestamp]
    assert pod.spec.automount_service_account_token is False
    assert not any(v.projected for v in pod.spec.volumes or []), "a token volume in the server pod"
    args = pod.spec.containers[0].args
    assert "--api-key-file" in args and API_KEY not in " ".join(args)

    address = services.ready_address(platform.core, platform.tenant, "chat")
    assert _chat(address, None) == 401
    assert _chat(address, "sk-wrong") == 401
    assert _chat(address, API_KEY) == 200
    health = urllib.request.urlopen(f"http://{address}/health", timeout=10)  # probes need no key
    assert health.status == 200


def _chat(address: str, key: str | None) -> int:
    body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"http://{address}/v1/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
