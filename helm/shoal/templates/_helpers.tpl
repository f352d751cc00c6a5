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

{{/* The namespace of every namespaced object. */}}
{{- define "shoal.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object: commonLabels, then the chart's own (which win; the schema keeps
commonLabels and podLabels off the selector keys).
*/}}
{{- define "shoal.labels" -}}
{{- $own := dict "helm.sh/chart" (printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-") "app.kubernetes.io/version" .Chart.AppVersion "app.kubernetes.io/managed-by" .Release.Service }}
{{- $_ := set $own "app.kubernetes.io/name" (include "shoal.name" .) }}
{{- $_ := set $own "app.kubernetes.io/instance" .Release.Name }}
{{- toYaml (merge $own (deepCopy (default (dict) .Values.commonLabels))) }}
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
{{- $labels := fromYaml (include "shoal.labels" .ctx) }}
{{- toYaml (set $labels "app.kubernetes.io/component" .component) }}
{{- end }}

{{/* Labels of a component's pod template: its labels, then podLabels under them. */}}
{{- define "shoal.podLabels" -}}
{{- $labels := fromYaml (include "shoal.componentLabels" .) }}
{{- toYaml (merge $labels (deepCopy (default (dict) .podLabels))) }}
{{- end }}

{{/*
[registry/]repository:tag, or [registry/]repository@digest when image.digest is set;
global.imageRegistry replaces image.registry.
*/}}
{{- define "shoal.image" -}}
{{- $image := .Values.image }}
{{- $registry := default $image.registry (dig "imageRegistry" "" (default (dict) .Values.global)) }}
{{- $repository := $image.repository }}
{{- if $registry }}
{{- $repository = printf "%s/%s" (trimSuffix "/" $registry) $repository }}
{{- end }}
{{- if $image.digest }}
{{- printf "%s@%s" $repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "shoal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "shoal.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The pod spec fields every component shares: identity and pull secrets. */}}
{{- define "shoal.podIdentity" -}}
serviceAccountName: {{ include "shoal.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "shoal.joinTokenSecret" -}}
{{- default (printf "%s-join-token" (include "shoal.fullname" .)) .Values.joinToken.existingSecret }}
{{- end }}

{{- define "shoal.joinTokenKey" -}}
{{- ternary (default "join-token" .Values.joinToken.existingSecretKey) "join-token" (not (empty .Values.joinToken.existingSecret)) }}
{{- end }}

{{/*
The token in the chart's own Secret in the cluster, read with `lookup`; empty on a first
install and whenever the render has no cluster access (helm template, Argo CD).
*/}}
{{- define "shoal.joinTokenInCluster" -}}
{{- $existing := lookup "v1" "Secret" (include "shoal.namespace" .) (include "shoal.joinTokenSecret" .) }}
{{- if and $existing $existing.data (index $existing.data "join-token") }}
{{- index $existing.data "join-token" | b64dec }}
{{- end }}
{{- end }}

{{/* The env var both components read the token from. */}}
{{- define "shoal.joinTokenEnv" -}}
- name: SHOAL_JOIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "shoal.joinTokenSecret" . }}
      key: {{ include "shoal.joinTokenKey" . }}
{{- end }}

{{/*
A probe from its values: the Kubernetes fields as given, and the chart's grpc.health.v1 check
unless the values name a handler of their own. Call with (dict "probe" VALUES "grpc" DICT).
*/}}
{{- define "shoal.probe" -}}
{{- $probe := omit .probe "enabled" }}
{{- if not (or (hasKey $probe "exec") (hasKey $probe "httpGet") (hasKey $probe "tcpSocket") (hasKey $probe "grpc")) }}
{{- $_ := set $probe "grpc" .grpc }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{- define "shoal.coordinatorAddress" -}}
{{- if .Values.agent.coordinatorAddress }}
{{- .Values.agent.coordinatorAddress }}
{{- else }}
{{- $scheme := ternary "http" "https" (eq (toString (dig "insecure" false .Values.coordinator.config)) "true") }}
{{- printf "%s://%s-coordinator.%s.svc:%d" $scheme (include "shoal.fullname" .) (include "shoal.namespace" .) (int .Values.coordinator.ports.grpc) }}
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

{{/* A TOML array of strings (JSON's syntax is TOML's for them), or of tables of strings
(inline tables, e.g. api_tokens); fails on anything else. */}}
{{- define "shoal.tomlList" -}}
{{- $items := list }}
{{- range .list }}
{{- if kindIs "string" . }}
{{- $items = append $items (toJson .) }}
{{- else if kindIs "map" . }}
{{- $pairs := list }}
{{- range $k, $v := . }}
{{- if not (kindIs "string" $v) }}
{{- fail (printf "config key %s.%s: only strings can be written in a list's tables" $.key $k) }}
{{- end }}
{{- $pairs = append $pairs (printf "%s = %s" (toJson (toString $k)) (toJson $v)) }}
{{- end }}
{{- $items = append $items (printf "{ %s }" (join ", " $pairs)) }}
{{- else }}
{{- fail (printf "config key %s: only lists of strings or of tables of strings can be written as Shoal configuration" $.key) }}
{{- end }}
{{- end }}
{{- printf "[%s]" (join ", " $items) }}
{{- end }}

{{/* Fails when a user-given config map sets a key the chart derives itself. */}}
{{- define "shoal.rejectManagedKeys" -}}
{{- range $key, $source := .managed }}
{{- if hasKey $.config $key }}
{{- fail (printf "%s.config.%s is set by the chart from %s; set that instead" $.component $key $source) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The uid:gid the agent runs as, for the cache's chown: the container's security context, then
the pod's, then the image's user (65532).
*/}}
{{- define "shoal.agentOwner" -}}
{{- $pod := default (dict) .Values.agent.podSecurityContext }}
{{- $c := default (dict) .Values.agent.containerSecurityContext }}
{{- $uid := 65532 }}
{{- $gid := 65532 }}
{{- range (list $pod $c) }}
{{- if not (kindIs "invalid" .runAsUser) }}{{ $uid = .runAsUser }}{{ end }}
{{- if not (kindIs "invalid" .runAsGroup) }}{{ $gid = .runAsGroup }}{{ end }}
{{- end }}
{{- printf "%d:%d" (int64 $uid) (int64 $gid) }}
{{- end }}
