{{/*
Names, labels and the flowship configs of the chart. The configs are built as dictionaries and
printed with toYaml, so a value can never break the YAML around it.
*/}}

{{- define "flowship.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flowship.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "flowship.agentName" -}}
{{- printf "%s-agent" (include "flowship.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flowship.exportName" -}}
{{- printf "%s-export" (include "flowship.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flowship.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Selector labels: dict "root" $ "component" "agent"|"export" */}}
{{- define "flowship.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flowship.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of every object: dict "root" $ "component" NAME */}}
{{- define "flowship.labels" -}}
{{ include "flowship.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "flowship.agentServiceAccount" -}}
{{- default (include "flowship.agentName" .) .Values.agent.serviceAccount.name -}}
{{- end -}}

{{- define "flowship.exportServiceAccount" -}}
{{- default (include "flowship.exportName" .) .Values.exporter.serviceAccount.name -}}
{{- end -}}

{{/* Ports Cilium listens on with hostNetwork: Hubble 4244, Relay 4245, metrics 9962-9965. */}}
{{- define "flowship.checkPort" -}}
{{- $port := int .port -}}
{{- if or (eq $port 4244) (eq $port 4245) (and (ge $port 9962) (le $port 9965)) -}}
{{- fail (printf "%s: port %d is Cilium's (4244 Hubble, 4245 Hubble Relay, 9962-9965 metrics) and collides with it on hostNetwork; the chart's defaults are 9966 (agent) and 9967 (exporter)" .key $port) -}}
{{- end -}}
{{- end -}}

{{/*
The sinks' flowship keys that hold credentials: set only through `secrets` (a secretKeyRef), never
written into values or a ConfigMap.
*/}}
{{- define "flowship.secretKeys" -}}
username password bearer_token api_key sasl_username sasl_password ssl_key_password
{{- end -}}

{{/* The environment variable carrying one secret: dict "component" SINK "key" KEY */}}
{{- define "flowship.secretEnvName" -}}
{{- regexReplaceAll "[^A-Z0-9_]" (printf "FLOWSHIP_%s_%s" .component .key | upper) "_" -}}
{{- end -}}

{{/*
Adds the secret references of `secrets` (key -> {name, key}) to the component dict `into` as
`KEY: env:VARIABLE`. Args: dict "into" DICT "secrets" MAP "component" NAME "path" VALUES-PATH
*/}}
{{- define "flowship.addSecretRefs" -}}
{{- $allowed := splitList " " (include "flowship.secretKeys" .) -}}
{{- range $key, $ref := .secrets -}}
{{- if not (has $key $allowed) -}}
{{- fail (printf "%s.secrets.%s: not a credential key of flowship (one of: %s)" $.path $key (join ", " $allowed)) -}}
{{- end -}}
{{- if not (and (kindIs "map" $ref) $ref.name $ref.key) -}}
{{- fail (printf "%s.secrets.%s: expected {name: SECRET, key: KEY} naming a Kubernetes Secret" $.path $key) -}}
{{- end -}}
{{- $_ := set $.into $key (printf "env:%s" (include "flowship.secretEnvName" (dict "component" $.component "key" $key))) -}}
{{- end -}}
{{- end -}}

{{/*
Copies `settings` into the component dict `into`, refusing keys the chart sets itself and credentials.
Args: dict "into" DICT "settings" MAP "path" VALUES-PATH
*/}}
{{- define "flowship.addSettings" -}}
{{- $secretKeys := splitList " " (include "flowship.secretKeys" .) -}}
{{- range $key, $value := .settings -}}
{{- if has $key $secretKeys -}}
{{- fail (printf "%s.settings.%s: credentials are not written into values; use %s.secrets.%s: {name: SECRET, key: KEY}" $.path $key $.path $key) -}}
{{- end -}}
{{- if hasKey $.into $key -}}
{{- fail (printf "%s.settings.%s: set by the chart from another value; set that value instead" $.path $key) -}}
{{- end -}}
{{- $_ := set $.into $key $value -}}
{{- end -}}
{{- end -}}

{{/*
The sink list of a flowship config as YAML, in a fixed order.
Args: dict "sinks" .Values.X.sinks "path" "X.sinks" "dataDir" DIR
*/}}
{{- define "flowship.sinkList" -}}
{{- $list := list -}}
{{- range $type := list "parquet" "elasticsearch" "loki" "kafka" "http" -}}
{{- $values := index $.sinks $type | default dict -}}
{{- if $values.enabled -}}
{{- $path := printf "%s.%s" $.path $type -}}
{{- $sink := dict "type" $type -}}
{{- if eq $type "parquet" -}}
{{- $dir := required (printf "%s.path is required when %s.enabled is true" $path $path) $values.path -}}
{{- if not (or (hasPrefix "s3://" $dir) (hasPrefix (printf "%s/" $.dataDir) $dir)) -}}
{{- fail (printf "%s.path must be s3://BUCKET/PREFIX or under %s (the persistent volume), got %s" $path $.dataDir $dir) -}}
{{- end -}}
{{- $_ := set $sink "path" $dir -}}
{{- else if eq $type "kafka" -}}
{{- $_ := set $sink "brokers" (required (printf "%s.brokers is required when %s.enabled is true" $path $path) $values.brokers) -}}
{{- $_ := set $sink "topic" (required (printf "%s.topic is required when %s.enabled is true" $path $path) $values.topic) -}}
{{- with $values.encoding }}{{ $_ := set $sink "encoding" . }}{{ end -}}
{{- else -}}
{{- $_ := set $sink "url" (required (printf "%s.url is required when %s.enabled is true" $path $path) $values.url) -}}
{{- end -}}
{{- with $values.buffer -}}
{{- $buffer := dict "type" (default "memory" .type) -}}
{{- if eq $buffer.type "disk" -}}
{{- with .maxBytes }}{{ $_ := set $buffer "max_bytes" . }}{{ end -}}
{{- with .whenFull }}{{ $_ := set $buffer "when_full" . }}{{ end -}}
{{- end -}}
{{- $_ := set $sink "buffer" $buffer -}}
{{- end -}}
{{- include "flowship.addSecretRefs" (dict "into" $sink "secrets" ($values.secrets | default dict) "component" $type "path" $path) -}}
{{- include "flowship.addSettings" (dict "into" $sink "settings" ($values.settings | default dict) "path" $path) -}}
{{- with $values.stages }}{{ $_ := set $sink "stages" . }}{{ end -}}
{{- $list = append $list $sink -}}
{{- end -}}
{{- end -}}
{{- if not $list -}}
{{- fail (printf "%s: enable at least one sink" $.path) -}}
{{- end -}}
{{- toYaml $list -}}
{{- end -}}

{{/*
Environment variables from Secrets for every secret reference of a component's sinks (and source).
Args: dict "sinks" MAP "source" (dict "component" NAME "secrets" MAP) or nil
*/}}
{{- define "flowship.secretEnv" -}}
{{- $refs := list -}}
{{- range $type := list "parquet" "elasticsearch" "loki" "kafka" "http" -}}
{{- $values := index $.sinks $type | default dict -}}
{{- if $values.enabled -}}
{{- range $key, $ref := $values.secrets | default dict -}}
{{- $refs = append $refs (dict "component" $type "key" $key "ref" $ref) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with $.source -}}
{{- range $key, $ref := .secrets | default dict -}}
{{- $refs = append $refs (dict "component" $.source.component "key" $key "ref" $ref) -}}
{{- end -}}
{{- end -}}
{{- range $refs }}
- name: {{ include "flowship.secretEnvName" . }}
  valueFrom:
    secretKeyRef:
      name: {{ .ref.name }}
      key: {{ .ref.key }}
{{- end -}}
{{- end -}}

{{/* The agent's flowship config (flowship.yaml of the agent ConfigMap). */}}
{{- define "flowship.agentConfig" -}}
{{- $agent := .Values.agent -}}
{{- include "flowship.checkPort" (dict "key" "agent.metricsPort" "port" $agent.metricsPort) -}}
{{- $source := dict "type" "agent" "interfaces" $agent.interfaces -}}
{{- if $agent.kubernetesEnrichment -}}
{{- $_ := set $source "enrich" (dict "kubernetes" dict) -}}
{{- end -}}
{{- $observer := dict "enabled" $agent.observer.enabled -}}
{{- if $agent.observer.enabled -}}
{{- $address := required "agent.observer.address is required when agent.observer.enabled is true" $agent.observer.address -}}
{{- if not (hasPrefix "unix:" $address) -}}
{{- include "flowship.checkPort" (dict "key" "agent.observer.address" "port" (regexFind "[0-9]+$" $address | default "0")) -}}
{{- end -}}
{{- $_ := set $observer "address" $address -}}
{{- $local := or (hasPrefix "unix:" $address) (hasPrefix "127." $address) (hasPrefix "localhost:" $address) (hasPrefix "[::1]:" $address) -}}
{{- if not (or $local $agent.observer.tlsSecret (dig "allow_unauthenticated" false ($agent.observer.settings | default dict))) -}}
{{- fail (printf "agent.observer.address %s is reachable from the network: set agent.observer.tlsSecret (mTLS) or serve a unix socket; the Observer serves flow contents" $address) -}}
{{- end -}}
{{- with $agent.observer.tlsSecret -}}
{{- $_ := set $observer "tls" (dict "cert_file" "/etc/flowship/observer-tls/tls.crt" "key_file" "/etc/flowship/observer-tls/tls.key" "client_ca_file" "/etc/flowship/observer-tls/ca.crt") -}}
{{- end -}}
{{- include "flowship.addSettings" (dict "into" $observer "settings" ($agent.observer.settings | default dict) "path" "agent.observer") -}}
{{- end -}}
{{- $_ := set $source "observer" $observer -}}
{{- include "flowship.addSettings" (dict "into" $source "settings" ($agent.settings | default dict) "path" "agent.settings") -}}
{{- $sinks := include "flowship.sinkList" (dict "sinks" $agent.sinks "path" "agent.sinks" "dataDir" "/var/lib/flowship") -}}
# The agent's config, rendered from the chart's values (agent.*); docs/config.md, docs/agent.md.
node_name: env:NODE_NAME   # the Kubernetes node name: NODE_NAME is spec.nodeName (the pod's env)
metrics: {{ printf "0.0.0.0:%d" (int $agent.metricsPort) }}
data_dir: /var/lib/flowship
sources:
{{ toYaml (list $source) }}
{{- with $agent.stages }}
stages:
{{ toYaml . }}
{{- end }}
sinks:
{{ $sinks }}
{{- end -}}

{{/* The exporter's flowship config (flowship.yaml of the exporter ConfigMap). */}}
{{- define "flowship.exportConfig" -}}
{{- $export := .Values.exporter -}}
{{- include "flowship.checkPort" (dict "key" "exporter.metricsPort" "port" $export.metricsPort) -}}
{{- $source := dict "type" $export.source.type -}}
{{- if eq $export.source.type "kafka" -}}
{{- $kafka := $export.source.kafka -}}
{{- $_ := set $source "brokers" (required "exporter.source.kafka.brokers is required with exporter.source.type kafka" $kafka.brokers) -}}
{{- $_ := set $source "topic" (required "exporter.source.kafka.topic is required with exporter.source.type kafka" $kafka.topic) -}}
{{- $_ := set $source "group_id" (default (include "flowship.exportName" .) $kafka.groupId) -}}
{{- include "flowship.addSecretRefs" (dict "into" $source "secrets" ($kafka.secrets | default dict) "component" "kafka_source" "path" "exporter.source.kafka") -}}
{{- include "flowship.addSettings" (dict "into" $source "settings" ($kafka.settings | default dict) "path" "exporter.source.kafka") -}}
{{- else if eq $export.source.type "hubble" -}}
{{- $hubble := $export.source.hubble -}}
{{- if gt (int $export.replicas) 1 -}}
{{- fail (printf "exporter.replicas is %d with exporter.source.type hubble: every replica would read the same flows from Relay; use 1 (or the kafka source for a consumer group)" (int $export.replicas)) -}}
{{- end -}}
{{- $_ := set $source "address" (required "exporter.source.hubble.address is required with exporter.source.type hubble" $hubble.address) -}}
{{- if $hubble.tls.enabled -}}
{{- $_ := required "exporter.source.hubble.tls.secretName is required when exporter.source.hubble.tls.enabled is true" $hubble.tls.secretName -}}
{{- $_ := set $source "tls" true -}}
{{- $_ := set $source "ca_file" "/etc/flowship/hubble-tls/ca.crt" -}}
{{- if $hubble.tls.clientCertificate -}}
{{- $_ := set $source "cert_file" "/etc/flowship/hubble-tls/tls.crt" -}}
{{- $_ := set $source "key_file" "/etc/flowship/hubble-tls/tls.key" -}}
{{- end -}}
{{- with $hubble.tls.serverName }}{{ $_ := set $source "server_name" . }}{{ end -}}
{{- end -}}
{{- include "flowship.addSettings" (dict "into" $source "settings" ($hubble.settings | default dict) "path" "exporter.source.hubble") -}}
{{- else -}}
{{- fail (printf "exporter.source.type: expected kafka or hubble, got %v" $export.source.type) -}}
{{- end -}}
{{- $sinks := include "flowship.sinkList" (dict "sinks" $export.sinks "path" "exporter.sinks" "dataDir" "/var/lib/flowship") -}}
# The exporter's config, rendered from the chart's values (exporter.*); docs/config.md, docs/sinks.md.
metrics: {{ printf "0.0.0.0:%d" (int $export.metricsPort) }}
data_dir: /var/lib/flowship
sources:
{{ toYaml (list $source) }}
{{- with $export.stages }}
stages:
{{ toYaml . }}
{{- end }}
sinks:
{{ $sinks }}
{{- end -}}

{{/* Kafka source secrets of the exporter, for flowship.secretEnv. */}}
{{- define "flowship.exportSourceSecrets" -}}
{{- if eq .Values.exporter.source.type "kafka" -}}
{{- toYaml (dict "component" "kafka_source" "secrets" (.Values.exporter.source.kafka.secrets | default dict)) -}}
{{- else -}}
{{- toYaml (dict "component" "none" "secrets" dict) -}}
{{- end -}}
{{- end -}}
