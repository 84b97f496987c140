"""Deterministic batches from a packed dataset: the global batch for step s is a pure function of (seed, s).

Reading needs no TensorFlow: `tfds.builder_from_directory(...).as_data_source(split)` gives random access to
the ArrayRecord records, and Grain's `MapDataset.range(num_records).shuffle(seed)` maps a global example index
to a record index (a batch's records are then read in one `__getitems__` call). That shuffle is epoch-aware:
index i lies in epoch i // num_records, and every epoch uses its own permutation (seed + epoch), so the stream
never ends and needs no iterator state. Global batch s is stream indices [s * B, (s + 1) * B); process p of P
reads only rows [p * B / P, (p + 1) * B / P) of it. Resuming at any step, or changing the number of processes,
therefore sees exactly the same global batches.

A split with fewer records than one batch is still served: a batch then spans epochs and may repeat records
(a warning is logged once).

Batch convention, every array [rows, seq_len], from a record of seq_len + 1 tokens `t`, segments `g`,
positions `p`:
  inputs = t[:-1], targets = t[1:] (int32)
  segment_ids = g[:-1] (int32; 1, 2, ... per document piece in the row, 0 = padding)
  positions = p[:-1] (int32; 0 at the first token of each document piece)
  loss_mask = (g[1:] == g[:-1]) & (g[:-1] != 0) (float32): 1 where the target is the next token of the same
      document. The EOS closing a document is a target (the model learns to end documents); the first token
      of a document, and of a piece continued from the previous record, is never a target.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

from lsm_jax.data import build as build_lib
from lsm_jax.data import tokenizer as tokenizer_lib

EMBEDDED = "embedded"
_BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
_Batch = TypeVar("_Batch")


def prefetched(
  make_batch: Callable[[int], _Batch], steps: Iterable[int], depth: int = 2
) -> Iterator[tuple[int, _Batch]]:
  """(step, make_batch(step)) for each of `steps`, built by a background thread `depth` steps ahead, so building
  the next batches overlaps the consumer's work. Yields what calling make_batch step by step gives, in order; an
  exception of make_batch is raised at its step. Close the generator (or exhaust it) to stop the thread."""
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
    raise ValueError(f"prefetch depth must be a positive int, got {depth!r}")
  return _prefetching(make_batch, iter(steps), depth)


def _prefetching(make_batch, steps, depth):
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch") as builder:
    pending = collections.deque((step, builder.submit(make_batch, step)) for step in itertools.islice(steps, depth))
    try:
      while pending:
        step, batch = pending.popleft()
        for next_step in itertools.islice(steps, 1):
          pending.append((next_step, builder.submit(make_batch, next_step)))
        yield step, batch.result()
    finally:
      for _, batch in pending:  # batches nobody will read
        batch.cancel()


def _dataset_dir(data_dir: str) -> str:
  """Accepts the build's --data_dir or the TFDS version directory inside it; local or any path etils.epath
  reads (gs:// needs gcsfs), so a dataset built locally can be copied to a bucket."""
  from etils import epath

  if (epath.Path(data_dir) / "dataset_info.json").exists():
    return data_dir
  version_dir = build_lib.dataset_version_dir(data_dir)
  if (epath.Path(version_dir) / "dataset_info.json").exists():
    return version_dir
  raise ValueError(
    f"data_dir {data_dir!r} holds no dataset written by `python -m lsm_jax.data.build` "
    f"(no {version_dir}/dataset_info.json); build one or use data_dir='embedded'"
  )


def records_to_batch(records: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """[rows, seq_len + 1] records → the batch dict (see the module docstring)."""
  tokens, segments = records["tokens"], records["segment_ids"]
  same_document = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] != 0)
  return {
    "inputs": tokens[:, :-1].astype(np.int32),
    "targets": tokens[:, 1:].astype(np.int32),
    "segment_ids": segments[:, :-1].astype(np.int32),
    "positions": records["positions"][:, :-1].astype(np.int32),
    "loss_mask": same_document.astype(np.float32),
  }


