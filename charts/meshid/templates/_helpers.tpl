{{/* Chart name, truncated to a DNS label. */}}
{{- define "meshid.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name when it already contains the chart name. Also the name of the
cluster-scoped RBAC objects, so two releases need two release names. */}}
{{- define "meshid.fullname" -}}
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

{{- define "meshid.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "meshid.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshid.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "meshid.labels" -}}
helm.sh/chart: {{ include "meshid.chart" . }}
{{ include "meshid.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: certificate-authority
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "meshid.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meshid.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "meshid.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "meshid.leaseName" -}}
{{- .Values.leaderElection.leaseName | default (printf "%s-leader" (include "meshid.fullname" .)) }}
{{- end }}

{{/* DNS names the self-issued serving certificate carries: what Istio's caAddress names. */}}
{{- define "meshid.servingHosts" -}}
{{- $svc := include "meshid.fullname" . }}
{{- $hosts := list (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.cluster.local" $svc .Release.Namespace) }}
{{- concat $hosts .Values.servingCert.extraHosts | uniq | toJson }}
{{- end }}

{{/* Fails rendering with a message naming the value when the signer settings are unusable. */}}
{{- define "meshid.validate" -}}
{{- $t := .Values.signer.type }}
{{- if eq $t "local" }}
{{- if not .Values.signer.local.secretName }}
{{- fail "signer.local.secretName is required with signer.type=local" }}
{{- end }}
{{- else if eq $t "aws-pca" }}
{{- if not .Values.signer.awsPca.arn }}
{{- fail "signer.awsPca.arn is required with signer.type=aws-pca" }}
{{- end }}
{{- else }}
{{- fail (printf "signer.type must be local or aws-pca, not %q" $t) }}
{{- end }}
{{- if and .Values.istiodCert.enabled (not .Values.istiodCert.namespace) }}
{{- fail "istiodCert.namespace is required with istiodCert.enabled=true" }}
{{- end }}
{{- end }}

{{/* meshid's configuration file: kebab-case keys, exactly the `meshid server` flag names.
This is the only place meshid settings are rendered. */}}
{{- define "meshid.remoteSecretsNamespace" -}}
{{- .Values.remoteClusters.secretsNamespace | default .Release.Namespace }}
{{- end }}

{{- define "meshid.config" -}}
{{- $v := .Values }}
{{- $c := dict
  "listen" (printf "0.0.0.0:%d" (int $v.ports.grpc))
  "http-listen" (printf "0.0.0.0:%d" (int $v.ports.http))
  "trust-domain" $v.trustDomain
  "cluster-id" $v.clusterID
  "audiences" $v.audiences
  "default-ttl" $v.certificates.defaultTTL
  "max-ttl" $v.certificates.maxTTL
  "token-cache-ttl" $v.tokenCacheTTL
  "log-format" $v.logFormat
  "signer" $v.signer.type
  "root-configmap" $v.rootConfigMap.enabled
  "istiod-cert" $v.istiodCert.enabled
  "trusted-node-accounts" $v.ztunnel.trustedNodeAccounts
}}
{{- with $v.certificates.minTTL }}
{{- $_ := set $c "min-ttl" . }}
{{- end }}
{{- if or $v.rootConfigMap.enabled $v.istiodCert.enabled }}
{{- $_ := set $c "leader-election-namespace" .Release.Namespace }}
{{- $_ := set $c "lease-name" (include "meshid.leaseName" .) }}
{{- $_ := set $c "signing-roots-interval" $v.leaderElection.signingRootsInterval }}
{{- $_ := set $c "signing-roots-grace" $v.leaderElection.signingRootsGrace }}
{{- end }}
{{- if eq $v.signer.type "local" }}
{{- $_ := set $c "ca-cert" (printf "/etc/meshid/ca/%s" $v.signer.local.certKey) }}
{{- $_ := set $c "ca-key" (printf "/etc/meshid/ca/%s" $v.signer.local.keyKey) }}
{{- with $v.signer.local.rootKey }}
{{- $_ := set $c "root-cert" (printf "/etc/meshid/ca/%s" .) }}
{{- end }}
{{- with $v.signer.local.chainKey }}
{{- $_ := set $c "ca-chain" (printf "/etc/meshid/ca/%s" .) }}
{{- end }}
{{- else }}
{{- $_ := set $c "pca-arn" $v.signer.awsPca.arn }}
{{- $_ := set $c "pca-mode" $v.signer.awsPca.mode }}
{{- $_ := set $c "pca-tps" (int $v.signer.awsPca.tps) }}
{{- with $v.signer.awsPca.region }}
{{- $_ := set $c "pca-region" . }}
{{- end }}
{{- with $v.signer.awsPca.endpoint }}
{{- $_ := set $c "pca-endpoint" . }}
{{- end }}
{{- end }}
{{- if $v.servingCert.secretName }}
{{- $_ := set $c "tls-cert" "/etc/meshid/tls/tls.crt" }}
{{- $_ := set $c "tls-key" "/etc/meshid/tls/tls.key" }}
{{- else }}
{{- $_ := set $c "serving-hosts" (include "meshid.servingHosts" . | fromJsonArray) }}
{{- end }}
{{- if $v.extraRoots.configMapName }}
{{- $_ := set $c "extra-roots" (printf "/etc/meshid/extra-roots/%s" $v.extraRoots.key) }}
{{- end }}
{{- if $v.rootConfigMap.enabled }}
{{- with $v.rootConfigMap.namespaceSelector }}
{{- $_ := set $c "namespace-selector" . }}
{{- end }}
{{- end }}
{{- if $v.remoteClusters.secrets }}
{{- $_ := set $c "remote-secrets" true }}
{{- $_ := set $c "remote-secrets-namespace" (include "meshid.remoteSecretsNamespace" .) }}
{{- end }}
{{- if $v.istiodCert.enabled }}
{{- $_ := set $c "istiod-namespace" $v.istiodCert.namespace }}
{{- $_ := set $c "istiod-secret-name" $v.istiodCert.secretName }}
{{- with $v.istiodCert.revision }}
{{- $_ := set $c "istiod-revision" . }}
{{- end }}
{{- end }}
{{- $c = mergeOverwrite $c (deepCopy ($v.extraConfig | default dict)) }}
{{- toYaml $c }}
{{- end }}
