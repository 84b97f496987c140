#!/usr/bin/env bash
# Shared flag parsing and command execution for the TPU pod scripts. Sourced, never run directly.
#
# Every script accepts the same flags; each uses the ones it needs:
#   --name=NAME              TPU VM / queued-resource name            (env LSM_TPU_NAME)
#   --zone=ZONE              e.g. us-east5-a                          (env LSM_TPU_ZONE)
#   --project=PROJECT        GCP project (default: gcloud's)          (env LSM_TPU_PROJECT)
#   --accelerator=TYPE       e.g. v4-32, v5litepod-64, v5p-128, v6e-64 (env LSM_TPU_ACCELERATOR)
#   --runtime=VERSION        TPU software version (default per generation, see flags.sh)
#   --gin_file=FILE          experiment gin file, e.g. gin/hgrn2_7b.gin
#   --bucket=gs://BUCKET     where runs live; MODEL_DIR = BUCKET/RUN_NAME
#   --data_dir=PATH          the dataset (DATA_DIR), e.g. gs://bucket/data/corpus from lsm_jax.data.build
#   --gin.NAME=VALUE         passed through to lsm_jax.train (repeatable)
#   --run_name=NAME          default: the gin file's base name
#   --capacity=spot|best-effort|reserved|on-demand   queued-resource capacity (default spot)
#   --retries=N              run.sh: relaunches after preemption or failure (default 10)
#   --repo=DIR               local checkout shipped to the workers (default: this repository)
#   --dry-run                print the exact commands instead of running them
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "${LAUNCH_DIR}/../.." && pwd)"
TPU_NAME="${LSM_TPU_NAME:-}"
TPU_ZONE="${LSM_TPU_ZONE:-}"
TPU_PROJECT="${LSM_TPU_PROJECT:-}"
TPU_ACCELERATOR="${LSM_TPU_ACCELERATOR:-}"
TPU_RUNTIME=""
GIN_FILE=""
BUCKET=""
DATA_DIR=""
GIN_OVERRIDES=()
RUN_NAME=""
CAPACITY="spot"
RETRIES=10
DRY_RUN=0
REMOTE_DIR="lsm_jax"

usage_error() {
  echo "error: $*" >&2
  echo "run with --help for the flags" >&2
  exit 2
}

parse_flags() {
  local arg
  for arg in "$@"; do
    case "${arg}" in
      --name=*) TPU_NAME="${arg#*=}" ;;
      --zone=*) TPU_ZONE="${arg#*=}" ;;
      --project=*) TPU_PROJECT="${arg#*=}" ;;
      --accelerator=*) TPU_ACCELERATOR="${arg#*=}" ;;
      --runtime=*) TPU_RUNTIME="${arg#*=}" ;;
      --gin_file=*) GIN_FILE="${arg#*=}" ;;
      --bucket=*) BUCKET="${arg#*=}" ;;
      --data_dir=*) DATA_DIR="${arg#*=}" ;;
      --gin.*=*) GIN_OVERRIDES+=("${arg}") ;;
      --run_name=*) RUN_NAME="${arg#*=}" ;;
      --capacity=*) CAPACITY="${arg#*=}" ;;
      --retries=*) RETRIES="${arg#*=}" ;;
      --repo=*) REPO_DIR="${arg#*=}" ;;
      --dry-run) DRY_RUN=1 ;;
      --help|-h) sed -n '2,22p' "${LAUNCH_DIR}/common.sh"; exit 0 ;;
      *) usage_error "unknown flag '${arg}'" ;;
    esac
  done
}

require() {
  local flag value
  for flag in "$@"; do
    case "${flag}" in
      name) value="${TPU_NAME}" ;;
      zone) value="${TPU_ZONE}" ;;
      accelerator) value="${TPU_ACCELERATOR}" ;;
      gin_file) value="${GIN_FILE}" ;;
      bucket) value="${BUCKET}" ;;
      data_dir) value="${DATA_DIR}" ;;
    esac
    [[ -n "${value}" ]] || usage_error "--${flag} is required"
  done
  if [[ -n "${GIN_FILE}" && ! -f "${REPO_DIR}/${GIN_FILE}" ]]; then
    usage_error "--gin_file=${GIN_FILE} does not exist under ${REPO_DIR} (valid: a path like gin/hgrn2_7b.gin)"
  fi
  if [[ -n "${BUCKET}" && "${BUCKET}" != gs://* ]]; then
    usage_error "--bucket=${BUCKET} must start with gs:// (Cloud TPU workers share nothing else)"
  fi
  case "${CAPACITY}" in
    spot|best-effort|reserved|on-demand) ;;
    *) usage_error "--capacity=${CAPACITY}; valid: spot, best-effort, reserved, on-demand" ;;
  esac
  [[ "${RETRIES}" =~ ^[0-9]+$ ]] || usage_error "--retries=${RETRIES} must be a non-negative integer"
  if [[ -z "${RUN_NAME}" && -n "${GIN_FILE}" ]]; then
    RUN_NAME="$(basename "${GIN_FILE}" .gin)"
  fi
}

# gcloud flags common to every TPU command.
location_flags() {
  local flags=(--zone="${TPU_ZONE}")
  [[ -n "${TPU_PROJECT}" ]] && flags+=(--project="${TPU_PROJECT}")
  echo "${flags[@]}"
}

# Runs a command, or prints it (shell-quoted, one line) under --dry-run.
run_cmd() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    local quoted=() word
    for word in "$@"; do quoted+=("$(printf '%q' "${word}")"); done
    echo "${quoted[*]}"
  else
    "$@"
  fi
}

# Runs a shell command on every worker of the pod.
on_all_workers() {
  # shellcheck disable=SC2046
  run_cmd gcloud compute tpus tpu-vm ssh "${TPU_NAME}" $(location_flags) --worker=all --command="$1"
}
