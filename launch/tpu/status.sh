#!/usr/bin/env bash
# Shows the pod's state and the latest logged training step of the run.
# Example: launch/tpu/status.sh --name=lsm-hgrn2 --zone=us-east5-a --gin_file=gin/hgrn2_7b.gin --bucket=gs://b/lsm
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require name zone
# shellcheck disable=SC2046
run_cmd gcloud alpha compute tpus queued-resources describe "${TPU_NAME}" $(location_flags) --format='value(state.state)'
if [[ -n "${BUCKET}" && -n "${RUN_NAME}" ]]; then
  run_cmd gcloud storage cat "${BUCKET%/}/${RUN_NAME}/metrics.jsonl" | tail -n 1
fi
