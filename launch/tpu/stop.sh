#!/usr/bin/env bash
# Deletes the pod (the queued resource and its node). Checkpoints in the bucket are untouched.
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require name zone
# shellcheck disable=SC2046
run_cmd gcloud alpha compute tpus queued-resources delete "${TPU_NAME}" $(location_flags) --force --quiet
