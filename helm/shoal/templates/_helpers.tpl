{{/* Names and labels shared by every object of the release. */}}

{{- define "shoal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "shoal.fullname" -}}
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

{{- define "shoal.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "shoal.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "shoal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shoal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "agent"). */}}
{{- define "shoal.componentSelector" -}}
{{ include "shoal.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "shoal.componentLabels" -}}
{{ include "shoal.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "shoal.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "shoal.joinTokenSecret" -}}
{{- default (printf "%s-join-token" (include "shoal.fullname" .)) .Values.joinToken.existingSecret }}
{{- end }}

{{- define "shoal.coordinatorAddress" -}}
{{- if .Values.agent.coordinatorAddress }}
{{- .Values.agent.coordinatorAddress }}
{{- else }}
{{- printf "http://%s-coordinator.%s.svc:%d" (include "shoal.fullname" .) .Release.Namespace (int .Values.coordinator.ports.grpc) }}
{{- end }}
{{- end }}

{{/*
Bytes of a Kubernetes quantity ("100Gi", "500G", "1073741824") or a number of bytes.
*/}}
{{- define "shoal.bytes" -}}
{{- $v := . }}
{{- if or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) }}
{{- int64 $v }}
{{- else }}
{{- $s := toString $v }}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 }}
{{- $number := regexFind "^[0-9]+" $s }}
{{- $unit := trimPrefix $number $s }}
{{- if or (not $number) (and $unit (not (hasKey $units $unit))) }}
{{- fail (printf "%q is not a whole quantity of bytes (e.g. 100Gi, 500G, 1073741824)" $s) }}
{{- end }}
{{- mul (int64 $number) (int64 (default 1 (get $units $unit))) }}
{{- end }}
{{- end }}

{{/*
A flat dict as TOML, keys sorted. Helm reads every YAML number as a float, so numbers are
written as integers (every numeric key of the Shoal configuration is an integer); strings
are JSON-quoted (a valid TOML basic string); a map becomes an inline table of strings;
null means "leave the binary's default".
*/}}
{{- define "shoal.toml" -}}
{{- range $key, $value := . }}
{{- if kindIs "invalid" $value }}
{{- else if kindIs "map" $value }}
{{- $pairs := list }}
{{- range $k, $v := $value }}
{{- if kindIs "slice" $v }}
{{- $pairs = append $pairs (printf "%s = %s" (toJson (toString $k)) (include "shoal.tomlList" (dict "key" (printf "%s.%s" $key $k) "list" $v))) }}
{{- else }}
{{- $pairs = append $pairs (printf "%s = %s" (toJson (toString $k)) (toJson (toString $v))) }}
{{- end }}
{{- end }}
{{ $key }} = { {{ join ", " $pairs }} }
{{- else if kindIs "slice" $value }}
{{ $key }} = {{ include "shoal.tomlList" (dict "key" $key "list" $value) }}
{{- else if kindIs "bool" $value }}
{{ $key }} = {{ $value }}
{{- else if or (kindIs "float64" $value) (kindIs "int" $value) (kindIs "int64" $value) }}
{{- if ne (float64 $value) (floor $value) }}
{{- fail (printf "config key %s: %v is not a whole number" $key $value) }}
{{- end }}
{{ $key }} = {{ int64 $value }}
{{- else if kindIs "string" $value }}
{{ $key }} = {{ toJson $value }}
{{- else }}
{{- fail (printf "config key %s: a %s cannot be written as Shoal configuration" $key (kindOf $value)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* A TOML array of strings (JSON's syntax is TOML's for them); fails on anything else. */}}
{{- define "shoal.tomlList" -}}
{{- range .list }}
{{- if not (kindIs "string" .) }}
{{- fail (printf "config key %s: only lists of strings can be written as Shoal configuration" $.key) }}
{{- end }}
{{- end }}
{{- toJson .list }}
{{- end }}

{{/* Fails when a user-given config map sets a key the chart derives itself. */}}
{{- define "shoal.rejectManagedKeys" -}}
{{- range $key, $source := .managed }}
{{- if hasKey $.config $key }}
{{- fail (printf "%s.config.%s is set by the chart from %s; set that instead" $.component $key $source) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "shoal.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "shoal.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: [ALL]
{{- end }}
