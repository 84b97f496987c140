#!/usr/bin/env bash
# TPU-generation settings in one place: the default software version and the XLA/libtpu flags.
# The flags are the latency-hiding and collective-overlap options MaxText's per-generation recipes use for
# FSDP-style dense training; tune here, not in the run scripts.

tpu_generation() {
  case "$1" in
    v4-*) echo v4 ;;
    v5litepod-*|v5e-*) echo v5e ;;
    v5p-*) echo v5p ;;
    v6e-*) echo v6e ;;
    *) echo "error: unknown accelerator type '$1'; valid prefixes: v4-, v5litepod-/v5e-, v5p-, v6e-" >&2; return 2 ;;
  esac
}

default_runtime_version() {
  case "$(tpu_generation "$1")" in
    v4) echo tpu-ubuntu2204-base ;;
    v5e) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
  esac
}

libtpu_init_args() {
  local common="--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true"
  case "$(tpu_generation "$1")" in
    v4) echo "${common}" ;;
    v5e) echo "${common} --xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true" ;;
    v5p) echo "${common} --xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true --xla_enable_async_reduce_scatter=true" ;;
    v6e) echo "${common} --xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true --xla_enable_async_reduce_scatter=true --xla_tpu_scoped_vmem_limit_kib=98304" ;;
  esac
}
