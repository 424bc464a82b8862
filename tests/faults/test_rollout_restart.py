"""kube-apiserver killed (SIGKILL) and started again during a rollout: once right after the first
server Deployment is made, and once right after a promotion (spec.serving.variant edited) while
the operator rolls the new variant out. The model converges each time: the variant the spec names
served by exactly one Deployment and one Service, no duplicate Job, nothing without its owner, no
Event posted twice, and nothing left once the model is deleted.
"""

from __future__ import annotations

import time

import control_plane
import model_checks as mc
import pytest
from e2e_helpers import OperatorProcess, qm_status
from fixtures import cluster_client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
NAME = "rollout"
DOWN_SECONDS = 5


def _restart_api_server(cluster: cluster_client.Cluster) -> float:
    argv = control_plane.kill(cluster, "kube-apiserver")
    time.sleep(DOWN_SECONDS)
    control_plane.start(cluster, "kube-apiserver", argv)
    control_plane.api_ready(cluster)
    return time.monotonic()


def _served(cluster: cluster_client.Cluster, namespace: str, variant: str) -> dict[str, object] | None:
    status = qm_status(cluster, namespace, NAME)
    built = [v for v in status.get("variants") or [] if v.get("gatePassed")]
    return status if (status.get("serving") or {}).get("variant") == variant and len(built) == 2 else None


def test_the_api_server_dies_during_a_rollout_and_a_promotion(
        cluster: cluster_client.Cluster, namespace: str, chart_operator: OperatorProcess) -> None:
    apis = mc.Apis(cluster)
    created = apis.custom.create_namespaced_custom_object(mc.GROUP, mc.VERSION, namespace, mc.PLURAL, mc.model(NAME))
    uid = created["metadata"]["uid"]
    finished: set[str] = set()
    for _ in range(2):  # the builds run one at a time: finish each as the quantizer would
        job = cluster_client.wait_for(
            lambda: [j for j in mc.jobs(apis, namespace, NAME) if j.metadata.name not in finished],
            timeout=120, interval=0.5, what="the next build Job")[0]
        mc.finish(apis, namespace, job)
        finished.add(job.metadata.name)

    # 1. The first rollout: the Deployment exists, its pod is not Ready yet.
    cluster_client.wait_for(lambda: apis.apps.list_namespaced_deployment(namespace, label_selector=mc.selector(NAME))
                            .items, timeout=120, interval=0.2, what="the server Deployment")
    recovered = _restart_api_server(cluster)
    apis = mc.Apis(cluster)  # the old pool's sockets died with the server
    cluster_client.wait_for(lambda: _served(cluster, namespace, "q8"), timeout=180, interval=0.5,
                            what="q8 served after the restart")
    print(f"\nkube-apiserver killed in the rollout: q8 served {time.monotonic() - recovered:.1f}s after recovery")

    # 2. A promotion, and the API server killed while the operator rolls it out.
    apis.custom.patch_namespaced_custom_object(mc.GROUP, mc.VERSION, namespace, mc.PLURAL, NAME,
                                               {"spec": {"serving": {"variant": "q4"}}})
    cluster_client.wait_for(lambda: (qm_status(cluster, namespace, NAME).get("observedGeneration") or 0) >= 2,
                            timeout=60, interval=0.2, what="the operator to act on the promotion")
    recovered = _restart_api_server(cluster)
    apis = mc.Apis(cluster)
    status = cluster_client.wait_for(lambda: _served(cluster, namespace, "q4"), timeout=180, interval=0.5,
                                     what="q4 served after the restart")
    print(f"kube-apiserver killed in the promotion: q4 served {time.monotonic() - recovered:.1f}s after recovery")

    assert status["observedGeneration"] == 2
    assert len(apis.apps.list_namespaced_deployment(namespace, label_selector=mc.selector(NAME)).items) == 1
    assert len(apis.core.list_namespaced_service(namespace, label_selector=mc.selector(NAME)).items) == 1
    assert len(mc.jobs(apis, namespace, NAME)) == 2, "a build ran twice"
    mc.check_after(apis, namespace, NAME, uid)
    # After an API server restart the garbage collector takes up to 86 s (bench/README.md).
    mc.delete_and_check_nothing_left(apis, namespace, NAME, timeout=180)
