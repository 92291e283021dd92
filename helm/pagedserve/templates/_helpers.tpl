{{/* Chart name, truncated to the 63-character DNS label limit. */}}
{{- define "pagedserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "pagedserve.fullname" -}}
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

{{- define "pagedserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pagedserve.labels" -}}
helm.sh/chart: {{ include "pagedserve.chart" . }}
{{ include "pagedserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: worker
app.kubernetes.io/part-of: pagedserve
{{- end }}

{{- define "pagedserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pagedserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pagedserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pagedserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image reference: digest wins over tag; tag defaults to <appVersion>-cuda|cpu. */}}
{{- define "pagedserve.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- $flavor := ternary "cuda" "cpu" .Values.gpu.enabled }}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion $flavor) .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the Redis URL (and password). */}}
{{- define "pagedserve.redisSecretName" -}}
{{- default (printf "%s-redis" (include "pagedserve.fullname" .)) .Values.redis.existingSecret }}
{{- end }}

{{/* redis.url, checked before urlParse reads it: Go's URL parser quotes the whole URL, password included, in
its errors. The user/password part is checked here, without quoting it, and the rest is parsed without it. */}}
{{- define "pagedserve.redisURLChecked" -}}
{{- $url := .Values.redis.url }}
{{- if regexMatch "[[:space:][:cntrl:]]" $url }}
{{- fail "redis.url: has a space or control character; percent-encode it (a space as %20) or set redis.username/redis.password" }}
{{- end }}
{{- $scheme := regexFind "^[A-Za-z][A-Za-z0-9+.-]*://" $url }}
{{- $rest := trimPrefix $scheme $url }}
{{- $authority := regexFind "^[^/?#]*" $rest }}
{{- if contains "@" $authority }}
{{- $userinfo := regexReplaceAll "@[^@]*$" $authority "" }}
{{- /* the characters Go's parser and redis-py take as they are; anything else is percent-encoded */}}
{{- if not (regexMatch "^([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})*$" $userinfo) }}
{{- fail "redis.url: the user name or password has a character to percent-encode (% as %25, a space as %20, non-ASCII as its UTF-8 %XX bytes); or set redis.username/redis.password" }}
{{- end }}
{{- $rest = substr (int (add (len $userinfo) 1)) (len $rest) $rest }}
{{- end }}
{{- if contains "@" $rest }}
{{- fail "redis.url: a /, ? or # in the user name or password ends the host early; percent-encode it (%2F, %3F, %23) or set redis.username/redis.password" }}
{{- end }}
{{- $_ := urlParse (printf "%s%s" $scheme $rest) }}
{{- $url }}
{{- end }}

{{/* redis.host, empty = redis-master. Empty is the default so that the chart can tell an operator who named the
Redis from one who did not: with existingSecret KEDA has nothing else to go by. */}}
{{- define "pagedserve.redisHost" -}}
{{- .Values.redis.host | default "redis-master" }}
{{- end }}

{{/* Redis URL built from the parts when redis.url is empty. */}}
{{- define "pagedserve.redisURL" -}}
{{- if .Values.redis.url }}
{{- include "pagedserve.redisURLChecked" . }}
{{- else }}
{{- $scheme := ternary "rediss" "redis" .Values.redis.tls }}
{{- $auth := "" }}
{{- /* urlquery writes a space as "+", which redis-py's unquote keeps as a literal "+"; a literal "+" is
       already "%2B" by then, so every remaining "+" is a space. */}}
{{- $user := .Values.redis.username | urlquery | replace "+" "%20" }}
{{- if .Values.redis.password }}
{{- $auth = printf "%s:%s@" $user (.Values.redis.password | urlquery | replace "+" "%20") }}
{{- else if .Values.redis.username }}
{{- $auth = printf "%s@" $user }}
{{- end }}
{{- printf "%s://%s%s:%s/%s" $scheme $auth (include "pagedserve.redisHost" .) (include "pagedserve.str" .Values.redis.port) (include "pagedserve.str" .Values.redis.db) }}
{{- end }}
{{- end }}

{{/* Redis stream of requests and consumer group of the workers (CONTRACT §2). */}}
{{- define "pagedserve.stream" -}}
{{- printf "%s:requests" .Values.prefix }}
{{- end }}
{{- /* The worker always joins "<prefix>-workers": there is nothing to override. */}}
{{- define "pagedserve.consumerGroup" -}}
{{- printf "%s-workers" .Values.prefix }}
{{- end }}
{{- /* The batches with lines still to take or to collect (batch_keys.BatchKeys.active, a sorted set): producers
       add a batch when they create it, workers remove it once every line has its output line. */}}
{{- define "pagedserve.activeBatches" -}}
{{- printf "%s:batches:active" .Values.prefix }}
{{- end }}

{{/* GPUs per worker pod: one per tensor-parallel rank (gpu.count, raised to the ranks; one above them is refused). */}}
{{- define "pagedserve.gpuCount" -}}
{{- max .Values.gpu.count (.Values.engine.tensorParallelSize | default 1) }}
{{- end }}

{{/* Fails when resources names the GPU resource with another count than the chart's: the chart writes the limit
from gpu.count and engine.tensorParallelSize, and would otherwise replace the one given without a word. And when
gpu.count is above the ranks: the GPUs past them would be reserved and never used. */}}
{{- define "pagedserve.checkGpuResources" -}}
{{- $gpu := .Values.gpu }}
{{- $want := include "pagedserve.gpuCount" . }}
{{- $ranks := int (.Values.engine.tensorParallelSize | default 1) }}
{{- if and $gpu.enabled (gt (int $gpu.count) $ranks) }}
{{- fail (printf "gpu.count: %d GPUs per worker, but engine.tensorParallelSize is %d: the engine runs one rank per GPU, so %d would sit idle; set engine.tensorParallelSize: %d (the model split over them) or gpu.count: %d" (int $gpu.count) $ranks (sub (int $gpu.count) $ranks) (int $gpu.count) $ranks) }}
{{- end }}
{{- range $kind := list "limits" "requests" }}
{{- $given := get ($.Values.resources | default dict) $kind | default dict }}
{{- if hasKey $given $gpu.resourceName }}
{{- $asked := include "pagedserve.str" (get $given $gpu.resourceName) }}
{{- if ne $asked $want }}
{{- fail (printf "resources.%s.%s: %s, but the pod asks for %s (the larger of gpu.count: %s and engine.tensorParallelSize: %s); set gpu.count instead and leave %s out of resources" $kind $gpu.resourceName $asked $want (include "pagedserve.str" $gpu.count) (include "pagedserve.str" ($.Values.engine.tensorParallelSize | default 1)) $gpu.resourceName) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Drain budget: worker grace + margin. */}}
{{- define "pagedserve.terminationGracePeriodSeconds" -}}
{{- add (int .Values.worker.shutdownGraceSeconds) (int .Values.worker.terminationGraceMarginSeconds) }}
{{- end }}

{{/* true when the worker is to export spans: opentelemetry.endpoint, or extraConfig / extraEnv naming an exporter
or an OTLP endpoint themselves (the SDK's own variables, which the worker reads). Without any of them the chart
sets OTEL_SDK_DISABLED, which would otherwise switch off the exporter they ask for. An extraEnv value taken from
a Secret or ConfigMap (valueFrom) counts as set; OTEL_TRACES_EXPORTER=none asks for no export. */}}
{{- define "pagedserve.tracingConfigured" -}}
{{- $vars := dict }}
{{- range $k, $v := .Values.extraConfig }}{{ $_ := set $vars $k (toString $v) }}{{ end }}
{{- range $e := .Values.extraEnv }}
{{- if $e.valueFrom }}
{{- $_ := set $vars (toString $e.name) "(valueFrom)" }}
{{- else }}
{{- $_ := set $vars (toString $e.name) (toString ($e.value | default "")) }}
{{- end }}
{{- end }}
{{- $exporter := get $vars "OTEL_TRACES_EXPORTER" | trim | lower }}
{{- $endpoint := or (get $vars "OTEL_EXPORTER_OTLP_ENDPOINT") (get $vars "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") }}
{{- /* the worker's exporter: otlp (the default) once an endpoint is set, console, or none */}}
{{- $asked := and (ne $exporter "none") (or (not (empty $endpoint)) (not (has $exporter (list "" "otlp")))) }}
{{- or (not (empty .Values.opentelemetry.endpoint)) $asked | toString }}
{{- end }}

{{/* One "NAME: "value"" line per setting that is not null/empty. */}}
{{- define "pagedserve.configEntries" -}}
{{- $e := .Values.engine }}
{{- $w := .Values.worker }}
{{- $cfg := dict
  "PAGEDSERVE_PREFIX" .Values.prefix
  "PAGEDSERVE_MODEL" .Values.model.path
  "PAGEDSERVE_DEVICE" (default (ternary "cuda" "cpu" .Values.gpu.enabled) $e.device)
  "PAGEDSERVE_DTYPE" $e.dtype
  "PAGEDSERVE_BLOCK_SIZE" $e.blockSize
  "PAGEDSERVE_NUM_GPU_BLOCKS" $e.numGpuBlocks
  "PAGEDSERVE_GPU_MEMORY_UTILIZATION" $e.gpuMemoryUtilization
  "PAGEDSERVE_SWAP_SPACE_GB" $e.swapSpaceGb
  "PAGEDSERVE_PREEMPTION_MODE" $e.preemptionMode
  "PAGEDSERVE_MAX_NUM_SEQS" $e.maxNumSeqs
  "PAGEDSERVE_MAX_NUM_BATCHED_TOKENS" $e.maxNumBatchedTokens
  "PAGEDSERVE_MAX_MODEL_LEN" $e.maxModelLen
  "PAGEDSERVE_TENSOR_PARALLEL_SIZE" $e.tensorParallelSize
  "PAGEDSERVE_CLAIM_IDLE_MS" $w.claimIdleMs
  "PAGEDSERVE_MAX_DELIVERIES" $w.maxDeliveries
  "PAGEDSERVE_RESULT_TTL_S" $w.resultTtlS
  "PAGEDSERVE_MAX_QUEUE_MS" $w.maxQueueMs
  "PAGEDSERVE_MAX_SAMPLES_PER_REQUEST" $w.maxSamplesPerRequest
  "PAGEDSERVE_MAX_STOP_STRINGS" $w.maxStopStrings
  "PAGEDSERVE_MAX_STOP_STRING_CHARS" $w.maxStopStringChars
  "PAGEDSERVE_MAX_TOKENS_PER_REQUEST" $w.maxTokensPerRequest
  "PAGEDSERVE_STALL_TIMEOUT_S" $w.stallTimeoutS
  "PAGEDSERVE_SHUTDOWN_GRACE_S" $w.shutdownGraceSeconds
  "PAGEDSERVE_GRACE_PERIOD_S" $w.shutdownGraceSeconds
  "PAGEDSERVE_METRICS_PORT" $w.metricsPort
  "PAGEDSERVE_LOG_FORMAT" $w.logFormat
  "PAGEDSERVE_LOG_LEVEL" $w.logLevel
  "OTEL_EXPORTER_OTLP_ENDPOINT" .Values.opentelemetry.endpoint
  "OTEL_SERVICE_NAME" (default (include "pagedserve.fullname" .) .Values.opentelemetry.serviceName)
}}
{{- if ne $e.enablePrefixCaching nil }}
{{- $_ := set $cfg "PAGEDSERVE_ENABLE_PREFIX_CACHING" (ternary "true" "false" $e.enablePrefixCaching) }}
{{- end }}
{{- if ne (include "pagedserve.tracingConfigured" .) "true" }}
{{- $_ := set $cfg "OTEL_SDK_DISABLED" "true" }}
{{- end }}
{{- include "pagedserve.refuseManagedEnv" (dict "where" "extraConfig" "names" (keys .Values.extraConfig)) }}
{{- include "pagedserve.refusePodEnv" (keys .Values.extraConfig) }}
{{- range $name := keys .Values.extraConfig }}
{{- include "pagedserve.refuseMetricsHost" (dict "where" (printf "extraConfig.%s" $name) "name" $name "value" (get $.Values.extraConfig $name)) }}
{{- if eq (upper $name) "PAGEDSERVE_WORKER_NAME" }}
{{- fail (printf "extraConfig.%s: every replica would read this one consumer name, and a second live worker under a name is refused (it exits); leave it unset: each pod takes its own name (its hostname)" $name) }}
{{- end }}
{{- end }}
{{- /* OTEL_RESOURCE_ATTRIBUTES goes into the pod's env, after the chart's attributes (see deployment.yaml) */}}
{{- $cfg = merge (omit .Values.extraConfig "OTEL_RESOURCE_ATTRIBUTES" | deepCopy) $cfg }}
{{- range $k := keys $cfg | sortAlpha }}
{{- $v := get $cfg $k }}
{{- if or (kindIs "bool" $v) (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) $v }}
{{ $k }}: {{ include "pagedserve.str" $v | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* A value as text. Every number of a values file reaches the templates as a float64, which toString ("%v")
writes as 2.592e+06 from 10**6 on, and the worker refuses that: whole numbers are written as integers. */}}
{{- define "pagedserve.str" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- printf "%.0f" . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* Variables the chart sets from a value, with that value. KEDA, the probes and the drain follow the values:
extraConfig or extraEnv setting one of these would leave them disagreeing with the worker. */}}
{{- define "pagedserve.managedEnv" -}}
{{- dict
  "PAGEDSERVE_PREFIX" "prefix"
  "PAGEDSERVE_MODEL" "model.path"
  "PAGEDSERVE_DEVICE" "engine.device"
  "PAGEDSERVE_DTYPE" "engine.dtype"
  "PAGEDSERVE_BLOCK_SIZE" "engine.blockSize"
  "PAGEDSERVE_NUM_GPU_BLOCKS" "engine.numGpuBlocks"
  "PAGEDSERVE_GPU_MEMORY_UTILIZATION" "engine.gpuMemoryUtilization"
  "PAGEDSERVE_SWAP_SPACE_GB" "engine.swapSpaceGb"
  "PAGEDSERVE_PREEMPTION_MODE" "engine.preemptionMode"
  "PAGEDSERVE_MAX_NUM_SEQS" "engine.maxNumSeqs"
  "PAGEDSERVE_MAX_NUM_BATCHED_TOKENS" "engine.maxNumBatchedTokens"
  "PAGEDSERVE_MAX_MODEL_LEN" "engine.maxModelLen"
  "PAGEDSERVE_ENABLE_PREFIX_CACHING" "engine.enablePrefixCaching"
  "PAGEDSERVE_TENSOR_PARALLEL_SIZE" "engine.tensorParallelSize"
  "PAGEDSERVE_CLAIM_IDLE_MS" "worker.claimIdleMs"
  "PAGEDSERVE_MAX_DELIVERIES" "worker.maxDeliveries"
  "PAGEDSERVE_RESULT_TTL_S" "worker.resultTtlS"
  "PAGEDSERVE_MAX_QUEUE_MS" "worker.maxQueueMs"
  "PAGEDSERVE_MAX_SAMPLES_PER_REQUEST" "worker.maxSamplesPerRequest"
  "PAGEDSERVE_MAX_STOP_STRINGS" "worker.maxStopStrings"
  "PAGEDSERVE_MAX_STOP_STRING_CHARS" "worker.maxStopStringChars"
  "PAGEDSERVE_MAX_TOKENS_PER_REQUEST" "worker.maxTokensPerRequest"
  "PAGEDSERVE_STALL_TIMEOUT_S" "worker.stallTimeoutS"
  "PAGEDSERVE_SHUTDOWN_GRACE_S" "worker.shutdownGraceSeconds"
  "PAGEDSERVE_GRACE_PERIOD_S" "worker.shutdownGraceSeconds"
  "GRACE_PERIOD_S" "worker.shutdownGraceSeconds"
  "PAGEDSERVE_METRICS_PORT" "worker.metricsPort"
  "PAGEDSERVE_LOG_FORMAT" "worker.logFormat"
  "PAGEDSERVE_LOG_LEVEL" "worker.logLevel"
  "PAGEDSERVE_REDIS_URL" "redis.url (or redis.existingSecret)"
  "PAGEDSERVE_CPU_THREADS" "cpuThreads"
  "OMP_NUM_THREADS" "cpuThreads"
  "PAGEDSERVE_CPU_BIND" "cpuBind"
| toJson }}
{{- end }}

{{/* Fails when one of .names (extraConfig keys, extraEnv names) is a variable the chart sets. The worker's
settings read names in any case (pagedserve_prefix is PAGEDSERVE_PREFIX), so they are compared upper-cased. */}}
{{- define "pagedserve.refuseManagedEnv" -}}
{{- $managed := include "pagedserve.managedEnv" . | fromJson }}
{{- range $name := .names | sortAlpha }}
{{- with get $managed (upper $name) }}
{{- fail (printf "%s.%s: the chart sets this variable (KEDA, the probes and the drain follow it); set %s instead" $.where $name .) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Variables the pod sets in its env (from another value, or the downward API), with what to do instead. env wins
over the ConfigMap (envFrom): one of these in extraConfig would sit in the ConfigMap and never reach the worker.
Compared as written: unlike the worker's PAGEDSERVE_* settings, the libraries reading these names mind the case.
OTEL_RESOURCE_ATTRIBUTES is not among them: extraConfig's is appended to the pod's own (deployment.yaml). */}}
{{- define "pagedserve.podEnv" -}}
{{- $cache := "set cache.mountPath instead (every cache location of the pod points into that volume)" }}
{{- $downward := "the downward API sets it (the pod's own name, namespace or node); use another name" }}
{{- dict
  "XDG_CACHE_HOME" $cache
  "HF_HOME" $cache
  "TRITON_CACHE_DIR" $cache
  "TORCH_EXTENSIONS_DIR" $cache
  "CUDA_CACHE_PATH" $cache
  "POD_NAME" $downward
  "POD_NAMESPACE" $downward
  "NODE_NAME" $downward
| toJson }}
{{- end }}

{{/* Fails when an extraConfig key (the list given) is a variable of pagedserve.podEnv. */}}
{{- define "pagedserve.refusePodEnv" -}}
{{- $set := include "pagedserve.podEnv" . | fromJson }}
{{- range $name := . | sortAlpha }}
{{- with get $set $name }}
{{- fail (printf "extraConfig.%s: the pod sets this variable in its env, which wins over the ConfigMap; %s" $name .) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Percent-decoding of URL userinfo, as redis-py's unquote does (Sprig has no url-decode). urlParse hands the
userinfo back escaped, so a password taken from redis.url must be decoded before KEDA logs in with it.
%XX escapes are bytes: runs of them are assembled into UTF-8 code points; a malformed escape fails. */}}
{{- define "pagedserve.urlUnescape" -}}
{{- $parts := splitList "%" .s }}
{{- $out := first $parts }}
{{- $cp := 0 }}
{{- $need := 0 }}
{{- range $p := rest $parts }}
{{- if not (regexMatch "^[0-9A-Fa-f]{2}" $p) }}
{{- fail (printf "%s: malformed %%-escape in the URL's user/password; fix the escaping or set redis.username/redis.password" $.what) }}
{{- end }}
{{- $b := int (printf "0x%s" (substr 0 2 $p)) }}
{{- if gt $need 0 }}
{{- if ne (div $b 64) 2 }}
{{- fail (printf "%s: the URL's user/password is not UTF-8 once %%-decoded; set redis.username/redis.password instead" $.what) }}
{{- end }}
{{- $cp = add (mul $cp 64) (mod $b 64) }}
{{- $need = sub $need 1 }}
{{- else if lt $b 128 }}
{{- $cp = $b }}
{{- else if eq (div $b 32) 6 }}
{{- $cp = mod $b 32 }}{{ $need = 1 }}
{{- else if eq (div $b 16) 14 }}
{{- $cp = mod $b 16 }}{{ $need = 2 }}
{{- else if eq (div $b 8) 30 }}
{{- $cp = mod $b 8 }}{{ $need = 3 }}
{{- else }}
{{- fail (printf "%s: the URL's user/password is not UTF-8 once %%-decoded; set redis.username/redis.password instead" $.what) }}
{{- end }}
{{- $tail := substr 2 (len $p) $p }}
{{- if and (gt $need 0) $tail }}
{{- fail (printf "%s: the URL's user/password is not UTF-8 once %%-decoded; set redis.username/redis.password instead" $.what) }}
{{- end }}
{{- if eq $need 0 }}
{{- $out = printf "%s%c%s" $out $cp $tail }}
{{- end }}
{{- end }}
{{- if gt $need 0 }}
{{- fail (printf "%s: the URL's user/password is not UTF-8 once %%-decoded; set redis.username/redis.password instead" $.what) }}
{{- end }}
{{- $out }}
{{- end }}

{{/* Redis password for KEDA's TriggerAuthentication: the one inside redis.url, decoded, when the URL is set (the
worker logs in with the URL, which wins over the parts: a redis.password left beside it would have KEDA log in with
another password than the worker's), else redis.password. */}}
{{- define "pagedserve.redisPassword" -}}
{{- if .Values.redis.url }}
{{- $parts := splitn ":" 2 (get (urlParse (include "pagedserve.redisURLChecked" .)) "userinfo") }}
{{- include "pagedserve.urlUnescape" (dict "s" ($parts._1 | default "") "what" "redis.url") }}
{{- else }}
{{- .Values.redis.password }}
{{- end }}
{{- end }}

{{/* Redis username, same rules: the URL's when redis.url is set, else redis.username. */}}
{{- define "pagedserve.redisUsername" -}}
{{- if .Values.redis.url }}
{{- $parts := splitn ":" 2 (get (urlParse (include "pagedserve.redisURLChecked" .)) "userinfo") }}
{{- include "pagedserve.urlUnescape" (dict "s" ($parts._0 | default "") "what" "redis.url") }}
{{- else }}
{{- .Values.redis.username }}
{{- end }}
{{- end }}

{{/* host:port KEDA polls: keda.address verbatim, else the host of redis.url, else redis.host:redis.port.
A host without a dot is a Service name of the release's namespace: KEDA resolves it in its own namespace,
so it is qualified with the release namespace. IPv6 literals ([...]) stay as they are. */}}
{{- define "pagedserve.redisAddress" -}}
{{- if .Values.keda.address }}
{{- .Values.keda.address }}
{{- else }}
{{- $host := include "pagedserve.redisHost" . }}
{{- $port := include "pagedserve.str" .Values.redis.port }}
{{- if .Values.redis.url }}
{{- $hp := get (urlParse (include "pagedserve.redisURLChecked" .)) "host" }}
{{- $port = "6379" }}
{{- if hasPrefix "[" $hp }}
{{- $host = regexReplaceAll "^(\\[[^\\]]*\\]).*$" $hp "${1}" }}
{{- $rest := trimPrefix $host $hp }}
{{- if hasPrefix ":" $rest }}{{ $port = trimPrefix ":" $rest }}{{ end }}
{{- else }}
{{- $hparts := splitn ":" 2 $hp }}
{{- $host = $hparts._0 }}
{{- if $hparts._1 }}{{ $port = $hparts._1 }}{{ end }}
{{- end }}
{{- end }}
{{- if not (or (contains "." $host) (hasPrefix "[" $host)) }}
{{- $host = printf "%s.%s" $host .Release.Namespace }}
{{- end }}
{{- printf "%s:%s" $host $port }}
{{- end }}
{{- end }}

{{/* Database of redis.url as redis-py reads it: a non-empty ?db= wins over the path (/N); empty when the URL names
neither (database 0). The first non-empty db= counts, as parse_qs hands redis-py the first; a ?db= without a
number fails, as redis-py refuses it. */}}
{{- define "pagedserve.redisURLDatabase" -}}
{{- $u := urlParse (include "pagedserve.redisURLChecked" .) }}
{{- $db := trimPrefix "/" (get $u "path") }}
{{- $found := false }}
{{- range $kv := splitList "&" (get $u "query") }}
{{- $pair := splitn "=" 2 $kv }}
{{- if and (eq $pair._0 "db") $pair._1 (not $found) }}
{{- if not (regexMatch "^[0-9]+$" $pair._1) }}
{{- fail "redis.url: ?db= is not a database number; set it to one (?db=3), or put the number in the path (/3)" }}
{{- end }}
{{- $db = $pair._1 }}
{{- $found = true }}
{{- end }}
{{- end }}
{{- $db }}
{{- end }}

{{/* true when the Redis connection uses TLS. */}}
{{- define "pagedserve.redisTLS" -}}
{{- if .Values.redis.url }}
{{- hasPrefix "rediss://" .Values.redis.url }}
{{- else }}
{{- .Values.redis.tls }}
{{- end }}
{{- end }}

{{/* true when redis.url turns off certificate checks (ssl_cert_reqs=none): KEDA must not check them either. */}}
{{- define "pagedserve.redisUnsafeSSL" -}}
{{- and .Values.redis.url (regexMatch "(^|&)ssl_cert_reqs=none(&|$)" (get (urlParse (include "pagedserve.redisURLChecked" .)) "query")) }}
{{- end }}

{{/* true when an autoscaler owns .spec.replicas. */}}
{{- define "pagedserve.autoscaled" -}}
{{- or .Values.keda.enabled .Values.autoscaling.enabled }}
{{- end }}

{{/* The connection metadata of the chart's KEDA Redis triggers (redis-streams and redis read the same keys):
     address, databaseIndex, TLS. */}}
{{- define "pagedserve.kedaRedisConnection" -}}
address: {{ include "pagedserve.redisAddress" . | quote }}
{{- if not .Values.redis.url }}
databaseIndex: {{ include "pagedserve.str" .Values.redis.db | quote }}
{{- else }}
{{- with include "pagedserve.redisURLDatabase" . }}
databaseIndex: {{ . | quote }}
{{- end }}
{{- end }}
enableTLS: {{ include "pagedserve.redisTLS" . | quote }}
{{- if eq (include "pagedserve.redisUnsafeSSL" .) "true" }}
unsafeSsl: "true"
{{- end }}
{{- end }}

{{- /* A Prometheus duration (1h30m, 15s, 500ms; the schema checks the form) in milliseconds. include returns
text: atoi it before comparing ("9000" > "10000" as strings). */}}
{{- define "pagedserve.durationMs" -}}
{{- $units := dict "y" 31536000000 "w" 604800000 "d" 86400000 "h" 3600000 "m" 60000 "s" 1000 "ms" 1 -}}
{{- $total := 0 -}}
{{- range regexFindAll "[0-9]+(ms|[ywdhms])" . -1 -}}
{{- $digits := regexFind "^[0-9]+" . -}}
{{- $total = add $total (mul (atoi $digits) (get $units (trimPrefix $digits .))) -}}
{{- end -}}
{{- $total -}}
{{- end }}

{{/* PAGEDSERVE_METRICS_HOST that no probe reaches: the kubelet's probes come to the pod's IP, and a worker bound
to the loopback would fail its startup probe for its whole budget, then restart for ever. All interfaces (0.0.0.0,
::, empty) and the pod's own IP ($(POD_IP) from the downward API, or valueFrom) are reachable. */}}
{{- define "pagedserve.refuseMetricsHost" -}}
{{- if and (eq (upper (toString .name)) "PAGEDSERVE_METRICS_HOST") (include "pagedserve.isLoopback" (toString .value)) }}
{{- fail (printf "%s: %q binds the health and metrics port to the loopback, where the kubelet's probes (sent to the pod's IP) and Prometheus cannot reach it: use 0.0.0.0 (the default), :: (IPv6) or the pod's IP, and a NetworkPolicy (networkPolicy.enabled) to limit who reaches the port" .where (toString .value)) }}
{{- end }}
{{- end }}

{{/* "true" when a host is the loopback however it is spelt: names compared without case or a trailing dot (the
resolver reads localhost. as localhost); IPv4 127/8 also as the resolver's inet_aton reads it (127.1, 0177.0.0.1,
0x7f.0.0.1, the one number 2130706433); IPv6 ::1 in any of its spellings (zero groups written out or left out,
leading zeros, brackets, a zone), and IPv4-mapped ::ffff:127.x.y.z (also as ::ffff:7f00:1). Empty otherwise. */}}
{{- define "pagedserve.isLoopback" -}}
{{- $v := trimSuffix "." (lower (trim .)) }}
{{- $ip := regexReplaceAll "%.*$" (trimSuffix "]" (trimPrefix "[" $v)) "" }}
{{- $names := list "localhost" "localhost.localdomain" "localhost4" "localhost4.localdomain4" "localhost6" "localhost6.localdomain6" "ip6-localhost" "ip6-loopback" }}
{{- $mapped := regexReplaceAll "^[0:]*:ffff:" $ip "" }}
{{- $loopback := or (has $v $names) (hasSuffix ".localhost" $v) (hasPrefix "127." $v) }}
{{- if and (ne $mapped $ip) (regexMatch "^7f[0-9a-f]{2}:[0-9a-f]{1,4}$" $mapped) }}
{{- $loopback = true }}
{{- end }}
{{- /* ::1: zero groups, then a last group of 1 (written in full, 8 groups, or shortened with ::) */}}
{{- if and (regexMatch "^[0:]*:(0{0,3}1|0+\\.0+\\.0+\\.0*1)$" $ip) (or (contains "::" $ip) (eq (len (splitList ":" $ip)) 8)) }}
{{- $loopback = true }}
{{- end }}
{{- /* IPv4 as inet_aton reads it: one to four numbers, each decimal, octal (0 first) or hex (0x first); 127 the
first of several, or one number in 127.0.0.0/8 */}}
{{- $parts := splitList "." $mapped }}
{{- if and (le (len $parts) 4) (regexMatch "^((0x[0-9a-f]+|[0-9]+)\\.){0,3}(0x[0-9a-f]+|[0-9]+)$" $mapped) }}
{{- $first := int64 (first $parts) }}
{{- if or (and (gt (len $parts) 1) (eq $first 127)) (and (eq (len $parts) 1) (ge $first 2130706432) (le $first 2147483647)) }}
{{- $loopback = true }}
{{- end }}
{{- end }}
{{- if $loopback }}true{{ end }}
{{- end }}
