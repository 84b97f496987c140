r"""Command-line entry point: gin files and bindings → `lsm_jax.trainer.train()`.

  python -m lsm_jax.train --gin_file=gin/hgrn2_7b.gin --gin.MODEL_DIR="'/runs/hgrn2_7b'" \
      [--gin_file=more.gin ...] [--gin_bindings='trainer.train.eval_every_steps = 500'] [--gin.TRAIN_STEPS=1000]

T5X conventions: --gin_file repeats and later files win; bindings apply after all files, in order;
`--gin.NAME=VALUE` is sugar for `--gin_bindings='NAME = VALUE'` (strings need their quotes). Relative gin paths
and `include 'gin/...'` resolve against the current directory and then the shipped configs (the checkout's
root, or the installed package's copy of gin/). Gin configures the library function `lsm_jax.trainer.train`
(dynamic registration), never this module, so tests can parse the same files and call the trainer in-process.
A binding of a bare macro name that no gin file defines (`--gin.TRAIN_STEP=3`) is an error, like a misspelled
parameter.

Exit codes (lsm_jax/errors.py, docs/reliability.md): 0 finished, 1 failed, 2 user error (one message, no
traceback unless --verbose or LSM_JAX_VERBOSE=1), 75 preempted after saving a checkpoint (relaunch to resume).
"""

import difflib
import errno
import logging as std_logging
import os
import re
import sys
import traceback
from typing import Sequence

import gin
import jax
from absl import app, flags, logging

from lsm_jax import errors

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
    "multiprocess",
    "auto",
    ["auto", "on", "off"],
    "Call jax.distributed.initialize(): 'auto' does when the environment shows several processes (a JAX "
    "coordinator address, SLURM or Open MPI with more than one task, or a multi-host TPU slice).",
  )
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
  flags.DEFINE_boolean("verbose", False, "Print the traceback of user errors too (also: LSM_JAX_VERBOSE=1).")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """Rewrites `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE` (before absl parses the flags)."""
  rewritten = []
  for arg in argv:
    if arg.startswith("--gin."):
      name, separator, value = arg[len("--gin.") :].partition("=")
      if not separator or not name:
        raise ValueError(f"gin override {arg!r} must look like --gin.NAME=VALUE")
      arg = f"--gin_bindings={name} = {value}"
    rewritten.append(arg)
  return rewritten


def gin_search_paths(extra: Sequence[str] = ()) -> list[str]:
  return [*extra, ".", CONFIG_ROOT]


def _macros_of_parsed_files() -> set[str]:
  """Macros the parsed files define (`NAME = value`) or use (`%NAME`, e.g. MODEL_CONFIG set by a model file)."""
  macros = set()

  def collect_uses(value):
    if isinstance(value, gin.config.ConfigurableReference) and value.scoped_selector.endswith("/gin.macro"):
      macros.add(value.scoped_selector.rsplit("/", 1)[0])
    elif isinstance(value, (list, tuple, set)):
      for item in value:
        collect_uses(item)
    elif isinstance(value, dict):
      for item in value.values():
        collect_uses(item)

  # Gin keeps `NAME = value` as a binding of the configurable "gin.macro" under scope NAME.
  for (scope, selector), arguments in gin.config._CONFIG.items():  # pylint: disable=protected-access
    if selector == "gin.macro":
      macros.add(scope)
    collect_uses(arguments)
  return macros


def _binding_statements(binding: str) -> list:
  """The parsed statements of one command-line binding; ValueError naming it when it does not parse."""
  try:
    return list(gin.config_parser.ConfigParser(binding, gin.config.ParserDelegate(skip_unknown=True)))
  except SyntaxError as error:
    raise ValueError(
      f"binding {binding.strip()!r} does not parse as gin (NAME = VALUE with a Python literal, @configurable or "
      f"%MACRO value); a string value needs quotes that reach gin, inside the shell's: "
      f"--gin.MODEL_DIR=\"'/runs/x'\"."
    ) from error


def _check_gin_files_exist(gin_files: Sequence[str], search_paths: Sequence[str]) -> None:
  """FileNotFoundError naming a --gin_file found under none of the search paths, with the closest existing names."""
  roots = ["", *search_paths]  # "" as gin tries it first: the path as given
  for name in gin_files:
    if any(os.path.isfile(os.path.join(root, name)) for root in roots):
      continue
    known = {
      os.path.relpath(os.path.join(directory, file), root)
      for root in search_paths
      if os.path.isdir(os.path.join(root, "gin"))
      for directory, _, files in os.walk(os.path.join(root, "gin"))
      for file in files
      if file.endswith(".gin")
    }
    close = difflib.get_close_matches(name, sorted(known), n=3)
    raise FileNotFoundError(
      f"gin file {name!r} not found in the working directory or {[root for root in search_paths if root != '.']}"
      f"{'; did you mean ' + ' or '.join(close) + '?' if close else ''}"
    )


def check_macro_bindings(gin_bindings: Sequence[str]) -> None:
  """Raises ValueError for a binding of a bare macro name that the parsed gin files neither define nor use.

  Call after parsing the files and before the bindings: gin itself accepts any new macro, so a misspelled
  `--gin.TRAIN_STEP=3` would silently do nothing. A macro that another binding uses (`%NAME`) is allowed.
  """
  defined = _macros_of_parsed_files()
  used_by_bindings = set(re.findall(r"%([A-Za-z_]\w*)", "\n".join(gin_bindings)))
  for binding in gin_bindings:
    for statement in _binding_statements(binding):
      if not isinstance(statement, gin.config_parser.BindingStatement) or statement.arg_name or statement.scope:
        continue
      name = statement.selector
      if name in defined or name in used_by_bindings:
        continue
      close = difflib.get_close_matches(name, defined, n=1)
      raise ValueError(
        f"binding {binding.strip()!r} sets the macro {name}, which no gin file defines or uses"
        f"{f'; did you mean {close[0]}?' if close else '.'} Macros of the files: "
        f"{', '.join(sorted(defined)) or 'none'}"
      )


