"""Text files → a packed, tokenized TFDS dataset in ArrayRecord format (readable without TensorFlow).

    python -m lsm_jax.data.build --source=PATH_OR_GLOB --data_dir=DIR --seq_len=N \
        [--tokenizer=cl100k|bytes|PATH] [--val_fraction=F] [--num_workers=W] [--overwrite]

Inputs (`--source`: a file, a directory (searched recursively), a glob, or a comma-separated list of these):
  .txt      one document per file; a line consisting only of `<|endoftext|>` separates documents inside a file
            (the GPT-2 convention for concatenated corpora).
  .jsonl    one JSON object per line, the document in its `--text_field` field (default "text").
  .gz, .zst compressed .txt / .jsonl (`.jsonl.gz`, `.jsonl.zst`, ...), decompressed while streaming.
  .parquet  the document in the `--text_field` column.
  a Hugging Face `datasets` directory (written by `save_to_disk`): the `--text_field` column; of a DatasetDict,
            the "train" split (give `DIR/<split>` for another). Needs the `datasets` package.
  tfds:NAME[:SPLIT]  a TFDS catalog dataset with a `--text_field` feature (e.g. tfds:c4/en), read from its prepared
            ArrayRecord files in TFDS_DATA_DIR. With --tfds_download it is first downloaded and prepared (needs
            the network and the builder's packages); a missing or unreachable one is refused with a message
            saying so.
Progress counts the bytes of input read, out of the total size of the source files.
Bad bytes: invalid UTF-8 becomes U+FFFD and the document is counted (`documents_with_invalid_utf8`).
Empty or whitespace-only documents, malformed JSON lines and records without a string text field are skipped and
counted; the first few locations (with the fields a record does have) are listed in the report. Nothing is
dropped without a count.

Split: a document goes to "validation" when the first 8 bytes of blake2b(text) / 2**64 < val_fraction, so the
split is deterministic, independent of file order and of the number of workers, and duplicates share a split.

Packing (per split, documents in input order): each document is tokenized and followed by one EOS; the token
stream is cut into consecutive records of seq_len + 1 tokens (no overlap). Documents longer than a record are
split across records (counted). In every record, `segment_ids` number the document pieces 1, 2, ... and
`positions` count from 0 at the start of each piece; the last record is padded with token 0, segment 0,
position 0 (padding counted).

Output: DIR/lsm_packed/1.0.0/ holds a regular TFDS dataset (dataset_info.json, features.json, metadata.json,
lsm_packed-{train,validation}.array_record-*), written by a TFDS GeneratorBasedBuilder, which needs no
TensorFlow for ArrayRecord output. Read it with `tfds.builder_from_directory(DIR/lsm_packed/1.0.0)` or
`tfds.data_source("lsm_packed", data_dir=DIR)`. DIR/build_report.json holds the counts. A fingerprint of the
inputs (path, size, mtime of each file) and options is stored in metadata.json: a second run with the same
fingerprint reuses the dataset; a different one is refused unless --overwrite.

Interrupted builds: a build holds DIR/.build.lock (host, pid, process start time) while it writes; a second build
of the same DIR is refused while the first runs. A killed build leaves its lock and scratch (`.tokenizing-*`
spill files, `lsm_packed/incomplete.*`); the next build takes the lock over and removes that scratch first.
"""

from __future__ import annotations

import collections
import collections.abc
import concurrent.futures
import contextlib
import functools
import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from lsm_jax.data import tokenizer as tokenizer_lib

