"""The operator's connections to kube-apiserver cut mid-build, its watches among them: reset
(both ends closed at once) or blackholed (left open, every byte dropped, so only a timeout tells
the operator its watch is dead). The build's report lands while the watches are cut; the model
converges anyway, with one Job per build and no Event posted twice.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator

import model_checks as mc
import pytest
import tcp_proxy
from e2e_helpers import OperatorProcess
from fixtures import cluster_client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
CONVERGE_SECONDS = 150
"""A blackholed watch is found by kopf's inactivity timeout (70 s without an event or a bookmark)."""


@pytest.fixture
def proxied_operator(cluster: cluster_client.Cluster, crd: None, operator_kubeconfig: pathlib.Path,
                     tmp_path: pathlib.Path) -> Iterator[tuple[OperatorProcess, tcp_proxy.Proxy]]:
    proxy = tcp_proxy.Proxy(tcp_proxy.target_of(operator_kubeconfig))
    # --verbose: kopf's debug lines say when a watch found its stream dead and reconnected.
    process = OperatorProcess(proxy.kubeconfig(operator_kubeconfig, tmp_path / "kubeconfig"),
                              tmp_path / "operator.log", args=("--verbose",),
                              env={"KQUANT_RESYNC_SECONDS": mc.RESYNC_SECONDS})
    process.start()
    try:
        yield process, proxy
    finally:
        process.stop()
        proxy.close()


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
def test_watches_cut_mid_build_and_the_model_converges(
        cluster: cluster_client.Cluster, namespace: str,
        proxied_operator: tuple[OperatorProcess, tcp_proxy.Proxy], mode: str) -> None:
    _, proxy = proxied_operator
    apis = mc.Apis(cluster)
    name = f"cut-{mode}"
    created = apis.custom.create_namespaced_custom_object(mc.GROUP, mc.VERSION, namespace, mc.PLURAL,
                                                          mc.model(name, variants=("q8",)))
    [job] = cluster_client.wait_for(lambda: mc.jobs(apis, namespace, name), timeout=60, what="the build Job")
    time.sleep(2)  # the pass that made the Job has finished its writes; only idle watches are open
    cut = proxy.cut(mode)
    assert cut > 0, "the operator had no connection open to cut"
    mc.finish(apis, namespace, job)
    started = time.monotonic()

    status = cluster_client.wait_for(lambda: mc.converged(cluster, namespace, name, built=1),
                                     timeout=CONVERGE_SECONDS, interval=0.5,
                                     what=f"the model to converge after its watches were cut ({mode})")
    print(f"\n{cut} connections cut ({mode}): converged {time.monotonic() - started:.1f}s later")
    assert status["observedGeneration"] == 1
    assert [j.metadata.name for j in mc.jobs(apis, namespace, name)] == [job.metadata.name]
    mc.check_after(apis, namespace, name, created["metadata"]["uid"])
    mc.delete_and_check_nothing_left(apis, namespace, name)
