#!/usr/bin/env bash
# Runs training on all workers and relaunches after preemption (exit code 75) or failure (1). The run resumes by
# itself from its latest complete checkpoint under MODEL_DIR, so a relaunch loses at most the steps since that
# checkpoint. A user error (exit code 2: bad config, refused resume, MODEL_DIR locked by another trainer, no
# space) is not relaunched: rerunning the same command fails the same way (docs/reliability.md).
# Example: launch/tpu/run.sh --name=lsm-hgrn2 --zone=us-east5-a --accelerator=v5p-128 \
#            --gin_file=gin/hgrn2_7b.gin --bucket=gs://my-bucket/lsm --data_dir=gs://my-bucket/data/corpus
source "$(dirname "$0")/common.sh"
source "$(dirname "$0")/flags.sh"
parse_flags "$@"
require name zone accelerator gin_file bucket data_dir
tpu_generation "${TPU_ACCELERATOR}" >/dev/null || exit 2
model_dir="${BUCKET%/}/${RUN_NAME}"
overrides=""
for override in "${GIN_OVERRIDES[@]}"; do overrides+=" $(printf '%q' "${override}")"; done
# pipefail: the exit code is the trainer's, not tee's.
train_cmd="set -o pipefail; cd ~/${REMOTE_DIR} && export LIBTPU_INIT_ARGS='$(libtpu_init_args "${TPU_ACCELERATOR}")' \
&& python3 -m lsm_jax.train --gin_file=${GIN_FILE} --gin.MODEL_DIR=\"'${model_dir}'\" \
--gin.DATA_DIR=\"'${DATA_DIR}'\"${overrides} 2>&1 | tee -a ~/train.log"

attempt=0
while true; do
  status=0
  on_all_workers "${train_cmd}" || status=$?
  if (( status == 0 )); then
    [[ "${DRY_RUN}" == 1 ]] || echo "training finished: ${model_dir}"
    exit 0
  fi
  if (( status == 2 )); then
    echo "training stopped on a user error (exit code 2, message above): not relaunching" >&2
    exit 2
  fi
  attempt=$((attempt + 1))
  if (( attempt > RETRIES )); then
    echo "giving up after ${RETRIES} relaunches; the checkpoints in ${model_dir} are intact" >&2
    exit 1
  fi
  # A preempted spot pod is gone: recreate it and reinstall before relaunching.
  # shellcheck disable=SC2046
  state=$(gcloud alpha compute tpus queued-resources describe "${TPU_NAME}" $(location_flags) \
            --format='value(state.state)' 2>/dev/null || echo MISSING)
  if [[ "${state}" != ACTIVE ]]; then
    echo "pod ${TPU_NAME} is ${state}: recreating (relaunch ${attempt}/${RETRIES})" >&2
    "$(dirname "$0")/stop.sh" "$@" || true
    "$(dirname "$0")/create.sh" "$@"
    "$(dirname "$0")/setup.sh" "$@"
  else
    echo "training exited with code ${status}; relaunching (${attempt}/${RETRIES})" >&2
    sleep 60
  fi
done
