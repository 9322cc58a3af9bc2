{{/* Names and labels shared by every template. */}}
{{- define "whisper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "whisper.fullname" -}}
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

{{- define "whisper.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "whisper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include with (list $ "gateway"). */}}
{{- define "whisper.selectorLabels" -}}
{{- $top := index . 0 -}}
app.kubernetes.io/name: {{ include "whisper.name" $top }}
app.kubernetes.io/instance: {{ $top.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "whisper.serviceAccountName" -}}
{{- $top := index . 0 -}}
{{- $component := index . 1 -}}
{{- (index $top.Values $component).serviceAccount.name | default (printf "%s-%s" (include "whisper.fullname" $top) $component) }}
{{- end }}

{{- define "whisper.gatewayImage" -}}
{{ .Values.image.gateway.repository }}:{{ .Values.image.gateway.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "whisper.transcriberImage" -}}
{{ .Values.image.transcriber.repository }}:{{ .Values.image.transcriber.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "whisper.requiredBlobUrl" -}}
{{- required "config.blobUrl is required: gs://BUCKET/PREFIX (see docs/deploy-gke.md)" .Values.config.blobUrl }}
{{- end }}

{{/* Each Secret reaches only the containers that use it: the database URL the gateway, the
operator and the migration Job; the code key the gateway (which redeems codes) and the operator
(which mints them); the admin token the gateway alone. */}}
{{- define "whisper.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.key }}
{{- end }}

{{- define "whisper.codeSecretEnv" -}}
- name: WHISPER_CODE_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .Values.codeSecret.existingSecret }}
      key: {{ .Values.codeSecret.key }}
{{- end }}

{{/* The root filesystem is read-only: state and caches go to the pod's emptyDirs. */}}
{{- define "whisper.writableEnv" -}}
- name: WHISPER_DATA_DIR
  value: /data
- name: HOME
  value: /tmp
{{- end }}

{{/* The Cloud SQL Auth Proxy as a native sidecar: it starts first and stops after the app. */}}
{{- define "whisper.cloudSqlProxy" -}}
{{- if .Values.cloudSqlProxy.enabled }}
- name: cloud-sql-proxy
  image: {{ .Values.cloudSqlProxy.image }}
  restartPolicy: Always
  args:
    - --structured-logs
    - --port={{ .Values.cloudSqlProxy.port }}
    - --health-check
    - --http-address=0.0.0.0
    - --http-port=9090
    {{- if .Values.cloudSqlProxy.privateIp }}
    - --private-ip
    {{- end }}
    {{- if .Values.cloudSqlProxy.autoIamAuthn }}
    - --auto-iam-authn
    {{- end }}
    - {{ required "cloudSqlProxy.instanceConnectionName is required when cloudSqlProxy.enabled" .Values.cloudSqlProxy.instanceConnectionName | quote }}
  startupProbe:
    httpGet:
      path: /startup
      port: 9090
    periodSeconds: 1
    failureThreshold: 60
  livenessProbe:
    httpGet:
      path: /liveness
      port: 9090
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml .Values.cloudSqlProxy.resources | nindent 4 }}
{{- end }}
{{- end }}

{{- define "whisper.podSecurityContext" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* The metrics port of a component, include with (list $ "gateway"): it must differ from the
other ports its pod listens on, the Cloud SQL proxy sidecar's included (they share one network
namespace, so a clash leaves one process unable to start). */}}
{{- define "whisper.metricsPort" -}}
{{- $top := index . 0 -}}
{{- $component := index . 1 -}}
{{- $port := int (index $top.Values $component).metricsPort -}}
{{- $taken := dict "gateway.containerPort" $top.Values.gateway.containerPort -}}
{{- if eq $component "operator" -}}
{{- $taken = dict "operator.livenessPort" $top.Values.operator.livenessPort -}}
{{- end -}}
{{- if $top.Values.cloudSqlProxy.enabled -}}
{{- $_ := set $taken "the Cloud SQL proxy's health port" 9090 -}}
{{- $_ := set $taken "cloudSqlProxy.port" $top.Values.cloudSqlProxy.port -}}
{{- end -}}
{{- range $name, $other := $taken -}}
{{- if and $port (eq $port (int $other)) -}}
{{- fail (printf "%s.metricsPort %d is also %s: give the metrics another port" $component $port $name) -}}
{{- end -}}
{{- end -}}
{{- $port -}}
{{- end }}

{{- define "whisper.metricsEnv" -}}
- name: WHISPER_METRICS_PORT
  value: {{ . | quote }}
{{- /* Reached through its Service by the scraper, so on every address of the pod. */}}
- name: WHISPER_METRICS_HOST
  value: 0.0.0.0
{{- end }}

{{/* A ClusterIP Service of a component's metrics port alone, include with (list $ "gateway"):
apart from the public Service, so no Ingress, route or load balancer ever reaches /metrics. */}}
{{- define "whisper.metricsService" -}}
{{- $top := index . 0 -}}
{{- $component := index . 1 -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "whisper.fullname" $top }}-{{ $component }}-metrics
  namespace: {{ $top.Release.Namespace }}
  labels:
    {{- include "whisper.labels" $top | nindent 4 }}
    app.kubernetes.io/component: {{ $component }}
    transcription.whisper.dev/metrics: "true"
spec:
  type: ClusterIP
  selector:
    {{- include "whisper.selectorLabels" (list $top $component) | nindent 4 }}
  ports:
    - name: metrics
      port: {{ include "whisper.metricsPort" (list $top $component) }}
      targetPort: metrics
      protocol: TCP
{{- end }}

