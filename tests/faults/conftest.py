"""Fixtures for the fault-injection suite: the operator under the chart's ServiceAccount, and
control-plane processes that can be killed and started again."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
from e2e_helpers import OperatorProcess, chart_operator_kubeconfig
from fixtures import cluster_client
from model_checks import RESYNC_SECONDS


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster: cluster_client.Cluster, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return chart_operator_kubeconfig(cluster, tmp_path_factory.mktemp("faults-operator-sa") / "kubeconfig")


@pytest.fixture
def chart_operator(cluster: cluster_client.Cluster, crd: None, operator_kubeconfig: pathlib.Path,
                   tmp_path: pathlib.Path) -> Iterator[OperatorProcess]:
    """``kquant operator`` in a process of its own under the chart's ServiceAccount; a test may
    kill it (SIGKILL) and start it again."""
    process = OperatorProcess(operator_kubeconfig, tmp_path / "operator.log",
                              env={"KQUANT_RESYNC_SECONDS": RESYNC_SECONDS})
    process.start()
    try:
        yield process
    finally:
        process.stop()
