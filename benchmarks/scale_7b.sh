#!/usr/bin/env bash
# The rows of benchmarks/results/scale_7b.{json,md}: the paper's 7B experiment files (gin/<arch>_7b.gin: model,
# FSDP over every device, microbatching, loss chunking, optimizer) trained for a few steps on all GPUs of one
# host with synthetic batches of GLOBAL_BATCH_SIZE × 8192 tokens. One process per architecture, so each row's
# peak memory is its own; a shape that runs out of memory is retried with full rematerialisation.
#   bash benchmarks/scale_7b.sh OUT_DIR [ARCH ...]        (default: llama tnl hgrn2 cosformer2)
set -u
out=${1:?usage: benchmarks/scale_7b.sh OUT_DIR [ARCH ...]}
shift
archs=${*:-llama tnl hgrn2 cosformer2}
mkdir -p "$out"
for arch in $archs; do
  timeout "${ROW_TIMEOUT_S:-300}" python3 benchmarks/train_step.py --gin_file "gin/${arch}_7b.gin" \
      --gin "GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-8}" --remat_fallbacks full --steps 3 --warmup 2 --peers '' \
      --out_dir "$out" --name scale_7b --append
done