DATASET_NAME = "lsm_packed"
DATASET_VERSION = "1.0.0"
FORMAT_VERSION = 1  # bump when the packing or record layout changes, so old fingerprints no longer match
SPLITS = ("train", "validation")
SUPPORTED_SUFFIXES = (".txt", ".txt.gz", ".txt.zst", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
TXT_DOCUMENT_SEPARATOR = "<|endoftext|>"
_MAX_LOCATIONS_REPORTED = 20
_DOCUMENTS_PER_TASK = 64  # documents per worker task: amortizes inter-process transfer


def dataset_version_dir(data_dir: str) -> str:
  return os.path.join(data_dir, DATASET_NAME, DATASET_VERSION)


def is_validation_document(text: str, val_fraction: float) -> bool:
  digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2**64 < val_fraction


# ---------------------------------------------------------------------------------------------------- reading


class _ReadStats:
  """Counts of what reading skipped or repaired, with a few example locations for the report."""

  def __init__(self, advance: Callable[[float], object] = lambda amount: None):
    self.counts = {
      "documents_read": 0,
      "empty_documents_skipped": 0,
      "malformed_records_skipped": 0,
      "documents_with_invalid_utf8": 0,
    }
    self.skipped_locations: list[str] = []
    self.advance = advance  # readers report the bytes of source files they have consumed

  def skip(self, kind: str, location: str):
    self.counts[kind] += 1
    if len(self.skipped_locations) < _MAX_LOCATIONS_REPORTED:
      self.skipped_locations.append(f"{kind}: {location}")


def _decode_utf8(raw: bytes, stats: _ReadStats) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    stats.counts["documents_with_invalid_utf8"] += 1
    return raw.decode("utf-8", errors="replace")


def is_hf_dataset_dir(path: str) -> bool:
  """Whether `path` is a directory written by `datasets`' Dataset.save_to_disk or DatasetDict.save_to_disk."""

  def has(name):
    return os.path.isfile(os.path.join(path, name))

  return os.path.isdir(path) and (has("dataset_dict.json") or (has("dataset_info.json") and has("state.json")))


def resolve_source_files(source: str) -> list[str]:
  """Files (and Hugging Face dataset directories) named by a path, directory, glob or comma-separated list of
  these; sorted, deduplicated."""
  files = []
  for part in [p.strip() for p in source.split(",") if p.strip()]:
    if is_hf_dataset_dir(part):
      matches = [part]
    elif os.path.isdir(part):
      matches = [
        os.path.join(root, name)
        for root, _, names in os.walk(part)
        for name in names
        if name.endswith(SUPPORTED_SUFFIXES)
      ]
    elif os.path.isfile(part):
      if not part.endswith(SUPPORTED_SUFFIXES):
        raise ValueError(
          f"source file {part!r} has an unsupported extension; valid: {', '.join(SUPPORTED_SUFFIXES)} "
          "or a Hugging Face datasets directory (save_to_disk)"
        )
      matches = [part]
    else:
      matches = [
        m
        for m in glob.glob(part, recursive=True)
        if (os.path.isfile(m) and m.endswith(SUPPORTED_SUFFIXES)) or is_hf_dataset_dir(m)
      ]
    if not matches:
      raise ValueError(
        f"source {part!r} matches no {', '.join(SUPPORTED_SUFFIXES)} file or Hugging Face datasets "
        "directory (missing path or empty glob)"
      )
    files.extend(os.path.abspath(m) for m in matches)
  if not files:
    raise ValueError(f"--source={source!r} names no files")
  return sorted(set(files))


def _source_files(path: str) -> list[str]:
  """The files a source path stands for: itself, or every file of a dataset directory."""
  if not os.path.isdir(path):
    return [path]
  return sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)


def source_bytes(path: str) -> int:
  return sum(os.path.getsize(file) for file in _source_files(path))


def _import_zstandard():
  try:
    import zstandard
  except ImportError:
    raise ValueError("reading .zst files needs the `zstandard` package: pip install zstandard") from None
  return zstandard


@contextlib.contextmanager
def _open_decompressed(path: str) -> Iterator[tuple[io.BufferedIOBase, io.BufferedIOBase]]:
  """(the decompressed byte stream, the raw file): the raw file's position measures reading progress."""
  with open(path, "rb") as raw:
    if path.endswith(".gz"):
      with gzip.GzipFile(fileobj=raw) as stream:
        yield stream, raw
    elif path.endswith(".zst"):
      # Across frames: multi-threaded zstd writers emit one frame per block.
      reader = _import_zstandard().ZstdDecompressor().stream_reader(raw, read_across_frames=True)
      with io.BufferedReader(reader) as stream:
        yield stream, raw
    else:
      yield raw, raw


def _read_txt(path: str, stats: _ReadStats, text_field: str) -> Iterator[str]:
  del text_field  # a text file is all text
  try:
    with _open_decompressed(path) as (stream, _):
      text = _decode_utf8(stream.read(), stats)
  except (OSError, EOFError) as error:  # gzip/zstd raise these for corrupt or truncated data
    raise ValueError(f"cannot decompress {path}: {error}") from error
  stats.advance(os.path.getsize(path))
  document_lines: list[str] = []
  pieces = []
  for line in text.splitlines(keepends=True):
    if line.strip() == TXT_DOCUMENT_SEPARATOR:
      pieces.append("".join(document_lines))
      document_lines = []
    else:
      document_lines.append(line)
  pieces.append("".join(document_lines))
  for index, document in enumerate(pieces):
    if document.strip():
      yield document
    else:
      stats.skip("empty_documents_skipped", f"{path} document {index}")


