{{/* The release's full name, the stem of every object's name. */}}
{{- define "kubeforge.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubeforge.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubeforge
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selects the operator's pods (never the trainer pods, which are `managed-by: kubeforge`). */}}
{{- define "kubeforge.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubeforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubeforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "kubeforge.image" -}}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* The same job permissions whether granted cluster-wide or per namespace (tests/support/rbac.py
     lists what each rule is for). */}}
{{- define "kubeforge.jobRules" -}}
- apiGroups: [kubeforge.io]
  resources: [pretrainjobs, finetunejobs, sweepjobs]
  verbs: [list, watch, patch]
- apiGroups: [kubeforge.io]
  resources: [pretrainjobs, finetunejobs]
  verbs: [create, delete]
- apiGroups: [kubeforge.io]
  resources: [pretrainjobs, finetunejobs, sweepjobs]
  verbs: [get]
- apiGroups: [kubeforge.io]
  resources: [pretrainjobs/status, finetunejobs/status, sweepjobs/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, create, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [create]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [scheduling.volcano.sh, scheduling.x-k8s.io]
  resources: [podgroups]
  verbs: [create]
{{- end -}}
