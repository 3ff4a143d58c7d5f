{{/*
Names, labels, the operator's RBAC rules and the checks on values that the JSON schema cannot express.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "weightsync-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-<chart>` (or the release name alone when it already contains the chart name), or fullnameOverride. */}}
{{- define "weightsync-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "weightsync-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator's pods; never change them (a Deployment's selector is immutable). */}}
{{- define "weightsync-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weightsync-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels on every object of the chart. */}}
{{- define "weightsync-operator.labels" -}}
helm.sh/chart: {{ include "weightsync-operator.chart" . }}
{{ include "weightsync-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: weightsync
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "weightsync-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "weightsync-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image, by digest when one is given. */}}
{{- define "weightsync-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The name of kopf's peering object: fixed, the operator uses it (`--peering weightsync-operator`). */}}
{{- define "weightsync-operator.peeringName" -}}
weightsync-operator
{{- end }}

{{/*
RBAC. These are exactly the rules of the operator's code: `REQUIRED_RULES` and `PEERING_RULES` in
operator/rbac.py (less `get` on peerings, which the audit log shows kopf never uses). tests/unit/test_chart_rbac.py fails when they differ, and
tests/integration/test_chart_install.py fails on any rule here that the operator did not use during a full
reconcile (read from the API server's audit log). kopf's CRD and namespace scanning and its own event
posting are off in the operator, so nothing cluster-scoped is needed unless peering is cluster-wide.

"weightsync-operator.namespacedRules": on objects in the watched namespaces. Granted by a ClusterRole when
all namespaces are watched, by a Role in each namespace otherwise.
*/}}
{{- define "weightsync-operator.namespacedRules" -}}
# WeightSync objects: kopf watches them (list, watch); a reconcile reads one (get).
- apiGroups: ["weightsync.dev"]
  resources: ["weightsyncs"]
  verbs: ["get", "list", "watch"]
# Their status: phase, conditions, members, epoch (a merge patch with a resourceVersion precondition).
- apiGroups: ["weightsync.dev"]
  resources: ["weightsyncs/status"]
  verbs: ["patch"]
# Member pods: watched, created, annotated with the epoch (patch), deleted when failed or scaled away.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The group's headless Service: watched for drift, created, repaired.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The group's token Secret: created; watched (list, watch) by its labels as metadata only, so the operator
# never receives a Secret's data (RBAC cannot narrow list to labels; the create-pods right can mount any
# Secret of the namespace anyway, so this grants nothing more); read by name when the watch lacks it.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create"]
# An Event for every decision.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# The trainer's report Role and RoleBinding (get, patch on its own pod only): watched, created, repaired.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The group's NetworkPolicy (ingress only from the group's pods and the operator): watched, created, repaired.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch"]
{{- if and .Values.peering.enabled .Values.watchNamespaces }}
# kopf peering in each watched namespace: kopf watches the KopfPeering and patches its own entry (it never
# reads one by name: no get).
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end }}

{{/*
"weightsync-operator.clusterRules": on cluster-scoped objects, granted by a ClusterRole; empty (and no
ClusterRole rendered for them) unless peering is cluster-wide.
*/}}
{{- define "weightsync-operator.clusterRules" -}}
{{- if and .Values.peering.enabled (not .Values.watchNamespaces) }}
# kopf peering, cluster-wide: kopf watches the ClusterKopfPeering and patches its own entry (it never reads
# one by name: no get).
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end }}

{{/* Checks across values that values.schema.json cannot state clearly; each fails with the fix. */}}
{{- define "weightsync-operator.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.peering.enabled) }}
{{- fail (printf "replicas=%d needs peering.enabled=true: without kopf peering every replica would act on every WeightSync" (int .Values.replicas)) }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled=true needs metrics.service.enabled=true: the ServiceMonitor selects the metrics Service" }}
{{- end }}
{{- end }}
