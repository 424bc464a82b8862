"""Fixtures for the fault-injection suite: the operator under the chart's ServiceAccount, and
control-plane processes that can be killed and started again."""

from __future__ import annotations

import pathlib

import pytest
from e2e_helpers import chart_operator_kubeconfig
from fixtures import cluster_client


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster: cluster_client.Cluster, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return chart_operator_kubeconfig(cluster, tmp_path_factory.mktemp("faults-operator-sa") / "kubeconfig")
