{{/* Names, labels and the image: shared by every template. */}}

{{- define "cilia.chart" -}}
{{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cilia.labels" -}}
helm.sh/chart: {{ include "cilia.chart" . }}
app.kubernetes.io/part-of: cilia
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: agent or operator. */}}
{{- define "cilia.selectorLabels" -}}
app.kubernetes.io/name: cilia-{{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}

{{- define "cilia.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ $tag }}
{{- end -}}
{{- end }}

{{/* Fixed paths: the agent's defaults, the plugin's config, the image's layout. */}}
{{- define "cilia.socketDir" -}}/run/cilia{{- end }}
{{- define "cilia.socket" -}}/run/cilia/cilia.sock{{- end }}
{{- define "cilia.bpffsRoot" -}}/sys/fs/bpf/cilia{{- end }}
{{- define "cilia.stateDir" -}}/var/lib/cilia{{- end }}
{{- define "cilia.imageBpfDir" -}}/usr/lib/cilia/bpf{{- end }}
{{- define "cilia.imageCniDir" -}}/usr/lib/cilia/cni{{- end }}

{{- define "cilia.cgroupMount" -}}/run/cilia/cgroupv2{{- end }}

{{/* "true" when socket LB is on: socketLB.enabled, or kubeProxyReplacement when that is
     null (or absent); "" when off. */}}
{{- define "cilia.socketLB" -}}
{{- $on := .Values.kubeProxyReplacement -}}
{{- if not (kindIs "invalid" .Values.socketLB.enabled) -}}
{{- $on = .Values.socketLB.enabled -}}
{{- end -}}
{{- if $on }}true{{ end -}}
{{- end }}

{{/* The API server's own address for the in-cluster client (the Python kubernetes
     client reads exactly these two), in place of the `kubernetes` Service's ClusterIP,
     when k8sServiceHost is set; nothing otherwise. For containers that talk to the API
     server from the host network or before an agent is up: without kube-proxy, nothing
     translates that ClusterIP for them until their node's agent has programmed the
     datapath. The container's own env wins over the kubelet's service variables. */}}
{{- define "cilia.apiServerEnv" -}}
{{- if .Values.k8sServiceHost }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.k8sServiceHost | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.k8sServicePort | int | quote }}
{{- end }}
{{- end }}

{{/* The network config list installed into the nodes' CNI conf dir. */}}
{{- define "cilia.conflist" -}}
{{- $plugin := dict "type" "cilia-cni" "socket" (include "cilia.socket" .) -}}
{{- $conf := dict "cniVersion" .Values.cni.version "name" .Values.cni.networkName "plugins" (list $plugin) -}}
{{ toPrettyJson $conf }}
{{- end }}

{{/* The ConfigMap's data: also hashed into the pods' annotations, so a change rolls them. */}}
{{- define "cilia.configData" -}}
cluster-pool-ipv4-cidr: {{ .Values.ipam.clusterPoolIPv4CIDR | quote }}
cluster-pool-ipv4-mask-size: {{ .Values.ipam.clusterPoolIPv4MaskSize | quote }}
datastore: {{ .Values.datastore | quote }}
devices: {{ join "," .Values.agent.devices | quote }}
routing: {{ .Values.agent.routing | quote }}
log-level: {{ .Values.logLevel | quote }}
agent-metrics-port: {{ .Values.agent.metricsPort | quote }}
operator-metrics-port: {{ .Values.operator.metricsPort | quote }}
operator-health-port: {{ .Values.operator.healthPort | quote }}
cni-conflist: |
{{ include "cilia.conflist" . | indent 2 }}
{{- end }}

{{/* Environment from the ConfigMap: NAME from key, for `$(NAME)` in args. */}}
{{- define "cilia.configEnv" -}}
{{- range $name, $key := .keys }}
- name: {{ $name }}
  valueFrom:
    configMapKeyRef:
      name: cilia-config
      key: {{ $key }}
{{- end }}
{{- end }}

{{/* Checks what values.schema.json cannot say (it checks the shapes): the pool is a
     real IPv4 network, each node's block fits in it, kube-proxy replacement has the API
     server's address. Fails with a sentence. */}}
{{- define "cilia.validate" -}}
{{- $cidr := .Values.ipam.clusterPoolIPv4CIDR -}}
{{- $parts := splitList "/" $cidr -}}
{{- $prefix := atoi (index $parts 1) -}}
{{- $ip := 0 -}}
{{- range $octet := splitList "." (index $parts 0) -}}
{{- if gt (atoi $octet) 255 -}}
{{- fail (printf "ipam.clusterPoolIPv4CIDR %q: %s is not an IPv4 address (each of its four numbers is 0 to 255)" $cidr (index $parts 0)) -}}
{{- end -}}
{{- $ip = add (mul $ip 256) (atoi $octet) -}}
{{- end -}}
{{- if or (lt $prefix 8) (gt $prefix 28) -}}
{{- fail (printf "ipam.clusterPoolIPv4CIDR %q: the prefix length must be 8 to 28, not %d" $cidr $prefix) -}}
{{- end -}}
{{- $block := 1 -}}
{{- range until (sub 32 $prefix | int) }}{{ $block = mul $block 2 }}{{ end -}}
{{- $host := mod $ip $block -}}
{{- if ne (int $host) 0 -}}
{{- $net := sub $ip $host -}}
{{- fail (printf "ipam.clusterPoolIPv4CIDR %q has host bits set: did you mean %d.%d.%d.%d/%d?" $cidr (div $net 16777216) (mod (div $net 65536) 256) (mod (div $net 256) 256) (mod $net 256) $prefix) -}}
{{- end -}}
{{- $mask := int .Values.ipam.clusterPoolIPv4MaskSize -}}
{{- if le $mask $prefix -}}
{{- fail (printf "ipam.clusterPoolIPv4MaskSize %d must be longer than the pool's prefix (/%d): each node gets a /%d block of %s" $mask $prefix $mask $cidr) -}}
{{- end -}}
{{- if and .Values.kubeProxyReplacement (not .Values.k8sServiceHost) -}}
{{- fail "kubeProxyReplacement=true needs k8sServiceHost (and k8sServicePort, default 6443): the API server's own address. Without kube-proxy nothing translates the `kubernetes` Service's ClusterIP for the agents, on the host network, until they have programmed the datapath themselves; e.g. --set k8sServiceHost=192.0.2.10" -}}
{{- end -}}
{{- end }}
