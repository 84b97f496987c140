#!/usr/bin/env bash
# The rows of benchmarks/results/scale_7b.{json,md}: the paper's 7B experiment files (gin/<arch>_7b.gin: model,
# FSDP over every device, microbatching, loss chunking, optimizer) trained for a few steps on all GPUs of one
# host with synthetic batches of GLOBAL_BATCH_SIZE × 8192 tokens. One process per architecture, so each row's
# peak memory is its own; a row that runs out of memory is retried with full rematerialisation.
#   bash benchmarks/scale_7b.sh OUT_DIR [ARCH ...]        (default: llama tnl hgrn2 cosformer2)
set -u
out=${1:?usage: benchmarks/scale_7b.sh OUT_DIR [ARCH ...]}
shift
archs=${*:-llama tnl hgrn2 cosformer2}
batch=${GLOBAL_BATCH_SIZE:-8}
mkdir -p "$out"
measure() {  # arch, extra gin binding...
  local arch=$1
  shift
  timeout "${ROW_TIMEOUT_S:-300}" python3 benchmarks/train_step.py --gin_file "gin/${arch}_7b.gin" \
      --gin "GLOBAL_BATCH_SIZE=$batch" "$@" --steps 3 --warmup 2 --peers '' --out_dir "$out" --name scale_7b --append
}
last_row_out_of_memory() {
  python3 -c 'import json, sys; e = json.load(open(sys.argv[1]))["rows"][-1].get("error", "")
sys.exit(0 if "RESOURCE_EXHAUSTED" in e or "out of memory" in e.lower() else 1)' "$out/scale_7b.json"
}
for arch in $archs; do
  measure "$arch"
  if last_row_out_of_memory; then
    measure "$arch" --gin "configs.ModelConfig.remat_policy='full'"
  fi
done
