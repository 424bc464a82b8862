"""Fixtures shared by every test tier.

``cluster`` starts one real local control plane (hack/localcluster) per pytest run, in a folder
of its own, and stops it at the end. ``namespace`` gives each test a fresh namespace on it.
Unit tests never touch these fixtures, so ``pytest tests/unit`` starts nothing.
"""

from __future__ import annotations

import os
import pathlib
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import yaml
from fixtures import cluster_client
from hub_server import FakeHub
from kubernetes import client
from localcluster import cluster as localcluster
from localcluster import controlplane


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster_client.Cluster]:
    bin_dir = localcluster.build_binaries()
    root = pathlib.Path(os.environ.get("KQUANT_TEST_CLUSTER_ROOT") or tmp_path_factory.mktemp("cluster"))
    paths = controlplane.ClusterPaths(root)
    localcluster.up(paths, bin_dir)
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(paths.kubeconfig)
    try:
        yield cluster_client.Cluster(paths, bin_dir)
    finally:
        localcluster.down(paths)
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous


@pytest.fixture
def namespace(cluster: cluster_client.Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={"kquant.dev/test": "true"})))
    # Pods are refused until the service-account controller has made "default", as on any cluster.
    cluster_client.wait_for(
        lambda: core.list_namespaced_service_account(name, field_selector="metadata.name=default").items,
        what=f"ServiceAccount {name}/default")
    try:
        yield name
    finally:
        core.delete_namespace(name)


CRD_FILE = pathlib.Path(__file__).resolve().parents[1] / "crds/kquant.dev_quantizedmodels.yaml"


@pytest.fixture(scope="session")
def crd(cluster: cluster_client.Cluster) -> None:
    """Install the generated QuantizedModel CRD once and wait until the API server serves it."""
    api_client = cluster.api_client()
    body = yaml.safe_load(CRD_FILE.read_text())
    try:
        client.ApiextensionsV1Api(api_client).create_custom_resource_definition(body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    objects = client.CustomObjectsApi(api_client)

    def served() -> bool:
        try:
            objects.list_cluster_custom_object("kquant.dev", "v1alpha1", "quantizedmodels", limit=1)
        except client.ApiException:
            return False
        return True

    cluster_client.wait_for(served, timeout=60, what="quantizedmodels to be served")


SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2_hub() -> Iterator[FakeHub]:
    """A local hub serving the SmolLM2 fixture model, for builds that run the real quantizer."""
    from fixtures import smollm2

    with FakeHub() as hub:
        hub.add_repo(SMOLLM2_REPO, smollm2.hf_dir())
        yield hub


STRAY_THREAD_GRACE = 10.0
"""Seconds a test's non-daemon thread gets to end after the last test before the run exits."""


def pytest_unconfigure(config: pytest.Config) -> None:
    """A non-daemon thread a test left running would hold the interpreter open after pytest's
    summary line, until CI's deadline: name it and exit with pytest's own status instead."""
    deadline = time.monotonic() + STRAY_THREAD_GRACE
    while (stray := _stray_threads()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not stray:
        return
    names = ", ".join(t.name for t in stray)
    print(f"\nnon-daemon threads still running after the tests: {names}; exiting without waiting",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(int(getattr(config, "_kquant_exitstatus", 1)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._kquant_exitstatus = exitstatus  # type: ignore[attr-defined]


def _stray_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.is_alive() and not t.daemon and t is not threading.main_thread()]
