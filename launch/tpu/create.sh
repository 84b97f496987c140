#!/usr/bin/env bash
# Creates the TPU pod as a queued resource and waits until it is ACTIVE.
# Example: launch/tpu/create.sh --name=lsm-hgrn2 --zone=us-east5-a --accelerator=v5p-128 --capacity=spot
source "$(dirname "$0")/common.sh"
source "$(dirname "$0")/flags.sh"
parse_flags "$@"
require name zone accelerator
tpu_generation "${TPU_ACCELERATOR}" >/dev/null || exit 2
runtime="${TPU_RUNTIME:-$(default_runtime_version "${TPU_ACCELERATOR}")}"
capacity_flag=()
[[ "${CAPACITY}" != on-demand ]] && capacity_flag=(--"${CAPACITY}")
# shellcheck disable=SC2046
run_cmd gcloud alpha compute tpus queued-resources create "${TPU_NAME}" $(location_flags) \
  --node-id="${TPU_NAME}" --accelerator-type="${TPU_ACCELERATOR}" --runtime-version="${runtime}" \
  "${capacity_flag[@]}"
if [[ "${DRY_RUN}" == 0 ]]; then
  # Queued resources can wait for capacity for a long time; poll until the node is usable.
  until state=$(gcloud alpha compute tpus queued-resources describe "${TPU_NAME}" $(location_flags) \
                  --format='value(state.state)') && [[ "${state}" == ACTIVE ]]; do
    case "${state:-}" in FAILED|SUSPENDED) echo "queued resource ${TPU_NAME} is ${state}" >&2; exit 1 ;; esac
    echo "waiting for ${TPU_NAME}: ${state:-unknown}"; sleep 30
  done
fi
