{{/* Chart name. */}}
{{- define "ciliary.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of every object. */}}
{{- define "ciliary.fullname" -}}
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

{{/* Common labels; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "ciliary.labels" -}}
app.kubernetes.io/name: {{ include "ciliary.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: ciliary
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Selector labels (immutable in Deployments/DaemonSets/StatefulSets: keep them minimal). */}}
{{- define "ciliary.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ciliary.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Image of a component; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "ciliary.image" -}}
{{- $c := index .ctx.Values .component }}
{{- $repo := $c.image.repository | default (printf "%s-%s" .ctx.Values.image.repository .component) }}
{{- $tag := $c.image.tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion }}
{{- printf "%s:%s" $repo (toString $tag) }}
{{- end }}

{{/* Comma-separated etcd client URLs the components use. */}}
{{- define "ciliary.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}
{{- printf "https://%s-etcd.%s.svc:%d" (include "ciliary.fullname" .) .Release.Namespace (int .Values.etcd.clientPort) }}
{{- else }}
{{- if not .Values.etcd.external.endpoints }}
{{- fail "etcd.enabled=false needs etcd.external.endpoints" }}
{{- end }}
{{- if and (not .Values.etcd.external.tls.secretName) (not .Values.etcd.external.insecure) }}
{{- fail "etcd.enabled=false needs etcd.external.tls.secretName (mutual TLS), or etcd.external.insecure=true for plain http" }}
{{- end }}
{{- join "," .Values.etcd.external.endpoints }}
{{- end }}
{{- end }}

{{/* Secret with the bundled etcd's CA and certificates (generated, or etcd.tls.existingSecret). */}}
{{- define "ciliary.etcdTLSSecret" -}}
{{- .Values.etcd.tls.existingSecret | default (printf "%s-etcd-tls" (include "ciliary.fullname" .)) }}
{{- end }}

{{/* True when the components use TLS client certificates towards etcd (always, unless external insecure). */}}
{{- define "ciliary.etcdTLS" -}}
{{- if or .Values.etcd.enabled .Values.etcd.external.tls.secretName }}true{{ end }}
{{- end }}

{{/* Env vars pointing a component at the etcd TLS files; call with (dict "ctx" $ "prefix" "CILIARY_AGENT_"). */}}
{{- define "ciliary.etcdTLSEnv" -}}
{{- if include "ciliary.etcdTLS" .ctx }}
- name: {{ .prefix }}ETCD_CA_FILE
  value: /etc/ciliary/etcd-tls/ca.crt
- name: {{ .prefix }}ETCD_CERT_FILE
  value: /etc/ciliary/etcd-tls/tls.crt
- name: {{ .prefix }}ETCD_KEY_FILE
  value: /etc/ciliary/etcd-tls/tls.key
{{- else }}
# plain http to etcd, explicitly chosen (etcd.external.insecure): the component warns on every start
- name: {{ .prefix }}ETCD_INSECURE
  value: "on"
{{- end }}
{{- end }}

{{- define "ciliary.etcdTLSVolumeMount" -}}
{{- if include "ciliary.etcdTLS" . }}
- name: etcd-tls
  mountPath: /etc/ciliary/etcd-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* The component's etcd credentials; call with (dict "ctx" $ "component" "operator"|"agent"|"root").
     Agents of the bundled etcd never get here: they reference no Secret holding another user's key
     (see ciliary.etcdAgentCAConfigMap and ciliary.etcdAgentsSecret). */}}
{{- define "ciliary.etcdTLSVolume" -}}
{{- $ctx := .ctx }}
{{- if and $ctx.Values.etcd.enabled (eq .component "agent") }}
{{- fail "internal: agent pods of the bundled etcd must not mount the etcd-tls Secret" }}
{{- end }}
{{- if $ctx.Values.etcd.enabled }}
- name: {{ if eq .component "root" }}etcd-root{{ else }}etcd-tls{{ end }}
  secret:
    secretName: {{ include "ciliary.etcdTLSSecret" $ctx }}
    defaultMode: 0400
    items:
    - key: ca.crt
      path: ca.crt
    - key: {{ .component }}.crt
      path: tls.crt
    - key: {{ .component }}.key
      path: tls.key
{{- else if $ctx.Values.etcd.external.tls.secretName }}
- name: etcd-tls
  secret:
    secretName: {{ $ctx.Values.etcd.external.tls.secretName }}
    defaultMode: 0400
{{- end }}
{{- end }}

{{/* "true" when each agent enrolls for its own etcd certificate (bundled etcd with etcd.nodeEnrollment.enabled). */}}
{{- define "ciliary.nodeEnrollment" -}}
{{- if and .Values.etcd.enabled .Values.etcd.nodeEnrollment.enabled }}true{{ end }}
{{- end }}

{{/* Secret with the etcd CA's certificate and key (only the etcd-enroller sidecar mounts it). */}}
{{- define "ciliary.etcdCASecret" -}}
{{- if and .Values.etcd.tls.existingSecret (not .Values.etcd.tls.existingCASecret) }}
{{- fail "etcd.nodeEnrollment.enabled with etcd.tls.existingSecret needs etcd.tls.existingCASecret (a Secret with ca.crt and ca.key of the etcd CA), or etcd.nodeEnrollment.enabled=false" }}
{{- end }}
{{- .Values.etcd.tls.existingCASecret | default (printf "%s-etcd-ca" (include "ciliary.fullname" .)) }}
{{- end }}

{{/* ConfigMap with the etcd CA certificate alone (what an enrolled agent needs to trust etcd). */}}
{{- define "ciliary.etcdCACertConfigMap" -}}
{{- printf "%s-etcd-ca-cert" (include "ciliary.fullname" .) }}
{{- end }}

{{/* ConfigMap with the etcd CA certificate alone that enrolled agent pods mount: the generated one, or
     etcd.tls.existingCAConfigMap with etcd.tls.existingSecret (agent pods never reference that Secret:
     a node's kubelet may read every Secret its pods reference, whatever items: selects). */}}
{{- define "ciliary.etcdAgentCAConfigMap" -}}
{{- if .Values.etcd.tls.existingSecret }}
{{- if not .Values.etcd.tls.existingCAConfigMap }}
{{- fail "etcd.tls.existingSecret with etcd.nodeEnrollment.enabled needs etcd.tls.existingCAConfigMap (a ConfigMap whose key ca.crt is the etcd CA certificate, nothing else): agent pods must not reference the existingSecret, which holds the root, operator and server keys" }}
{{- end }}
{{- .Values.etcd.tls.existingCAConfigMap }}
{{- else }}
{{- include "ciliary.etcdCACertConfigMap" . }}
{{- end }}
{{- end }}

{{/* Secret with ca.crt and the shared ciliary-agents user's tls.crt/tls.key only (etcd.nodeEnrollment.enabled=false):
     the generated <release>-etcd-agents, or etcd.tls.existingAgentsSecret with etcd.tls.existingSecret. */}}
{{- define "ciliary.etcdAgentsSecret" -}}
{{- if .Values.etcd.tls.existingSecret }}
{{- if not .Values.etcd.tls.existingAgentsSecret }}
{{- fail "etcd.tls.existingSecret with etcd.nodeEnrollment.enabled=false needs etcd.tls.existingAgentsSecret (a Secret with ca.crt, tls.crt and tls.key of the ciliary-agents user, nothing else): agent pods must not reference the existingSecret, which holds the root, operator and server keys" }}
{{- end }}
{{- .Values.etcd.tls.existingAgentsSecret }}
{{- else }}
{{- printf "%s-etcd-agents" (include "ciliary.fullname" .) }}
{{- end }}
{{- end }}

{{/* The agent's Hubble Observer listen address (agent.hubble.listenAddress; "" = the node's address when the
     relay runs, else loopback). $(CILIARY_AGENT_HOST_IP) is expanded by the kubelet (defined before it). */}}
{{- define "ciliary.agentHubbleAddr" -}}
{{- if .Values.agent.hubble.listenAddress }}
{{- $a := .Values.agent.hubble.listenAddress }}
{{- $local := or (eq $a "off") (hasPrefix "127." $a) (hasPrefix "localhost:" $a) (hasPrefix "[::1]:" $a) }}
{{- if not (or $local (include "ciliary.hubbleTLS" .) .Values.agent.hubble.insecure) }}
{{- fail "agent.hubble.listenAddress off loopback needs relay.enabled (the chart's Hubble certificates) or agent.hubble.insecure=true" }}
{{- end }}
{{- $a }}
{{- else if .Values.relay.enabled }}
{{- print "$(CILIARY_AGENT_HOST_IP):4244" }}
{{- else }}
{{- print "127.0.0.1:4244" }}
{{- end }}
{{- end }}

{{/* HOST:PORT of the Observer API the UI reads: ui.server, else the relay's Service. */}}
{{- define "ciliary.uiServer" -}}
{{- if .Values.ui.server }}
{{- .Values.ui.server }}
{{- else if .Values.relay.enabled }}
{{- printf "%s.%s.svc:%d" .Values.relay.service.name .Release.Namespace (int .Values.relay.service.port) }}
{{- else }}
{{- fail "ui.enabled with relay.enabled=false needs ui.server (HOST:PORT of a Hubble Observer API)" }}
{{- end }}
{{- end }}

{{/* "true" when the agents' Observer API is mutual TLS (the relay runs and agent.hubble.insecure is off). */}}
{{- define "ciliary.hubbleTLS" -}}
{{- if and .Values.relay.enabled (not .Values.agent.hubble.insecure) }}true{{ end }}
{{- end }}

{{/* Secret the agents mount for their Observer API: ca.crt (the CA of the relay's client certificate), tls.crt and
     tls.key (the agents' shared server certificate for *.<relay.tls.clusterName>.hubble-grpc.cilium.io). */}}
{{- define "ciliary.hubbleServerSecret" -}}
{{- .Values.relay.tls.existingServerSecret | default (printf "%s-hubble-server-certs" (include "ciliary.fullname" .)) }}
{{- end }}

{{/* Secret the relay container mounts: ca.crt (the CA of the agents' server certificate), tls.crt and tls.key
     (the relay's client certificate). */}}
{{- define "ciliary.hubbleRelayClientSecret" -}}
{{- .Values.relay.tls.existingClientSecret | default (printf "%s-hubble-relay-client-certs" (include "ciliary.fullname" .)) }}
{{- end }}

{{/* Secret with ca.crt and the ciliary-relay etcd user's tls.crt/tls.key (bundled etcd): the generated
     <release>-etcd-relay, or etcd.tls.existingRelaySecret with etcd.tls.existingSecret. */}}
{{- define "ciliary.etcdRelaySecret" -}}
{{- if .Values.etcd.tls.existingSecret }}
{{- if not .Values.etcd.tls.existingRelaySecret }}
{{- fail "etcd.tls.existingSecret with relay.enabled needs etcd.tls.existingRelaySecret (a Secret with ca.crt, tls.crt and tls.key of the etcd user ciliary-relay, which may only read the node records)" }}
{{- end }}
{{- .Values.etcd.tls.existingRelaySecret }}
{{- else }}
{{- printf "%s-etcd-relay" (include "ciliary.fullname" .) }}
{{- end }}
{{- end }}

{{/* Environment for clusters without kube-proxy, where nothing translates a ClusterIP before the agents run:
KUBERNETES_SERVICE_HOST/PORT when `k8sServiceHost` is set; with `etcd.clientHostAlias`, gRPC's native resolver
(the C library's, which reads the hostAliases in /etc/hosts first; gRPC's default c-ares resolver asks the
unreachable cluster DNS first for a short name under the pods' `ndots:5` and times out). */}}
{{- define "ciliary.k8sServiceEnv" -}}
{{- if .Values.k8sServiceHost }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.k8sServiceHost | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.k8sServicePort | toString | quote }}
{{- end }}
{{- if and .Values.etcd.enabled .Values.etcd.clientHostAlias }}
- name: GRPC_DNS_RESOLVER
  value: native
{{- end }}
{{- end }}

{{/* hostAliases giving the bundled etcd Service's name `etcd.clientHostAlias` (the pods that need etcd before
the agents' load balancer is programmed: operator, agents). */}}
{{- define "ciliary.etcdHostAliases" -}}
{{- if and .Values.etcd.enabled .Values.etcd.clientHostAlias }}
{{- if not .Values.etcd.hostNetwork }}
{{- fail "etcd.clientHostAlias needs etcd.hostNetwork (the alias is the etcd node's own address)" }}
{{- end }}
{{- if not (regexMatch "^([0-9]{1,3}\\.){3}[0-9]{1,3}$" (toString .Values.etcd.clientHostAlias)) }}
{{- fail (printf "etcd.clientHostAlias %q is not an IPv4 address (the etcd node's own address)" (toString .Values.etcd.clientHostAlias)) }}
{{- end }}
{{- if not (index (.Values.etcd.nodeSelector | default dict) "kubernetes.io/hostname") }}
{{- fail "etcd.clientHostAlias needs etcd.nodeSelector with kubernetes.io/hostname: the node whose address it is (an etcd pod elsewhere leaves the operator and agents dialling an address where no etcd listens)" }}
{{- end }}
hostAliases:
- ip: {{ .Values.etcd.clientHostAlias | quote }}
  hostnames:
  - {{ printf "%s-etcd.%s.svc" (include "ciliary.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}
