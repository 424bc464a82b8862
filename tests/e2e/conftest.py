"""Fixtures for end-to-end tests: a running operator under the chart's rights (the hub that serves
SmolLM2 is in tests/conftest.py, shared with tests/faults)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
from e2e_helpers import OperatorProcess, chart_operator_kubeconfig, log_trouble
from fixtures import cluster_client

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster: cluster_client.Cluster, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The chart's ServiceAccount and RBAC, and a kubeconfig with its token: every e2e operator
    runs with the rights an install gives it, never the admin's."""
    return chart_operator_kubeconfig(cluster, tmp_path_factory.mktemp("operator-sa") / "kubeconfig")


@pytest.fixture(scope="module")
def operator(cluster: cluster_client.Cluster, crd: None, operator_kubeconfig: pathlib.Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    # One per test module: a running operator would also act on the QuantizedModels that later
    # tests (the CLI's, the GitOps kit's) create to check status rendering by hand.
    process = OperatorProcess(operator_kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()
    # Under the chart's rights, a call the chart does not allow shows here (kopf's finalizer
    # PATCHes did, 41 times in three minutes, before the resync left kopf's timer).
    trouble = log_trouble(process.log)
    assert not trouble, "the operator's log shows refused calls or tracebacks:\n" + "\n".join(trouble[:20])
