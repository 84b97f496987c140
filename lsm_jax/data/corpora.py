"""The embedded default corpus: real English text that ships with every Python installation, no download.

Documents, in this order (about 2 MB of text on CPython 3.11):
  * each topic of the Python reference/help text in `pydoc_data.topics` (the `help()` pages);
  * for each pure-Python standard-library module (tests, IDLE, tkinter and demos left out), its module, class
    and function docstrings joined by blank lines;
  * the Python license (LICENSE.txt), when the installation has it.
The text differs between Python versions, so the cache key includes the interpreter version.

It is built on first use (`embedded_dataset_dir`) with `lsm_jax.data.build` into
$LSM_JAX_CACHE_DIR/embedded/ (default ~/.cache/lsm_jax, or $XDG_CACHE_HOME/lsm_jax) and reused after. Each build
goes to a private temporary directory that is renamed into place atomically, so concurrent first uses by
several processes are safe: the first rename wins and the others discard their copy. A process killed while
building leaves its temporary directory behind, with the owner's host and pid; the next build removes it.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile

from lsm_jax.data import build as build_lib

EMBEDDED_CORPUS_VERSION = 1  # bump when the document selection changes
EMBEDDED_VAL_FRACTION = 0.1
_SKIPPED_STDLIB_DIRS = frozenset(
  {
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "site-packages",
    "dist-packages",
    "__pycache__",
  }
)


def cache_dir() -> str:
  if "LSM_JAX_CACHE_DIR" in os.environ:
    return os.environ["LSM_JAX_CACHE_DIR"]
  return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lsm_jax")


def _pydoc_topics() -> list[str]:
  from pydoc_data import topics

  return [topics.topics[name] for name in sorted(topics.topics)]


def _docstrings_of_source(source: bytes) -> str | None:
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):  # a few stdlib files target other Python versions
    return None
  nodes = (
    node
    for node in ast.walk(tree)
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
  )
  docstrings = dict.fromkeys(doc for doc in map(ast.get_docstring, nodes) if doc)
  return "\n\n".join(docstrings) or None


def _stdlib_docstring_documents() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  documents = []
  for directory, subdirectories, files in os.walk(root):
    subdirectories[:] = sorted(
      d for d in subdirectories if d not in _SKIPPED_STDLIB_DIRS and not d.startswith("config-")
    )
    for name in sorted(files):
      if name.endswith(".py"):
        with open(os.path.join(directory, name), "rb") as f:
          document = _docstrings_of_source(f.read())
        if document:
          documents.append(document)
  return documents


def _license_documents() -> list[str]:
  path = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8", errors="replace") as f:
    return [f.read()]


def embedded_documents() -> list[str]:
  """The corpus documents (see the module docstring), deterministic for a given Python installation."""
  return _pydoc_topics() + _stdlib_docstring_documents() + _license_documents()


def embedded_corpus_key() -> str:
  """Changes whenever the dataset may change: corpus version, split, interpreter version, stdlib location."""
  identity = f"{EMBEDDED_CORPUS_VERSION}|{EMBEDDED_VAL_FRACTION}|{sys.version}|{sysconfig.get_paths()['stdlib']}"
  return hashlib.sha256(identity.encode()).hexdigest()[:16]


_STAGING_PREFIX = ".building-"
_STAGING_OWNER = "owner.json"


def _remove_killed_staging_dirs(parent: str) -> None:
  """Removes the staging directories of builds whose process is gone (a staging directory without an owner
  file is at most one empty directory, and may be a live build's first instant: it is kept)."""
  for staging_dir in glob.glob(os.path.join(glob.escape(parent), _STAGING_PREFIX + "*")):
    try:
      with open(os.path.join(staging_dir, _STAGING_OWNER)) as f:
        owner = json.load(f)
    except (OSError, ValueError):
      continue
    if not build_lib.build_holder_is_alive(owner):
      shutil.rmtree(staging_dir, ignore_errors=True)


def embedded_dataset_dir(*, seq_len: int, tokenizer: str = "cl100k") -> str:
  """The built embedded dataset for (seq_len, tokenizer): built on first use, then reused."""
  if tokenizer not in ("cl100k", "bytes"):
    raise ValueError(f"the embedded corpus tokenizer must be 'cl100k' or 'bytes', got {tokenizer!r}")
  corpus_key = embedded_corpus_key()
  final_dir = os.path.join(cache_dir(), "embedded", f"{tokenizer}-seq{seq_len}-{corpus_key}")
  if build_lib.read_dataset_metadata(final_dir) is not None:
    return final_dir
  os.makedirs(os.path.dirname(final_dir), exist_ok=True)
  _remove_killed_staging_dirs(os.path.dirname(final_dir))
  staging_dir = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=os.path.dirname(final_dir))
  try:
    with open(os.path.join(staging_dir, _STAGING_OWNER), "w") as f:
      json.dump(build_lib.process_owner(), f)
    build_lib.build_from_documents(
      embedded_documents(),
      staging_dir,
      seq_len=seq_len,
      tokenizer=tokenizer,
      val_fraction=EMBEDDED_VAL_FRACTION,
      input_fingerprint=["embedded", corpus_key],
      num_workers=1,
      show_progress=False,
    )
    os.remove(os.path.join(staging_dir, _STAGING_OWNER))
    try:
      os.rename(staging_dir, final_dir)
    except OSError:
      # Another process renamed its complete copy first; keep that one.
      if build_lib.read_dataset_metadata(final_dir) is None:
        raise
  finally:
    if os.path.isdir(staging_dir):
      shutil.rmtree(staging_dir, ignore_errors=True)
  return final_dir
