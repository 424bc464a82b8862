"""The QuantizedModel API: pydantic models that are the only source of the CRD.

Everything else (the CRD YAML under ``crds/`` and ``charts/kquant/crds/``, the operator's parsing of
watched objects, the status it writes) derives from :mod:`kquant.operator.api.v1alpha1`. This
package holds no I/O and imports neither kopf nor a Kubernetes client.
"""
