{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "kquant.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name for objects: release-chart, or the release name when it already contains the chart
name. Truncated to 52 characters, leaving room for the suffixes the templates append
("-operator", "-metrics") within the 63 of a DNS label.
*/}}
{{- define "kquant.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "kquant.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pods; never change them in an upgrade. */}}
{{- define "kquant.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kquant.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels on every object of the chart. */}}
{{- define "kquant.labels" -}}
helm.sh/chart: {{ include "kquant.chart" . }}
{{ include "kquant.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kquant
{{- end }}

{{/* Name of the operator's ServiceAccount. */}}
{{- define "kquant.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kquant.fullname" .) .Values.serviceAccount.name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference. */}}
{{- define "kquant.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Arguments of `kquant operator` (kquant.operator.cli). Without --peering it runs standalone;
without --namespace it serves all namespaces.
*/}}
{{- define "kquant.operatorArgs" -}}
- operator
- --liveness=http://0.0.0.0:{{ .Values.healthPort }}/healthz
{{- if .Values.peering.enabled }}
- --peering={{ .Values.peering.name }}
{{- end }}
{{- range .Values.watchNamespaces }}
- --namespace={{ . }}
{{- end }}
{{- if eq .Values.logLevel "debug" }}
- --verbose
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Fail early on combinations that cannot work. */}}
{{- define "kquant.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.peering.enabled) }}
{{- fail "replicaCount > 1 needs peering.enabled: standalone replicas would handle the same QuantizedModels at once" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not (or .Values.networkPolicy.namespaces .Values.watchNamespaces)) }}
{{- fail "networkPolicy.enabled needs networkPolicy.namespaces or watchNamespaces: the chart must know where the model servers run" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- end }}

{{/*
RBAC rules on namespaced resources: in the ClusterRole when watching all namespaces, else in a Role
per namespace. Only the verbs the operator's code uses (docs/security.md lists each call). get:
on a name clash (409) and before an apply or a delete, the operator reads the object to check that
the model owns it (ownerReference uid); it never uses or changes one it does not own. delete: the
objects of a build whose digest left the spec, superseded builds, and the server once spec.serving
is removed (their pods go by garbage collection).
*/}}
{{- define "kquant.namespacedRules" -}}
# The API itself: read and watch QuantizedModels. The operator never writes their spec or metadata
# (no finalizer, no kopf annotations: see docs/architecture.md), only their status.
- apiGroups: [kquant.dev]
  resources: [quantizedmodels]
  verbs: [get, list, watch]
# Write observed state through the status subresource only.
- apiGroups: [kquant.dev]
  resources: [quantizedmodels/status]
  verbs: [get, patch]
# Events on QuantizedModels (the operator posts its own; kopf's posting is off).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Quantizer Jobs, one per variant build (watched for their outcome; cancelled when superseded).
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
# The result ConfigMap per build, which the quantizer fills with progress and its report. get and
# patch are not used by the operator itself: it must hold them to grant them to the build's Role
# (RBAC refuses a Role that grants more than its creator holds, unless the creator may escalate).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch, delete]
# llama-server Deployment and Service of the served variant, created, then server-side applied
# (patch), removed with spec.serving.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, patch, delete]
# The model storage claim.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch, create]
# Per-build ServiceAccount, Role and RoleBinding: the quantizer may patch only its own result
# ConfigMap (the Role names it in resourceNames). Never changed; deleted with a superseded build.
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create, delete]
# Quantizer and server pods: read their state, why they wait and exit reasons (no exec).
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# A server pod's startup log, read once when it turns Ready: what llama.cpp allocated per device,
# checked against the plan (status.serving.planCheck, the PlanVerified condition).
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
{{- if .Values.policy.hubTokenLabel }}
# policy.hubTokenLabel: whether the Secret named in tokenSecretRef carries kquant.dev/hub-token.
# The operator asks for its metadata only (PartialObjectMetadata), never lists or watches Secrets.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}
{{- if .Values.peering.enabled }}
# kopf peering when serving a list of namespaces: one KopfPeering per namespace.
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}

{{/* Images the operator may run: the chart's own plus the allowed patterns, as a JSON list. */}}
{{- define "kquant.quantizerImages" -}}
{{- prepend .Values.policy.allowedQuantizerImages .Values.quantizerImage | uniq | toJson }}
{{- end }}
{{- define "kquant.serverImages" -}}
{{- prepend .Values.policy.allowedServerImages .Values.serverImage | uniq | toJson }}
{{- end }}
