"""Exceptions a launcher can act on, and the exit codes `python -m lsm_jax.train` maps them to.

  0   finished: TRAIN_STEPS reached (or the run was already finished): done.
  1   failed: an unexpected error, or a non-finite loss one roll back did not cure: inspect; a relaunch resumes.
  2   user error: bad gin/config, refused resume, locked MODEL_DIR, no space, memory too small: fix, do not relaunch.
  75  preempted: SIGTERM (or JAX's preemption notice) arrived and a checkpoint was saved: relaunch.

75 is EX_TEMPFAIL of BSD's sysexits.h ("try again later"). User errors print one line without a traceback;
`--verbose` or LSM_JAX_VERBOSE=1 prints the traceback too. `python -m lsm_jax.export` and `python -m
lsm_jax.evaluate` use 0, 1 and 2 the same way, through `exit_with`.
"""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_FINISHED = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75


class LsmJaxError(Exception):
  """Base of the errors lsm_jax raises on purpose."""


class UserError(LsmJaxError):
  """A problem the user fixes (configuration, run directory, resources); exits with EXIT_USER_ERROR."""


class RunLockedError(UserError):
  """Another live trainer holds MODEL_DIR's lock."""


class ConfigChangeError(UserError):
  """Resuming a run with a configuration that changes its meaning (shape, tokenizer, data, batch, seed)."""


class NonFiniteLossError(LsmJaxError, FloatingPointError):
  """The loss became NaN or infinite and rolling back to an intact checkpoint did not help."""


def exit_with(code: int, message: str) -> NoReturn:
  """Ends a command-line tool with `code` after one line, `error: MESSAGE`, on stderr (no traceback)."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)
