"""How a failed pass reads in the operator's log: the API server's words, on one line."""

from __future__ import annotations

from kquant.operator import kube
from kubernetes import client


def test_an_api_error_is_its_status_and_message_without_response_headers() -> None:
    error = client.ApiException(status=422, reason="Unprocessable Entity")
    error.body = '{"kind": "Status", "message": "Job.batch \\"m-q8\\" is invalid: spec.template: Required value"}'
    error.headers = {"Audit-Id": "abc"}
    assert kube.describe_error(error) == (
        'API server said 422 Unprocessable Entity: Job.batch "m-q8" is invalid: spec.template: Required value')


def test_other_errors_keep_their_type() -> None:
    assert kube.describe_error(TimeoutError("read timed out")) == "TimeoutError: read timed out"
    assert kube.describe_error(client.ApiException(status=500, reason="Internal Server Error")) == (
        "API server said 500 Internal Server Error")
