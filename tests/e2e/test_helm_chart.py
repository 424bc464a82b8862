"""The Helm chart: lint and template clean, a real install and uninstall on the local cluster.

The install runs the operator pod for real (the node agent runs `kquant operator` as a process
with the pod's own ServiceAccount token), so the chart's RBAC is what the operator gets.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import socket
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from fixtures import cluster_client
from kubernetes import client
from kubernetes.client import exceptions

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kquant"
CRDS = ("quantizedmodels.kquant.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev")

Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def helm(cluster: Any, tmp_path: pathlib.Path) -> Helm:
    """Run the real helm against the local cluster, with its caches in a temporary folder."""
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(cluster.helm), *args], capture_output=True, text=True, env=env, timeout=300, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    return run


def _render(helm: Helm, *values: str) -> list[dict[str, Any]]:
    sets = [arg for value in values for arg in ("--set", value)]
    out = helm("template", "rel", str(CHART), "--namespace", "kq-system", *sets).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


def _rules(role: dict[str, Any]) -> set[tuple[str, str]]:
    return {(group, resource) for r in role["rules"] for group in r["apiGroups"] for resource in r["resources"]}


def test_lint_is_clean(helm: Helm) -> None:
    for values in ([], ["--set", "watchNamespaces={a,b}", "--set", "replicaCount=2"]):
        done = helm("lint", "--strict", str(CHART), *values)
        assert "0 chart(s) failed" in done.stdout
        assert "[ERROR]" not in done.stdout and "[WARNING]" not in done.stdout


def test_template_defaults(helm: Helm) -> None:
    docs = _render(helm)
    assert sorted(d["kind"] for d in docs) == [
        "ClusterKopfPeering", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Role", "RoleBinding",
        "ServiceAccount", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding", "ValidatingAdmissionPolicyBinding",
    ]  # fmt: skip
    # the learned margins (templates/plan-margins.yaml): created empty, the operator may get and patch it only
    margins = _one(docs, "ConfigMap")
    assert margins["metadata"]["name"] == "rel-kquant-margins" and "data" not in margins
    assert _one(docs, "Role")["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                                            "resourceNames": ["rel-kquant-margins"], "verbs": ["get", "patch"]}]
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/kquant-dev/kquant:0.1.0"
    assert container["args"] == ["operator", "--liveness=http://0.0.0.0:8080/healthz", "--peering=kquant"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    rules = _rules(_one(docs, "ClusterRole"))
    assert {("kquant.dev", "quantizedmodels/status"), ("", "nodes"), ("batch", "jobs")} <= rules
    # Only the metadata of a named hub-token Secret (policy.hubTokenLabel): get, never list or watch.
    assert [r["verbs"] for r in _one(docs, "ClusterRole")["rules"] if "secrets" in r["resources"]] == [["get"]]
    verbs = {v for r in _one(docs, "ClusterRole")["rules"] for v in r["verbs"]}
    assert not verbs & {"deletecollection", "update", "escalate", "bind", "*"}
    # delete only what the operator makes per build or server, never the claim that holds the weights
    deletable = {res for r in _one(docs, "ClusterRole")["rules"] if "delete" in r["verbs"] for res in r["resources"]}
    assert deletable == {"jobs", "configmaps", "deployments", "services", "serviceaccounts", "roles", "rolebindings"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert json.loads(env["KQUANT_ALLOWED_ENDPOINTS"]) == ["https://huggingface.co", "https://www.modelscope.cn"]
    assert json.loads(env["KQUANT_ALLOWED_QUANTIZER_IMAGES"]) == ["ghcr.io/kquant-dev/quantizer:0.1.0"]
    assert json.loads(env["KQUANT_ALLOWED_SERVER_IMAGES"]) == ["ghcr.io/kquant-dev/llama-server:0.1.0-cuda"]
    assert env["KQUANT_HUB_TOKEN_LABEL_REQUIRED"] == "true"
    assert env["KQUANT_MARGINS_CONFIGMAP"] == "rel-kquant-margins"
    assert ("", "pods/log") in rules, "a server pod's startup log checks the plan"
    assert not [d for d in docs if d["kind"] == "NetworkPolicy"]


def test_template_policy_and_network_policy(helm: Helm) -> None:
    docs = _render(helm, "networkPolicy.enabled=true", "watchNamespaces={ml}", "policy.hubTokenLabel=false",
                   "policy.allowedServerImages={registry.example.com/llama:*}")
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    models = policies["rel-kquant-models"]["spec"]
    variables = {v["name"]: v["expression"] for v in models["variables"]}
    assert json.loads(variables["serverImages"]) == [
        "ghcr.io/kquant-dev/llama-server:0.1.0-cuda", "registry.example.com/llama:*"]
    guard = policies["rel-kquant-guard"]["spec"]
    assert guard["matchConditions"][0]["expression"] == (
        "request.userInfo.username == 'system:serviceaccount:kq-system:rel-kquant'")
    assert json.loads({v["name"]: v["expression"] for v in guard["variables"]}["protected"]) == [
        "kube-system", "kube-public", "kube-node-lease"]
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policy["metadata"]["namespace"] == "ml"
    assert policy["spec"]["podSelector"] == {"matchLabels": {"kquant.dev/role": "server"}}
    assert policy["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"kquant.dev/client": "true"}}}]
    role = next(d for d in docs if d["kind"] == "Role")
    assert ("", "secrets") not in _rules(role)
    off = _render(helm, "policy.admission=false")
    assert not [d for d in off if d["kind"].startswith("ValidatingAdmissionPolicy")]


def test_template_watch_namespaces_uses_roles(helm: Helm) -> None:
    docs = _render(helm, "watchNamespaces={ml,dev}", "peering.priority=7")
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-operator")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["dev", "ml"]
    assert ("kquant.dev", "quantizedmodels") in _rules(roles[0])
    cluster_rules = _rules(_one(docs, "ClusterRole"))
    assert ("kquant.dev", "quantizedmodels") not in cluster_rules
    assert cluster_rules == {
        ("", "nodes"), ("", "namespaces"), ("apiextensions.k8s.io", "customresourcedefinitions")
    }  # fmt: skip
    peerings = [d for d in docs if d["kind"] == "KopfPeering"]
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["dev", "ml"]
    container = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][2:] == ["--peering=kquant", "--namespace=ml", "--namespace=dev"]
    assert {"name": "KQUANT_PEERING_PRIORITY", "value": "7"} in container["env"]


def test_template_names_fit_in_63_characters(helm: Helm) -> None:
    docs = _render(helm, "fullnameOverride=" + "x" * 80)
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["replicas=2"], "additional properties 'replicas' not allowed"),
        (["peering.enabeld=false"], "additional properties 'enabeld' not allowed"),
        (["logLevel=trace"], "logLevel"),
        (["replicaCount=2", "peering.enabled=false"], "replicaCount > 1 needs peering.enabled"),
        (["metrics.serviceMonitor.enabled=true"], "metrics.serviceMonitor.enabled needs metrics.enabled"),
        (["networkPolicy.enabled=true"], "networkPolicy.enabled needs networkPolicy.namespaces or watchNamespaces"),
        (["policy.allowedEndpoints={ftp://hub.example.com}"], "allowedEndpoints"),
    ],
)
def test_template_refuses_bad_values(helm: Helm, values: list[str], message: str) -> None:
    sets = [arg for value in values for arg in ("--set", value)]
    done = helm("template", "rel", str(CHART), *sets, check=False)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _can(auth: client.AuthorizationV1Api, user: str, verb: str, resource: str, group: str = "",
         namespace: str = "default", subresource: str = "") -> bool:  # fmt: skip
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user,
            groups=["system:serviceaccounts", "system:authenticated"],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, resource=resource, group=group, namespace=namespace, subresource=subresource
            ),
        )
    )
    status = auth.create_subject_access_review(review).status
    return bool(status and status.allowed)


def _exists(read: Callable[[], object]) -> bool:
    try:
        read()
    except exceptions.ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def _pod_ready(core: client.CoreV1Api, namespace: str, selector: str) -> bool:
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    return bool(pods) and all(
        any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or [])) for p in pods if p.status
    )


def _established(ext: client.ApiextensionsV1Api, name: str) -> bool:
    status = ext.read_custom_resource_definition(name).status
    return any(c.type == "Established" and c.status == "True" for c in (status.conditions if status else None) or [])


def _pods_left(core: client.CoreV1Api, namespace: str, selector: str) -> list[str]:
    return [
        f"{p.metadata.name} {p.status.phase if p.status else '?'} deleting={p.metadata.deletion_timestamp}"
        for p in core.list_namespaced_pod(namespace, label_selector=selector).items
        if p.metadata
    ]


def _check_least_privilege(auth: client.AuthorizationV1Api, user: str) -> None:
    assert _can(auth, user, "patch", "quantizedmodels", "kquant.dev", subresource="status")
    assert not _can(auth, user, "patch", "quantizedmodels", "kquant.dev"), "the spec is the user's"
    assert _can(auth, user, "create", "jobs", "batch")
    assert _can(auth, user, "list", "nodes", namespace="")
    assert not _can(auth, user, "list", "secrets") and not _can(auth, user, "watch", "secrets")
    assert _can(auth, user, "delete", "jobs", "batch"), "a superseded build is cancelled"
    assert not _can(auth, user, "delete", "persistentvolumeclaims"), "the weights outlive a spec edit"
    assert not _can(auth, user, "delete", "nodes", namespace="")
    assert not _can(auth, user, "create", "pods", subresource="exec")
    assert _can(auth, user, "get", "pods", subresource="log"), "a server pod's log checks the plan"
    assert not _can(auth, user, "delete", "pods")


def test_install_and_uninstall(cluster: Any, namespace: str, helm: Helm) -> None:
    release = f"kq-{namespace[-6:]}"
    api_client = cluster.api_client()
    ext = client.ApiextensionsV1Api(api_client)
    rbac = client.RbacAuthorizationV1Api(api_client)
    core = client.CoreV1Api(api_client)
    apps = client.AppsV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    name, account = f"{release}-kquant-operator", f"{release}-kquant"
    selector = f"app.kubernetes.io/instance={release}"
    # A cluster-wide peering object named after the release, so parallel installs do not meet.
    helm("install", release, str(CHART), "--namespace", namespace,
         "--set", f"peering.name={release}", "--set", f"healthPort={_free_port()}")  # fmt: skip
    # The chart's admission policies are cluster-wide: a release left behind would refuse every
    # later test's model (a local hub endpoint), so it is uninstalled whatever happens here.
    try:
        for crd in CRDS:
            cluster_client.wait_for(functools.partial(_established, ext, crd), timeout=60, what=f"{crd} Established")
        role = rbac.read_cluster_role(name)
        assert any("quantizedmodels/status" in (r.resources or []) for r in role.rules or [])
        binding = rbac.read_cluster_role_binding(name)
        subjects = [(s.kind, s.name, s.namespace) for s in binding.subjects or []]
        assert subjects == [("ServiceAccount", account, namespace)]
        core.read_namespaced_service_account(account, namespace)
        custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", release)

        # Least privilege, as the API server's authorizer sees the operator's ServiceAccount.
        _check_least_privilege(client.AuthorizationV1Api(api_client), f"system:serviceaccount:{namespace}:{account}")

        # The operator itself: kopf's /healthz answers once it runs, under the chart's RBAC.
        try:
            cluster_client.wait_for(lambda: _pod_ready(core, namespace, selector), timeout=180,
                                    what="operator pod Ready")
        except AssertionError as error:
            raise AssertionError(f"{error}: {_pods_left(core, namespace, selector)}") from None
        deployment = apps.read_namespaced_deployment(name, namespace)
        assert deployment.status and deployment.status.ready_replicas == 1
    finally:
        helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s", "--ignore-not-found")

    assert not _exists(lambda: rbac.read_cluster_role(name))
    assert not _exists(lambda: rbac.read_cluster_role_binding(name))
    assert not _exists(lambda: custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", release))
    assert not _exists(lambda: core.read_namespaced_service_account(account, namespace))
    assert not _exists(lambda: apps.read_namespaced_deployment(name, namespace))
    # Pods go by garbage collection (Deployment -> ReplicaSet -> Pod) and graceful termination.
    try:
        cluster_client.wait_for(
            lambda: not _pods_left(core, namespace, selector), timeout=180, what="operator pods gone")
    except AssertionError as error:
        raise AssertionError(f"{error}: {_pods_left(core, namespace, selector)}") from None
    assert helm("list", "--namespace", namespace, "--all", "-q").stdout.strip() == ""
    # Only the CRDs stay: Helm never deletes what it installed from crds/.
    for crd in CRDS:
        assert _established(ext, crd)