{{/* The NetworkPolicy ingress rule of a component's metrics port, include with (list $
"gateway"); nothing when the port is off or no peer is named. */}}
{{- define "whisper.metricsIngress" -}}
{{- $top := index . 0 -}}
{{- $port := include "whisper.metricsPort" . | int -}}
{{- if and $port $top.Values.networkPolicy.metricsFrom -}}
- ports:
    - port: {{ $port }}
      protocol: TCP
  from:
    {{- toYaml $top.Values.networkPolicy.metricsFrom | nindent 4 }}
{{- end }}
{{- end }}

{{/* The alerts, as the "groups" of a PrometheusRule or a GKE Managed Prometheus Rules. Each
expression is scoped to the release's namespace, so two releases in one Prometheus stay apart;
the tests check that every metric they name exists. */}}
{{- define "whisper.alertGroups" -}}
{{- $ns := printf "namespace=%q" .Release.Namespace -}}
{{- with .Values.metrics.alerts -}}
groups:
  - name: whisper
    rules:
      - alert: WhisperJobsStuckQueued
        # Jobs are queued and not one has started for a whole queueWaitSeconds.
        expr: >-
          max(whisper_jobs{ {{- $ns }},status="queued"}) > 0
          unless sum(increase(whisper_job_queue_wait_seconds_count{ {{- $ns -}} }[{{ int .queueWaitSeconds }}s])) > 0
        for: 5m
        labels:
          severity: critical
        annotations:
          summary: >-
            Transcription jobs are queued and none has started for a while.
          description: >-
            {{`{{ $value }}`}} jobs are queued and none started in {{ int .queueWaitSeconds }} s; check the operator's log, its Jobs (kubectl get jobs) and their pods' events.
      - alert: WhisperQueueWaitHigh
        expr: >-
          histogram_quantile(0.9, sum by (le) (rate(whisper_job_queue_wait_seconds_bucket{ {{- $ns -}} }[30m])))
          > {{ .queueWaitSeconds }}
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: >-
            Jobs wait long before they start.
          description: >-
            90% of recent jobs started within {{`{{ $value | humanizeDuration }}`}} of submission, more than {{ int .queueWaitSeconds }} s; raise operator.maxRunningJobs or the cluster's capacity.
      - alert: WhisperAdmissionStalled
        # Queued TranscriptionJobs while the cap leaves room (or there is none): the operator
        # cannot create Jobs.
        expr: >-
          max(whisper_operator_admission_queue{ {{- $ns -}} }) > 0
          and (max(whisper_operator_jobs_running{ {{- $ns -}} }) < max(whisper_operator_admission_cap{ {{- $ns -}} })
          or max(whisper_operator_admission_cap{ {{- $ns -}} }) == 0)
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: >-
            The operator admits no Jobs although slots are free.
          description: >-
            {{`{{ $value }}`}} TranscriptionJobs wait while fewer Jobs than the cap run; check the operator's log and Events (a quota or RBAC refusal).
      - alert: WhisperSettlementLagHigh
        expr: >-
          histogram_quantile(0.9, sum by (le) (rate(whisper_operator_settlement_lag_seconds_bucket{ {{- $ns -}} }[15m])))
          > {{ .settlementLagSeconds }}
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: >-
            Finished Jobs take long to be settled.
          description: >-
            90% of recent settlements came within {{`{{ $value | humanizeDuration }}`}} of their Job's end, more than {{ int .settlementLagSeconds }} s; the operator or its database is slow or failing.
      - alert: WhisperJobFailureRatioHigh
        # Jobs refused for their audio are the client's doing, not the service's.
        expr: >-
          sum(rate(whisper_jobs_finished_total{ {{- $ns }},outcome="failed",error!~"audio_.*"}[30m]))
          / sum(rate(whisper_jobs_finished_total{ {{- $ns -}} }[30m]))
          > {{ .failureRatio }}
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: >-
            Many transcription jobs fail.
          description: >-
            {{`{{ $value | humanizePercentage }}`}} of the jobs finished in the last 30 minutes failed (audio refusals aside); whisper_jobs_finished_total's error label says why.
      - alert: WhisperGatewayErrorRatioHigh
        expr: >-
          sum(rate(whisper_http_requests_total{ {{- $ns }},status=~"5.."}[10m]))
          / sum(rate(whisper_http_requests_total{ {{- $ns -}} }[10m]))
          > {{ .serverErrorRatio }}
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: >-
            The gateway answers many requests with a server error.
          description: >-
            {{`{{ $value | humanizePercentage }}`}} of the gateway's answers in the last 10 minutes were 5xx; check the gateway's log and its database.
      - alert: WhisperOperatorNotReconciling
        # 0 until the first pass succeeds, and absent while the operator is down.
        expr: >-
          time() - max(whisper_operator_last_reconcile_timestamp_seconds{ {{- $ns -}} }) > {{ int .reconcileStaleSeconds }}
          or absent(whisper_operator_last_reconcile_timestamp_seconds{ {{- $ns -}} })
        for: 5m
        labels:
          severity: critical
        annotations:
          summary: >-
            The operator has not reconciled for a while.
          description: >-
            No reconciliation pass has succeeded for {{ int .reconcileStaleSeconds }} s or more, so no Job is admitted or settled; check the operator's pod, its log and its database.
      - alert: WhisperOperatorReconcileErrors
        expr: sum(increase(whisper_operator_reconcile_errors_total{ {{- $ns -}} }[15m])) > 0
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: >-
            The operator's reconciliation keeps failing.
          description: >-
            {{`{{ $value }}`}} failed reconciliation passes or steps in 15 minutes, retried with backoff; the operator's log names them.
{{- end }}
{{- end }}