def _read_jsonl(path: str, stats: _ReadStats, text_field: str) -> Iterator[str]:
  position = 0
  try:
    with _open_decompressed(path) as (stream, raw):
      for line_number, raw_line in enumerate(stream, start=1):
        if line_number % 1024 == 0:
          stats.advance(raw.tell() - position)
          position = raw.tell()
        if not raw_line.strip():
          continue
        try:
          record = json.loads(_decode_utf8(raw_line, stats))
        except json.JSONDecodeError as error:
          stats.skip("malformed_records_skipped", f"{path}:{line_number} ({error.msg})")
          continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
          fields = f"; its fields: {', '.join(list(record)[:10])}" if isinstance(record, dict) else ""
          stats.skip("malformed_records_skipped", f"{path}:{line_number} (no string {text_field!r} field{fields})")
        elif not text.strip():
          stats.skip("empty_documents_skipped", f"{path}:{line_number}")
        else:
          yield text
  except (OSError, EOFError) as error:
    raise ValueError(f"cannot decompress {path}: {error}") from error
  stats.advance(os.path.getsize(path) - position)


def _texts_of_column(texts: Iterable, location: Callable[[int], str], stats: _ReadStats) -> Iterator[str]:
  for row, text in enumerate(texts):
    if not isinstance(text, str) or not text.strip():
      stats.skip("empty_documents_skipped", location(row))
    else:
      yield text


def _read_parquet(path: str, stats: _ReadStats, text_field: str) -> Iterator[str]:
  import pyarrow.parquet as pq

  parquet_file = pq.ParquetFile(path)
  if text_field not in parquet_file.schema_arrow.names:
    raise ValueError(
      f"parquet file {path!r} has no {text_field!r} column; columns: {parquet_file.schema_arrow.names} "
      "(choose one with --text_field)"
    )
  rows_per_byte = max(1, parquet_file.metadata.num_rows) / os.path.getsize(path)
  first_row = 0
  for batch in parquet_file.iter_batches(columns=[text_field]):
    yield from _texts_of_column(batch.column(0).to_pylist(), lambda row: f"{path} row {first_row + row}", stats)
    first_row += batch.num_rows
    stats.advance(batch.num_rows / rows_per_byte)


def _read_hf_dataset(path: str, stats: _ReadStats, text_field: str) -> Iterator[str]:
  try:
    import datasets
  except ImportError:
    raise ValueError(
      f"{path} is a Hugging Face datasets directory; reading it needs the `datasets` package "
      "(pip install datasets; the `eval` extra brings it)"
    ) from None
  dataset = datasets.load_from_disk(path)
  if isinstance(dataset, datasets.DatasetDict):
    if "train" not in dataset:
      raise ValueError(
        f"{path} holds splits {list(dataset)} and no 'train' split; give one split's directory as "
        f"--source, e.g. {os.path.join(path, next(iter(dataset)))}"
      )
    dataset = dataset["train"]
  if text_field not in dataset.column_names:
    raise ValueError(
      f"Hugging Face dataset {path!r} has no {text_field!r} column; columns: {dataset.column_names} "
      "(choose one with --text_field)"
    )
  total_bytes, rows = source_bytes(path), max(1, len(dataset))
  batch_size = 1024
  for first_row in range(0, len(dataset), batch_size):
    texts = dataset[first_row : first_row + batch_size][text_field]
    yield from _texts_of_column(texts, lambda row: f"{path} row {first_row + row}", stats)
    stats.advance(total_bytes * len(texts) / rows)


