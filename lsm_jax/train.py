r"""Command-line entry point: gin files and bindings → `lsm_jax.trainer.train()`.

  python -m lsm_jax.train --gin_file=gin/hgrn2_7b.gin --gin.MODEL_DIR="'/runs/hgrn2_7b'" \
      [--gin_file=more.gin ...] [--gin_bindings='trainer.train.eval_every_steps = 500'] [--gin.TRAIN_STEPS=1000]

T5X conventions: --gin_file repeats and later files win; bindings apply after all files, in order;
`--gin.NAME=VALUE` is sugar for `--gin_bindings='NAME = VALUE'` (strings need their quotes). Relative gin paths
and `include 'gin/...'` resolve against the current directory and then the shipped configs (the checkout's
root, or the installed package's copy of gin/). Gin configures the library function `lsm_jax.trainer.train`
(dynamic registration), never this module, so tests can parse the same files and call the trainer in-process.
"""
import logging as std_logging
import os
import sys
from typing import Sequence

import gin
import jax
from absl import app
from absl import flags
from absl import logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(_PACKAGE_DIR)


def _find_config_root() -> str:
  """The directory whose `gin/` holds the shipped configs: the checkout's root, or the installed package (a wheel
  carries gin/ inside lsm_jax/, see setup.py)."""
  for root in (REPO_ROOT, _PACKAGE_DIR):
    if os.path.isfile(os.path.join(root, "gin", "runs", "pretrain.gin")):
      return root
  return REPO_ROOT


CONFIG_ROOT = _find_config_root()


def _define_flags() -> None:
  """Defined when the CLI runs, not at import, so modules that import parse_gin may define their own flags."""
  flags.DEFINE_multi_string("gin_file", [], "Gin config file; repeatable, later files override earlier.")
  flags.DEFINE_multi_string("gin_bindings", [], "Gin binding, e.g. 'TRAIN_STEPS = 100'; repeatable.")
  flags.DEFINE_list("gin_search_paths", [], "Extra directories for gin files and includes.")
  flags.DEFINE_enum(
      "multiprocess", "auto", ["auto", "on", "off"],
      "Call jax.distributed.initialize(): 'auto' does when the environment shows several processes (a JAX "
      "coordinator address, SLURM or Open MPI with more than one task, or a multi-host TPU slice).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """Rewrites `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE` (before absl parses the flags)."""
  rewritten = []
  for arg in argv:
    if arg.startswith("--gin."):
      name, separator, value = arg[len("--gin."):].partition("=")
      if not separator or not name:
        raise ValueError(f"gin override {arg!r} must look like --gin.NAME=VALUE")
      arg = f"--gin_bindings={name} = {value}"
    rewritten.append(arg)
  return rewritten


def gin_search_paths(extra: Sequence[str] = ()) -> list[str]:
  return [*extra, ".", CONFIG_ROOT]


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str], search_paths: Sequence[str] = ()) -> None:
  """Parses files then bindings strictly: unknown configurables, parameters and unset required macros raise."""
  for path in gin_search_paths(search_paths):
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings), skip_unknown=False,
                                      finalize_config=True)


def multiprocess_requested(environ=os.environ) -> bool:
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for count_variable in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(environ.get(count_variable, "1") or "1") > 1:
      return True
  tpu_hosts = [host for host in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if host]
  return len(tpu_hosts) > 1


def maybe_initialize_distributed(mode: str, coordinator_address: str | None, num_processes: int | None,
                                 process_id: int | None) -> None:
  if mode == "off" or (mode == "auto" and coordinator_address is None and not multiprocess_requested()):
    return
  # Must precede every JAX computation; importing jax does not start a backend.
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


class _DropLibraryInfo(std_logging.Filter):
  """Drops INFO chatter of Orbax (dozens of lines per save); its warnings and errors still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  flag_values = flags.FLAGS
  if not flag_values.gin_file:
    raise app.UsageError("give at least one --gin_file (e.g. --gin_file=gin/smoke/hgrn2.gin)")
  logging.get_absl_handler().addFilter(_DropLibraryInfo())
  # Gin first: a misspelled binding or a missing macro fails before any JAX device is touched.
  from lsm_jax import trainer
  parse_gin(flag_values.gin_file, flag_values.gin_bindings, flag_values.gin_search_paths)
  maybe_initialize_distributed(flag_values.multiprocess, flag_values.coordinator_address,
                               flag_values.num_processes, flag_values.process_id)
  logging.info("gin config:\n%s", gin.config_str())
  gin.get_configurable(trainer.train)(config_text=gin.config_str())


def run() -> None:
  _define_flags()
  app.run(main, argv=rewrite_gin_args(sys.argv))


if __name__ == "__main__":
  run()