def parse_gin(
  gin_files: Sequence[str], gin_bindings: Sequence[str], search_paths: Sequence[str] = (), *, finalize: bool = True
) -> None:
  """Parses files then bindings strictly: missing files, syntax errors, unknown configurables, parameters and
  macros no file defines raise; so do unset required macros, when `finalize`."""
  paths = gin_search_paths(search_paths)
  for path in paths:
    gin.add_config_file_search_path(path)
  _check_gin_files_exist(gin_files, paths)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), None, skip_unknown=False, finalize_config=False)
  except OSError as error:  # gin's IOError for an `include` it cannot find
    raise FileNotFoundError(str(error)) from error
  except SyntaxError as error:
    raise ValueError(f"{error.filename}, line {error.lineno}: {error.msg}: {(error.text or '').strip()!r}") from error
  check_macro_bindings(gin_bindings)
  gin.parse_config_files_and_bindings(None, list(gin_bindings), skip_unknown=False, finalize_config=finalize)


def multiprocess_requested(environ=os.environ) -> bool:
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for count_variable in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(environ.get(count_variable, "1") or "1") > 1:
      return True
  tpu_hosts = [host for host in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if host]
  return len(tpu_hosts) > 1


def maybe_initialize_distributed(
  mode: str, coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
  if mode == "off" or (mode == "auto" and coordinator_address is None and not multiprocess_requested()):
    return
  # Must precede every JAX computation; importing jax does not start a backend.
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


class _DropLibraryInfo(std_logging.Filter):
  """Drops INFO chatter of Orbax (dozens of lines per save); its warnings and errors still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def _causes(error: BaseException):
  while error is not None:
    yield error
    error = error.__cause__ or error.__context__


def exit_code_and_message(error: Exception, training_started: bool) -> tuple[int, str | None]:
  """The exit code for `error` and its one-line message (None: an unexpected failure, show the traceback)."""
  if isinstance(error, errors.UserError):
    return errors.EXIT_USER_ERROR, str(error)
  for cause in _causes(error):
    if (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or "No space left on device" in str(cause):
      return errors.EXIT_USER_ERROR, (
        f"no space left on the device: {str(cause)[:500]}. Free space where "
        f"MODEL_DIR lives (or choose another MODEL_DIR) and rerun: the run resumes "
        f"from its last complete checkpoint."
      )
  if not training_started and "RESOURCE_EXHAUSTED" in str(error):
    return errors.EXIT_USER_ERROR, (
      f"the training step does not fit in device memory: {str(error)[:500]}. Try a "
      f"smaller PER_SHARD_MICROBATCH_SIZE, a ModelConfig.remat_policy, more fsdp "
      f"shards (gin/mesh/), or python -m lsm_jax.aot to size the plan first."
    )
  if not training_started and isinstance(error, (ValueError, TypeError, FileNotFoundError)):
    return errors.EXIT_USER_ERROR, str(error)
  if isinstance(error, errors.NonFiniteLossError):
    return errors.EXIT_FAILED, str(error)
  return errors.EXIT_FAILED, None


def _train(flag_values) -> dict:
  # Gin first: a misspelled binding or a missing macro fails before any JAX device is touched.
  from lsm_jax import trainer

  parse_gin(flag_values.gin_file, flag_values.gin_bindings, flag_values.gin_search_paths)
  maybe_initialize_distributed(
    flag_values.multiprocess, flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id
  )
  logging.info("gin config:\n%s", gin.config_str())
  return gin.get_configurable(trainer.train)(config_text=gin.config_str())


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}", exitcode=errors.EXIT_USER_ERROR)
  flag_values = flags.FLAGS
  if not flag_values.gin_file:
    raise app.UsageError(
      "give at least one --gin_file (e.g. --gin_file=gin/smoke/hgrn2.gin)", exitcode=errors.EXIT_USER_ERROR
    )
  logging.get_absl_handler().addFilter(_DropLibraryInfo())
  verbose = flag_values.verbose or os.environ.get("LSM_JAX_VERBOSE", "0") not in ("", "0")
  try:
    summary = _train(flag_values)
  except Exception as error:  # pylint: disable=broad-except  (every error leaves through one exit code)
    trainer = sys.modules.get("lsm_jax.trainer")  # None when importing it failed
    code, message = exit_code_and_message(error, trainer is not None and trainer.training_loop_started())
    if message is None or verbose:
      traceback.print_exc()
    if message is not None:
      message = message.split("\n  In call to configurable")[0]  # gin's note on where the call came from
      kind = "user error" if code == errors.EXIT_USER_ERROR else "error"
      print(f"{kind}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
  if summary.get("preempted"):
    logging.warning(
      "preempted at step %d with its checkpoint saved; exiting with %d (relaunch to resume)",
      summary["step"],
      errors.EXIT_PREEMPTED,
    )
    sys.exit(errors.EXIT_PREEMPTED)


def run() -> None:
  _define_flags()
  app.run(main, argv=rewrite_gin_args(sys.argv))


if __name__ == "__main__":
  run()