def _read_tfds_catalog(name_and_split: str, stats: _ReadStats, download: bool, text_field: str) -> Iterator[str]:
  import tensorflow_datasets as tfds

  name, _, split = name_and_split.partition(":")
  split = split or "train"
  tfds_data_dir = os.environ.get("TFDS_DATA_DIR")  # None: TFDS's default, ~/tensorflow_datasets
  where = tfds_data_dir or "~/tensorflow_datasets"
  try:
    builder = tfds.builder(name, data_dir=tfds_data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(
      f"TFDS catalog dataset {name!r} is not available here: "
      f"{str(error).splitlines()[0]} (its builder may need packages that are not installed)"
    ) from error
  if download:
    try:
      builder.download_and_prepare(file_format="array_record")
    except Exception as error:  # network, missing packages (apache-beam, tensorflow), quota: all end here
      raise ValueError(
        f"downloading and preparing TFDS catalog dataset {name!r} into {where} failed (this "
        f"machine may be offline or lack the builder's packages): {type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}"
      ) from error
  try:
    source = builder.as_data_source(split=split)
  except Exception as error:  # TFDS raises KeyError/ValueError/AssertionError for "not prepared"
    raise ValueError(
      f"TFDS catalog dataset {name!r} split {split!r} is not prepared in {where}; nothing is downloaded "
      "unless --tfds_download is given (and this machine may be offline): prepare it with "
      f"file_format=array_record where the network is reachable, or pass --tfds_download. "
      f"Cause: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    ) from error
  for index in range(len(source)):
    text = source[index].get(text_field)
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    if not isinstance(text, str) or not text.strip():
      stats.skip("empty_documents_skipped", f"tfds:{name_and_split} example {index}")
    else:
      yield text


def _reader(path: str) -> Callable[[str, _ReadStats, str], Iterator[str]]:
  if os.path.isdir(path):
    return _read_hf_dataset
  if path.endswith(".parquet"):
    return _read_parquet
  return _read_jsonl if path.removesuffix(".gz").removesuffix(".zst").endswith(".jsonl") else _read_txt


def _iter_source_documents(source: str, stats: _ReadStats, tfds_download: bool, text_field: str) -> Iterator[str]:
  if source.startswith("tfds:"):
    yield from _read_tfds_catalog(source[len("tfds:") :], stats, tfds_download, text_field)
    return
  for path in resolve_source_files(source):
    yield from _reader(path)(path, stats, text_field)


def source_fingerprint(source: str) -> list:
  if source.startswith("tfds:"):
    return [source]
  return [
    (file, os.stat(file).st_size, os.stat(file).st_mtime_ns)
    for path in resolve_source_files(source)
    for file in _source_files(path)
  ]


# ------------------------------------------------------------------------------------------------ tokenizing

_worker_state: dict = {}


def _init_tokenize_worker(tokenizer_spec: str, val_fraction: float):
  _worker_state["tokenizer"] = tokenizer_lib.get_tokenizer(tokenizer_spec)
  _worker_state["val_fraction"] = val_fraction


def _tokenize_documents(texts: list[str]) -> list[tuple[bool, np.ndarray]]:
  tokenizer, val_fraction = _worker_state["tokenizer"], _worker_state["val_fraction"]
  return [
    (is_validation_document(text, val_fraction), np.asarray(tokenizer.encode_document(text), np.int32))
    for text in texts
  ]


def _batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
  batch = []
  for text in texts:
    batch.append(text)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def _tokenize_in_order(
  documents: Iterable[str], tokenizer_spec: str, val_fraction: float, num_workers: int
) -> Iterator[tuple[bool, np.ndarray]]:
  """(is_validation, ids) per document, in input order; at most 4 batches per worker are in flight."""
  batches = _batched(documents, _DOCUMENTS_PER_TASK)
  if num_workers == 1:
    _init_tokenize_worker(tokenizer_spec, val_fraction)
    for batch in batches:
      yield from _tokenize_documents(batch)
    return
  # "spawn": forking a process that may already run JAX or TFDS threads is unsafe.
  executor = concurrent.futures.ProcessPoolExecutor(
    num_workers,
    mp_context=multiprocessing.get_context("spawn"),
    initializer=_init_tokenize_worker,
    initargs=(tokenizer_spec, val_fraction),
  )
  in_flight: collections.deque = collections.deque()
  try:
    for batch in batches:
      in_flight.append(executor.submit(_tokenize_documents, batch))
      if len(in_flight) >= 4 * num_workers:
        yield from in_flight.popleft().result()
    while in_flight:
      yield from in_flight.popleft().result()
  except concurrent.futures.process.BrokenProcessPool as error:
    raise RuntimeError(
      "a tokenizer worker process died; if it could not start, run from a module or a script "
      "with an `if __name__ == '__main__':` guard, or use num_workers=1"
    ) from error
  finally:
    executor.shutdown(wait=True, cancel_futures=True)


def _tokenize_to_spill_files(
  documents: Iterable[str],
  spill_dir: str,
  tokenizer: tokenizer_lib.Tokenizer,
  val_fraction: float,
  num_workers: int,
  progress,
) -> None:
  """Tokenizes in parallel (order kept) into per-split flat token files + document-length files."""
  token_files = {split: open(os.path.join(spill_dir, f"{split}.tokens"), "wb") for split in SPLITS}
  length_files = {split: open(os.path.join(spill_dir, f"{split}.lengths"), "wb") for split in SPLITS}
  documents_written = tokens_written = 0
  try:
    for is_validation, ids in _tokenize_in_order(documents, tokenizer.spec, val_fraction, num_workers):
      split = SPLITS[1] if is_validation else SPLITS[0]
      token_files[split].write(ids.tobytes())
      length_files[split].write(np.int64(len(ids)).tobytes())
      documents_written += 1
      tokens_written += len(ids)
      progress.set_postfix(docs=f"{documents_written:,}", tokens=f"{tokens_written:,}", refresh=False)
  finally:
    for f in (*token_files.values(), *length_files.values()):
      f.close()


# ------------------------------------------------------------------------------------ one build per data_dir

BUILD_LOCK = ".build.lock"
SCRATCH_PREFIX = ".tokenizing-"


def _process_start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the original."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def process_owner() -> dict:
  """{host, pid, start_time} of this process, as a build lock records its holder."""
  return {"host": socket.gethostname(), "pid": os.getpid(), "start_time": _process_start_time(os.getpid())}


def read_build_lock(data_dir: str) -> dict | None:
  """The holder {host, pid, start_time} of data_dir's build lock; {} if unreadable; None if there is none."""
  try:
    with open(os.path.join(data_dir, BUILD_LOCK)) as f:
      holder = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}


def build_holder_is_alive(holder: dict) -> bool:
  """Whether a lock holder may still be running: a live process on this host, or any process on another host
  (which this host cannot check). An unreadable lock file belongs to a build killed while writing it."""
  if not holder:
    return False
  if holder.get("host") != socket.gethostname():
    return True
  try:
    os.kill(int(holder["pid"]), 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  recorded, current = holder.get("start_time"), _process_start_time(int(holder["pid"]))
  return recorded is None or current is None or recorded == current


def _acquire_build_lock(data_dir: str) -> str:
  """Takes data_dir's build lock, or refuses while a running build holds it. A killed build's lock is taken
  over and its scratch (tokenizer spill files, TFDS's incomplete.* directories) removed."""
  path = os.path.join(data_dir, BUILD_LOCK)
  staged = f"{path}.{os.getpid()}"
  with open(staged, "w") as f:
    json.dump(process_owner(), f)
  try:
    while True:
      try:
        os.link(staged, path)  # atomic: the lock appears with its owner already written
        break
      except FileExistsError:
        holder = read_build_lock(data_dir)
        if holder is None:
          continue
        if build_holder_is_alive(holder):
          raise ValueError(
            f"another build is writing {data_dir} (host {holder.get('host')}, pid {holder.get('pid')}); "
            f"wait for it to finish, or remove {path} if that build is gone"
          ) from None
        print(
          f"taking over {data_dir} from an interrupted build (host {holder.get('host', '?')}, pid "
          f"{holder.get('pid', '?')}) and removing its scratch",
          file=sys.stderr,
        )
        if read_build_lock(data_dir) == holder:
          with contextlib.suppress(FileNotFoundError):
            os.remove(path)
  finally:
    os.remove(staged)
  remove_build_scratch(data_dir)
  return path


def remove_build_scratch(data_dir: str) -> list[str]:
  """Removes what an interrupted build leaves in data_dir (call only while holding its build lock): spill
  directories, TFDS's incomplete.* directories, a dataset directory without its metadata. Returns them."""
  version_dir = dataset_version_dir(data_dir)
  scratch = glob.glob(os.path.join(glob.escape(data_dir), SCRATCH_PREFIX + "*"))
  scratch += glob.glob(os.path.join(glob.escape(os.path.dirname(version_dir)), "incomplete.*"))
  if os.path.isdir(version_dir) and read_dataset_metadata(data_dir) is None:
    scratch.append(version_dir)
  for path in scratch:
    shutil.rmtree(path, ignore_errors=True)
  return scratch


# -------------------------------------------------------------------------------------------------- packing


def pack_records(
  tokens: np.ndarray, document_lengths: np.ndarray, seq_len: int, first_record: int = 0, num_records: int | None = None
) -> dict[str, np.ndarray]:
  """Records [first_record, first_record + num_records) of the packed stream, each [seq_len + 1] int32.

  `tokens` is the flat stream of documents (each ending in EOS), `document_lengths` their lengths.
  """
  record_len = seq_len + 1
  total = len(tokens)
  total_records = -(-total // record_len)
  if num_records is None:
    num_records = total_records - first_record
  start, stop = first_record * record_len, min((first_record + num_records) * record_len, total)
  document_starts = np.concatenate([[0], np.cumsum(document_lengths)[:-1]]).astype(np.int64)
  token_index = np.arange(start, stop, dtype=np.int64)
  document_of_token = np.searchsorted(document_starts, token_index, side="right") - 1
  record_start = (token_index // record_len) * record_len
  first_document_in_record = np.searchsorted(document_starts, record_start, side="right") - 1
  segment_ids = document_of_token - first_document_in_record + 1
  positions = token_index - np.maximum(document_starts[document_of_token], record_start)
  size = num_records * record_len
  out = {name: np.zeros(size, np.int32) for name in ("tokens", "segment_ids", "positions")}
  out["tokens"][: stop - start] = tokens[start:stop]
  out["segment_ids"][: stop - start] = segment_ids
  out["positions"][: stop - start] = positions
  return {name: array.reshape(num_records, record_len) for name, array in out.items()}


def packing_report(document_lengths: np.ndarray, seq_len: int) -> dict[str, int]:
  """Counts for one split, computed from document lengths alone (EOS included)."""
  record_len = seq_len + 1
  total = int(document_lengths.sum())
  records = -(-total // record_len)
  ends = np.cumsum(document_lengths)
  starts = ends - document_lengths
  crossing = (starts // record_len) != ((ends - 1) // record_len)
  return {
    "documents": len(document_lengths),
    "tokens": total,
    "records": records,
    "padding_tokens": records * record_len - total,
    "documents_longer_than_record": int((document_lengths > record_len).sum()),
    "documents_split_across_records": int(crossing.sum()),
  }


# ------------------------------------------------------------------------------------------------- writing


@functools.lru_cache(maxsize=None)
def _builder_class():
  """Defined once per process: TFDS registers builder classes by name."""
  import tensorflow_datasets as tfds

  class LsmPacked(tfds.core.GeneratorBasedBuilder):
    """Packed token records; built from spill files written by the tokenizing pass."""

    name = DATASET_NAME
    VERSION = tfds.core.Version(DATASET_VERSION)
    # No source directory with checksums or metadata files; TFDS's lookup of one needs `importlib_resources`.
    code_path = None

    def __init__(self, *, spill_dir: str, seq_len: int, metadata: dict, **kwargs):
      self._spill_dir, self._seq_len, self._metadata = spill_dir, seq_len, metadata
      super().__init__(**kwargs)

    def _info(self):
      record = tfds.features.Tensor(shape=(self._seq_len + 1,), dtype=np.int32)
      return tfds.core.DatasetInfo(
        builder=self,
        description="Packed token records written by lsm_jax.data.build.",
        features=tfds.features.FeaturesDict({"tokens": record, "segment_ids": record, "positions": record}),
        metadata=tfds.core.MetadataDict(self._metadata),
        disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      return {
        split: self._generate_examples(split)
        for split in SPLITS
        if self._metadata["report"]["splits"][split]["records"] > 0
      }

    def _generate_examples(self, split):
      tokens, lengths = _load_spill(self._spill_dir, split)
      records_per_chunk = max(1, (1 << 22) // (self._seq_len + 1))
      total_records = self._metadata["report"]["splits"][split]["records"]
      for first in range(0, total_records, records_per_chunk):
        chunk = pack_records(tokens, lengths, self._seq_len, first, min(records_per_chunk, total_records - first))
        for offset in range(len(chunk["tokens"])):
          yield first + offset, {name: array[offset] for name, array in chunk.items()}

  return LsmPacked


def _load_spill(spill_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  def load(suffix, dtype):
    path = os.path.join(spill_dir, f"{split}.{suffix}")
    return np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)

  return load("tokens", np.int32), load("lengths", np.int64)


def read_dataset_metadata(data_dir: str) -> dict | None:
  path = os.path.join(dataset_version_dir(data_dir), "metadata.json")
  if not os.path.isfile(path) or not os.path.isfile(os.path.join(dataset_version_dir(data_dir), "dataset_info.json")):
    return None
  with open(path) as f:
    return json.load(f)


def build_from_documents(
  documents: Iterable[str] | Callable[[_ReadStats], Iterable[str]],
  data_dir: str,
  *,
  seq_len: int,
  tokenizer: str = "cl100k",
  val_fraction: float = 0.01,
  input_fingerprint,
  num_workers: int | None = None,
  overwrite: bool = False,
  show_progress: bool = True,
  input_size: tuple[float, str] | None = None,
) -> dict:
  """Tokenizes, splits, packs and writes `documents`; returns the build report (`reused` says if it existed).

  `documents` is an iterable of texts, or a function of the read-stats object returning one (file readers,
  which report progress through it in the unit of `input_size`: (total, unit), e.g. (bytes, "B")). Without
  `input_size`, progress counts documents (out of len(documents) when it has one).
  `input_fingerprint` is any JSON-able value that changes whenever the documents change.
  One build at a time per data_dir (a lock file); the scratch of a killed build is removed by the next one.
  """
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
  tokenizer_obj = tokenizer_lib.get_tokenizer(tokenizer)
  options = {
    "format_version": FORMAT_VERSION,
    "seq_len": seq_len,
    "tokenizer": tokenizer_obj.spec,
    "vocab_size": tokenizer_obj.vocab_size,
    "eos_id": tokenizer_obj.eos_id,
    "val_fraction": val_fraction,
  }
  tokenizer_file = (
    [os.stat(tokenizer_obj.spec).st_size, os.stat(tokenizer_obj.spec).st_mtime_ns]
    if os.path.isfile(tokenizer_obj.spec)
    else None
  )
  fingerprint = hashlib.sha256(
    json.dumps([input_fingerprint, options, tokenizer_file], sort_keys=True).encode()
  ).hexdigest()

  existing = read_dataset_metadata(data_dir)
  holder = read_build_lock(data_dir)
  # Reused without the lock (the directory may be read-only), unless a killed build left scratch to remove.
  if (
    existing is not None
    and existing.get("fingerprint") == fingerprint
    and (holder is None or build_holder_is_alive(holder))
  ):
    return {**existing["report"], "reused": True}
  os.makedirs(data_dir, exist_ok=True)
  lock = _acquire_build_lock(data_dir)
  try:
    existing = read_dataset_metadata(data_dir)  # again, under the lock: another build may just have finished
    if existing is not None:
      if existing.get("fingerprint") == fingerprint:
        return {**existing["report"], "reused": True}
      if not overwrite:
        raise ValueError(
          f"{dataset_version_dir(data_dir)} holds a dataset built from other inputs or options "
          f"(fingerprint {existing.get('fingerprint', '?')[:12]} != {fingerprint[:12]}); "
          "choose another --data_dir or pass --overwrite"
        )
      shutil.rmtree(dataset_version_dir(data_dir))
    report = _build_locked(
      documents,
      data_dir,
      seq_len=seq_len,
      tokenizer_obj=tokenizer_obj,
      val_fraction=val_fraction,
      options=options,
      fingerprint=fingerprint,
      input_fingerprint=input_fingerprint,
      num_workers=num_workers or os.cpu_count() or 1,
      show_progress=show_progress,
      input_size=input_size,
    )
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(lock)
  return {**report, "reused": False}


def _build_locked(
  documents,
  data_dir: str,
  *,
  seq_len: int,
  tokenizer_obj,
  val_fraction: float,
  options: dict,
  fingerprint: str,
  input_fingerprint,
  num_workers: int,
  show_progress: bool,
  input_size: tuple[float, str] | None,
) -> dict:
  from tqdm import tqdm

  if input_size is None:
    total, unit = (len(documents) if isinstance(documents, collections.abc.Sized) else None), " docs"
  else:
    total, unit = input_size
  progress = tqdm(
    desc="reading and tokenizing", total=total, unit=unit, unit_scale=unit == "B", disable=not show_progress
  )
  stats = _ReadStats(advance=progress.update if input_size is not None else lambda amount: None)
  document_iter = documents(stats) if callable(documents) else documents

  def counted(texts):
    for text in texts:
      stats.counts["documents_read"] += 1
      if input_size is None:
        progress.update(1)
      yield text

  with progress, tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=data_dir) as spill_dir:
    _tokenize_to_spill_files(counted(document_iter), spill_dir, tokenizer_obj, val_fraction, num_workers, progress)
    split_reports = {split: packing_report(_load_spill(spill_dir, split)[1], seq_len) for split in SPLITS}
    report = {**options, "input": stats.counts, "skipped_locations": stats.skipped_locations, "splits": split_reports}
    if stats.counts["documents_read"] == 0:
      raise ValueError(
        f"no documents found: every input was empty or malformed ({stats.counts}; first locations: "
        f"{stats.skipped_locations[:5]}); if the text is under another field, pass --text_field"
      )
    if split_reports["train"]["records"] == 0:
      raise ValueError(
        f"all {stats.counts['documents_read']} documents fell into validation "
        f"(val_fraction={val_fraction}); use a smaller val_fraction or more documents"
      )
    if val_fraction > 0 and split_reports["validation"]["records"] == 0:
      raise ValueError(
        f"val_fraction={val_fraction} selected none of the {stats.counts['documents_read']} "
        "documents for validation; use more documents, a larger val_fraction, or val_fraction=0"
      )
    metadata = {"fingerprint": fingerprint, "input_fingerprint": input_fingerprint, "report": report}
    builder = _builder_class()(
      spill_dir=spill_dir, seq_len=seq_len, metadata=metadata, data_dir=data_dir, file_format="array_record"
    )
    import tensorflow_datasets as tfds

    if not show_progress:
      tfds.display_progress_bar(False)
    try:
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(max_shard_size=256 << 20),
        download_dir=os.path.join(spill_dir, "downloads"),
      )
    finally:
      tfds.display_progress_bar(True)
  with open(os.path.join(data_dir, "build_report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def build_dataset(
  source: str,
  data_dir: str,
  *,
  seq_len: int,
  tokenizer: str = "cl100k",
  val_fraction: float = 0.01,
  num_workers: int | None = None,
  overwrite: bool = False,
  show_progress: bool = True,
  tfds_download: bool = False,
  text_field: str = "text",
) -> dict:
  """Builds the dataset for `source` (see the module docstring) into `data_dir`; returns the build report."""
  if not source:
    raise ValueError("--source is empty; give a file, directory, glob, comma-separated list or tfds:NAME")
  if not text_field:
    raise ValueError("--text_field is empty; give the name of the JSON field / column holding the text")
  fingerprint = source_fingerprint(source)
  if text_field != "text":  # the default leaves the fingerprints of existing datasets unchanged
    fingerprint.append({"text_field": text_field})
  if source.startswith("tfds:"):
    input_size = None
  else:
    input_size = (sum(source_bytes(path) for path in resolve_source_files(source)), "B")
  return build_from_documents(
    lambda stats: _iter_source_documents(source, stats, tfds_download, text_field),
    data_dir,
    seq_len=seq_len,
    tokenizer=tokenizer,
    val_fraction=val_fraction,
    input_fingerprint=fingerprint,
    num_workers=num_workers,
    overwrite=overwrite,
    show_progress=show_progress,
    input_size=input_size,
  )


def main(argv: Sequence[str] | None = None) -> None:
  import argparse

  parser = argparse.ArgumentParser(prog="python -m lsm_jax.data.build", description=__doc__.split("\n")[0])
  parser.add_argument("--source", required=True, help="file, directory, glob, comma list, or tfds:NAME[:SPLIT]")
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--seq_len", required=True, type=int)
  parser.add_argument("--tokenizer", default="cl100k", help="cl100k, bytes, or a SentencePiece/tokenizer.json path")
  parser.add_argument("--val_fraction", default=0.01, type=float)
  parser.add_argument("--num_workers", default=None, type=int, help="tokenizing processes (default: all cores)")
  parser.add_argument("--overwrite", action="store_true", help="replace a dataset built from other inputs")
  parser.add_argument("--tfds_download", action="store_true", help="download and prepare a tfds: source first")
  parser.add_argument(
    "--text_field",
    default="text",
    help="JSON field / parquet or datasets column / TFDS feature holding the text (default: text)",
  )
  args = parser.parse_args(argv)
  try:
    report = build_dataset(
      args.source,
      args.data_dir,
      seq_len=args.seq_len,
      tokenizer=args.tokenizer,
      val_fraction=args.val_fraction,
      num_workers=args.num_workers,
      overwrite=args.overwrite,
      tfds_download=args.tfds_download,
      text_field=args.text_field,
    )
  except ValueError as error:  # bad input or options: one line, no traceback
    sys.exit(f"error: {error}")
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
