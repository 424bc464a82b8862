"""The operator killed (SIGKILL, as an OOM kill or a lost node ends it) in each phase of a build,
and in the rollout, then started again. The model converges to its spec: the variant built and
served, one Job per build, nothing without its owner, no Event posted twice, nothing left after
the model is deleted.

A build's phase is the quantizer's progress line in its ConfigMap; the build pods run pause, so
the test writes that line as the quantizer would at the start of each phase and kills the
operator once status.progress shows it (the operator has read the phase and acted on it).
"""

from __future__ import annotations

import time

import model_checks as mc
import pytest
from e2e_helpers import OperatorProcess, qm_status
from fixtures import cluster_client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
PHASES = ("fetching", "converting", "calibrating", "quantizing", "evaluating", "publishing")


def _kill_and_restart(chart_operator: OperatorProcess) -> float:
    chart_operator.kill()
    chart_operator.start()
    return time.monotonic()


@pytest.mark.parametrize("phase", [*PHASES, "rollout"])
def test_the_operator_killed_in_each_phase_converges(
        cluster: cluster_client.Cluster, namespace: str, chart_operator: OperatorProcess, phase: str) -> None:
    apis = mc.Apis(cluster)
    name = f"killed-{phase[:8]}"
    created = apis.custom.create_namespaced_custom_object(mc.GROUP, mc.VERSION, namespace, mc.PLURAL,
                                                          mc.model(name, variants=("q8",)))
    [job] = cluster_client.wait_for(lambda: mc.jobs(apis, namespace, name), timeout=60, what="the build Job")

    if phase == "rollout":
        mc.finish(apis, namespace, job)
        cluster_client.wait_for(lambda: apis.apps.list_namespaced_deployment(
            namespace, label_selector=mc.selector(name)).items, timeout=60, interval=0.2, what="the server Deployment")
        recovered = _kill_and_restart(chart_operator)
    else:
        line = f"q8 1/1 {phase} 40%"
        mc.set_progress(apis, namespace, job, line)
        cluster_client.wait_for(lambda: phase in (qm_status(cluster, namespace, name).get("progress") or ""),
                                timeout=60, interval=0.2, what=f"status.progress to show {phase}")
        recovered = _kill_and_restart(chart_operator)
        mc.finish(apis, namespace, job)

    status = cluster_client.wait_for(lambda: mc.converged(cluster, namespace, name, built=1), timeout=120,
                                     interval=0.5, what="the model to converge after the restart")
    print(f"\noperator killed while {phase}: converged {time.monotonic() - recovered:.1f}s after its restart")
    assert status["observedGeneration"] == 1
    assert [j.metadata.name for j in mc.jobs(apis, namespace, name)] == [job.metadata.name]
    mc.check_after(apis, namespace, name, created["metadata"]["uid"])
    mc.delete_and_check_nothing_left(apis, namespace, name)
