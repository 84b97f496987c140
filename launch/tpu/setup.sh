#!/usr/bin/env bash
# Ships this checkout to every worker and installs lsm_jax with JAX for TPU.
# Example: launch/tpu/setup.sh --name=lsm-hgrn2 --zone=us-east5-a
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require name zone
bundle="/tmp/lsm_jax_${TPU_NAME}.tar.gz"
run_cmd tar -czf "${bundle}" -C "${REPO_DIR}" --exclude=.git --exclude=.whl --exclude=runs .
# shellcheck disable=SC2046
run_cmd gcloud compute tpus tpu-vm scp "${bundle}" "${TPU_NAME}:~/lsm_jax.tar.gz" $(location_flags) --worker=all
on_all_workers "rm -rf ~/${REMOTE_DIR} && mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/lsm_jax.tar.gz -C ~/${REMOTE_DIR} \
&& python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e ~/${REMOTE_DIR}"
