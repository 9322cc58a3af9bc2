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