class BatchLoader:
  """Random-access batches of one split; see the module docstring for the sampling and batch convention."""

  def __init__(self, dataset_dir: str, *, split: str, seq_len: int, global_batch_size: int, seed: int):
    import grain
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(dataset_dir)
    metadata = dict(builder.info.metadata or {})
    if "report" not in metadata:
      raise ValueError(
        f"{dataset_dir} is a TFDS dataset without lsm_jax build metadata; build it with `python -m lsm_jax.data.build`"
      )
    report = metadata["report"]
    if report["seq_len"] != seq_len:
      raise ValueError(
        f"seq_len={seq_len} does not match the dataset's seq_len={report['seq_len']} "
        f"({dataset_dir}); rebuild with --seq_len={seq_len} or use seq_len={report['seq_len']}"
      )
    available = [name for name in build_lib.SPLITS if report["splits"][name]["records"] > 0]
    if split not in available:
      raise ValueError(f"split {split!r} is not in {dataset_dir}; valid: {available}")
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
      raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
      raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    self.dataset_dir = dataset_dir
    self.split = split
    self.seq_len = seq_len
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.build_report = report
    self.tokenizer = tokenizer_lib.get_tokenizer(report["tokenizer"])
    self._source = builder.as_data_source(split=split)
    self.num_records = len(self._source)
    self._record_index = grain.MapDataset.range(self.num_records).shuffle(seed=seed)
    if self.num_records < global_batch_size:
      logging.warning(
        "split %r of %s has %d records, fewer than global_batch_size=%d: batches span epochs and repeat records",
        split,
        dataset_dir,
        self.num_records,
        global_batch_size,
      )

  def _rows(self, step: int, first_row: int, num_rows: int) -> dict[str, np.ndarray]:
    if not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step must be a non-negative integer, got {step!r}")
    first_index = int(step) * self.global_batch_size + first_row
    record_indices = [self._record_index[index] for index in range(first_index, first_index + num_rows)]
    records = self._source.__getitems__(record_indices)
    return records_to_batch(
      {name: np.stack([record[name] for record in records]) for name in ("tokens", "segment_ids", "positions")}
    )

  def local_batch(
    self, step: int, process_index: int | None = None, process_count: int | None = None
  ) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step` (defaults: jax.process_index() / jax.process_count())."""
    if process_index is None or process_count is None:
      import jax

      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if self.global_batch_size % process_count:
      raise ValueError(f"global_batch_size={self.global_batch_size} is not divisible by process_count={process_count}")
    rows = self.global_batch_size // process_count
    return self._rows(step, process_index * rows, rows)

  def global_batch(self, step: int) -> dict[str, np.ndarray]:
    return self._rows(step, 0, self.global_batch_size)

  def iterate(
    self, start_step: int = 0, *, process_index: int | None = None, process_count: int | None = None, prefetch: int = 2
  ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(step, local_batch(step)) for start_step, start_step + 1, ...; a background thread reads `prefetch`
    steps ahead so reading overlaps the training step. Equal to calling local_batch step by step."""
    return prefetched(
      lambda step: self.local_batch(step, process_index, process_count), itertools.count(start_step), prefetch
    )


def make_loader(
  data_dir: str, *, split: str = "train", seq_len: int, global_batch_size: int, seed: int = 0
) -> BatchLoader:
  """A BatchLoader over a dataset built by `python -m lsm_jax.data.build`, or the embedded default corpus.

  data_dir "embedded" is the embedded corpus tokenized with cl100k; "embedded:bytes" / "embedded:cl100k"
  choose the tokenizer. It is built for `seq_len` on first use and cached (see lsm_jax.data.corpora).
  """
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
  if data_dir == EMBEDDED or data_dir.startswith(EMBEDDED + ":"):
    from lsm_jax.data import corpora

    tokenizer_name = data_dir.partition(":")[2] or "cl100k"
    data_dir = corpora.embedded_dataset_dir(seq_len=seq_len, tokenizer=tokenizer_name)
  return BatchLoader(
    _dataset_dir(data_dir), split=split, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed
  )
