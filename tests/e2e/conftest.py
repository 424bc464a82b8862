"""Fixtures for end-to-end tests: the CRD, a running operator, and a hub that serves SmolLM2."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
from e2e_helpers import OperatorProcess
from fixtures import cluster_client
from hub_server import FakeHub

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def operator(cluster: cluster_client.Cluster, crd: None,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
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
