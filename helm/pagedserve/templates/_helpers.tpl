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

{{/* Redis URL built from the parts when redis.url is empty. */}}
{{- define "pagedserve.redisURL" -}}
{{- if .Values.redis.url }}
{{- .Values.redis.url }}
{{- else }}
{{- if not .Values.redis.host }}
{{- fail "redis: set redis.url, redis.host or redis.existingSecret" }}
{{- end }}
{{- $scheme := ternary "rediss" "redis" .Values.redis.tls }}
{{- $auth := "" }}
{{- if .Values.redis.password }}
{{- $auth = printf "%s:%s@" (.Values.redis.username | urlquery) (.Values.redis.password | urlquery) }}
{{- else if .Values.redis.username }}
{{- $auth = printf "%s@" (.Values.redis.username | urlquery) }}
{{- end }}
{{- printf "%s://%s%s:%v/%v" $scheme $auth .Values.redis.host .Values.redis.port .Values.redis.db }}
{{- end }}
{{- end }}

{{/* Redis stream of requests and consumer group of the workers (CONTRACT §2). */}}
{{- define "pagedserve.stream" -}}
{{- printf "%s:requests" .Values.prefix }}
{{- end }}
{{- define "pagedserve.consumerGroup" -}}
{{- default (printf "%s-workers" .Values.prefix) .Values.keda.consumerGroup }}
{{- end }}

{{/* Drain budget: worker grace + margin. */}}
{{- define "pagedserve.terminationGracePeriodSeconds" -}}
{{- add (int .Values.worker.shutdownGraceSeconds) (int .Values.worker.terminationGraceMarginSeconds) }}
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
{{- if not .Values.opentelemetry.endpoint }}
{{- $_ := set $cfg "OTEL_SDK_DISABLED" "true" }}
{{- end }}
{{- $cfg = merge (deepCopy .Values.extraConfig) $cfg }}
{{- range $k := keys $cfg | sortAlpha }}
{{- $v := get $cfg $k }}
{{- if or (kindIs "bool" $v) (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) $v }}
{{ $k }}: {{ $v | toString | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Redis password: redis.password, else the one inside redis.url (for KEDA's TriggerAuthentication). */}}
{{- define "pagedserve.redisPassword" -}}
{{- if .Values.redis.password }}
{{- .Values.redis.password }}
{{- else if .Values.redis.url }}
{{- $u := urlParse .Values.redis.url }}
{{- $parts := splitn ":" 2 (get $u "userinfo") }}
{{- $parts._1 | default "" }}
{{- end }}
{{- end }}

{{/* Redis username, same rules. */}}
{{- define "pagedserve.redisUsername" -}}
{{- if .Values.redis.username }}
{{- .Values.redis.username }}
{{- else if .Values.redis.url }}
{{- $u := urlParse .Values.redis.url }}
{{- $parts := splitn ":" 2 (get $u "userinfo") }}
{{- $parts._0 | default "" }}
{{- end }}
{{- end }}

{{/* host:port KEDA polls: keda.address, else the host of redis.url, else redis.host:redis.port. */}}
{{- define "pagedserve.redisAddress" -}}
{{- if .Values.keda.address }}
{{- .Values.keda.address }}
{{- else if .Values.redis.url }}
{{- $u := urlParse .Values.redis.url }}
{{- $h := get $u "host" }}
{{- if contains ":" $h }}{{ $h }}{{ else }}{{ printf "%s:6379" $h }}{{ end }}
{{- else }}
{{- printf "%s:%v" .Values.redis.host .Values.redis.port }}
{{- end }}
{{- end }}

{{/* true when the Redis connection uses TLS. */}}
{{- define "pagedserve.redisTLS" -}}
{{- if .Values.redis.url }}
{{- hasPrefix "rediss://" .Values.redis.url }}
{{- else }}
{{- .Values.redis.tls }}
{{- end }}
{{- end }}

{{/* true when an autoscaler owns .spec.replicas. */}}
{{- define "pagedserve.autoscaled" -}}
{{- or .Values.keda.enabled .Values.autoscaling.enabled }}
{{- end }}
