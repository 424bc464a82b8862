"""Fixtures for end-to-end tests: the CRD, a running operator, and a hub that serves SmolLM2."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
import yaml
from e2e_helpers import OperatorProcess
from hub_server import FakeHub
from kube import Cluster, wait_for
from kubernetes import client

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> None:
    """Install the generated CRD and wait until the API server serves it."""
    api = cluster.api_client()
    ext = client.ApiextensionsV1Api(api)
    body = yaml.safe_load((REPO / "crds/kquant.dev_quantizedmodels.yaml").read_text())
    try:
        ext.create_custom_resource_definition(body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise

    def established() -> bool:
        crd = ext.read_custom_resource_definition(body["metadata"]["name"])
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait_for(established, what="the QuantizedModel CRD to be Established")


@pytest.fixture(scope="module")
def operator(cluster: Cluster, crd: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    # One per test module: a running operator would also act on the QuantizedModels that later
    # tests (the CLI's, the GitOps kit's) create to check status rendering by hand.
    process = OperatorProcess(cluster.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def smollm2_hub() -> Iterator[FakeHub]:
    from fixtures import smollm2

    with FakeHub() as hub:
        hub.add_repo(SMOLLM2_REPO, smollm2.hf_dir())
        yield hub
