"""The dataset builder: packing invariants, document fidelity, build report, idempotency, bad input."""

import glob
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lsm_jax.data import build as build_lib

SEQ_LEN = 16
VAL_FRACTION = 0.25


def naive_pack(documents, seq_len):
  """Independent reference: concatenate, cut, and number pieces / positions token by token."""
  stream = [(token, doc_index) for doc_index, doc in enumerate(documents) for token in doc]
  records = []
  for start in range(0, len(stream), seq_len + 1):
    chunk = stream[start : start + seq_len + 1]
    tokens, segments, positions = [], [], []
    for offset, (token, doc_index) in enumerate(chunk):
      new_piece = offset == 0 or chunk[offset - 1][1] != doc_index
      segments.append((segments[-1] + 1 if segments else 1) if new_piece else segments[-1])
      positions.append(0 if new_piece else positions[-1] + 1)
      tokens.append(token)
    padding = seq_len + 1 - len(chunk)
    records.append((tokens + [0] * padding, segments + [0] * padding, positions + [0] * padding))
  return records


def test_pack_records_matches_naive_reference():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 3 * SEQ_LEN, size=40)
  documents = [list(rng.integers(1, 1000, size=n)) for n in lengths]
  packed = build_lib.pack_records(np.concatenate(documents).astype(np.int32), lengths, SEQ_LEN)
  expected = naive_pack(documents, SEQ_LEN)
  assert packed["tokens"].shape == (len(expected), SEQ_LEN + 1)
  for row, (tokens, segments, positions) in enumerate(expected):
    np.testing.assert_array_equal(packed["tokens"][row], tokens)
    np.testing.assert_array_equal(packed["segment_ids"][row], segments)
    np.testing.assert_array_equal(packed["positions"][row], positions)
  # A chunked call (as the TFDS generator makes) gives the same rows.
  middle = build_lib.pack_records(np.concatenate(documents).astype(np.int32), lengths, SEQ_LEN, 3, 4)
  np.testing.assert_array_equal(middle["segment_ids"], packed["segment_ids"][3:7])
  report = build_lib.packing_report(lengths, SEQ_LEN)
  assert report["records"] == len(expected)
  assert report["padding_tokens"] == sum(segments.count(0) for _, segments, _ in expected)
  assert report["documents_longer_than_record"] == int((lengths > SEQ_LEN + 1).sum())


def write_corpus(directory):
  """Documents of every supported kind plus bad input; returns the texts that should be kept."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  directory.mkdir()
  kept = []
  txt_documents = [f"Plain text document {i}.\nIt has two lines; number {i * 7}.\n" for i in range(12)]
  (directory / "a.txt").write_text("<|endoftext|>\n".join(txt_documents))
  kept += txt_documents
  (directory / "bad.txt").write_bytes(b"caf\xe9 latin-1 bytes, not UTF-8\n")
  kept.append("caf\ufffd latin-1 bytes, not UTF-8\n")
  (directory / "blank.txt").write_text("   \n\n")
  long_document = "A long document that spans several records. " * 8
  lines = [json.dumps({"text": f"json document {i} " + "w" * i}) for i in range(30)]
  lines += ["{not json", json.dumps({"title": "no text field"}), json.dumps({"text": long_document}), ""]
  (directory / "b.jsonl").write_text("\n".join(lines))
  kept += [f"json document {i} " + "w" * i for i in range(30)] + [long_document]
  parquet_texts = [f"parquet row {i} with some words" for i in range(10)]
  pq.write_table(pa.table({"text": parquet_texts + [None]}), directory / "c.parquet")
  kept += parquet_texts
  return kept


def is_validation(text):
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2**64 < VAL_FRACTION


def documents_of_split(data_dir, split):
  """Decoded documents recovered from the records: EOS-terminated pieces joined across records."""
  import tensorflow_datasets as tfds

  source = tfds.builder_from_directory(build_lib.dataset_version_dir(data_dir)).as_data_source(split=split)
  stream = np.concatenate([source[i]["tokens"][source[i]["segment_ids"] > 0] for i in range(len(source))])
  boundaries = np.flatnonzero(stream == 256)
  pieces = np.split(stream, boundaries + 1)[:-1]
  return [bytes(piece[:-1].astype(np.uint8)).decode("utf-8") for piece in pieces]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("build")
  kept = write_corpus(root / "corpus")
  report = build_lib.build_dataset(
    str(root / "corpus"),
    str(root / "data"),
    seq_len=SEQ_LEN,
    tokenizer="bytes",
    val_fraction=VAL_FRACTION,
    num_workers=2,
    show_progress=False,
  )
  return root, kept, report


def test_build_keeps_every_document_in_its_split(built):
  root, kept, report = built
  assert not report["reused"]
  for split, in_split in (("train", False), ("validation", True)):
    expected = [text for text in kept if is_validation(text) == in_split]
    assert sorted(documents_of_split(str(root / "data"), split)) == sorted(expected)
    assert report["splits"][split]["documents"] == len(expected)
    assert report["splits"][split]["tokens"] == sum(len(t.encode()) + 1 for t in expected)


def test_build_report_counts_bad_input(built):
  _, kept, report = built
  assert report["input"] == {
    "documents_read": len(kept),
    "empty_documents_skipped": 2,
    "malformed_records_skipped": 2,
    "documents_with_invalid_utf8": 1,
  }
  assert any("b.jsonl:31" in location for location in report["skipped_locations"])
  assert (
    report["splits"]["train"]["documents_longer_than_record"]
    + report["splits"]["validation"]["documents_longer_than_record"]
    >= 1
  )


def test_build_is_idempotent(built):
  root, _, report = built
  shard = [name for name in os.listdir(build_lib.dataset_version_dir(str(root / "data"))) if "train" in name][0]
  shard_path = os.path.join(build_lib.dataset_version_dir(str(root / "data")), shard)
  modified = os.stat(shard_path).st_mtime_ns
  again = build_lib.build_dataset(
    str(root / "corpus"),
    str(root / "data"),
    seq_len=SEQ_LEN,
    tokenizer="bytes",
    val_fraction=VAL_FRACTION,
    num_workers=1,
    show_progress=False,
  )
  assert again["reused"] and again["splits"] == report["splits"]
  assert os.stat(shard_path).st_mtime_ns == modified
  with pytest.raises(ValueError, match="other inputs or options"):
    build_lib.build_dataset(
      str(root / "corpus"),
      str(root / "data"),
      seq_len=SEQ_LEN + 1,
      tokenizer="bytes",
      val_fraction=VAL_FRACTION,
      show_progress=False,
    )


def test_serial_and_parallel_builds_write_identical_records(built, tmp_path):
  import tensorflow_datasets as tfds

  root, _, _ = built
  build_lib.build_dataset(
    str(root / "corpus"),
    str(tmp_path),
    seq_len=SEQ_LEN,
    tokenizer="bytes",
    val_fraction=VAL_FRACTION,
    num_workers=1,
    show_progress=False,
  )
  sources = [
    tfds.builder_from_directory(build_lib.dataset_version_dir(d)).as_data_source(split="train")
    for d in (str(root / "data"), str(tmp_path))
  ]
  assert len(sources[0]) == len(sources[1])
  for i in range(len(sources[0])):
    for name in ("tokens", "segment_ids", "positions"):
      np.testing.assert_array_equal(sources[0][i][name], sources[1][i][name])


def test_bad_sources_are_refused(tmp_path):
  def build(source, **options):
    return build_lib.build_dataset(
      source, str(tmp_path / "out"), seq_len=SEQ_LEN, tokenizer="bytes", num_workers=1, show_progress=False, **options
    )

  with pytest.raises(ValueError, match="matches no"):
    build(str(tmp_path / "missing" / "*.txt"))
  (tmp_path / "notes.md").write_text("markdown")
  with pytest.raises(ValueError, match="unsupported extension"):
    build(str(tmp_path / "notes.md"))
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
  with pytest.raises(ValueError, match="no documents found"):
    build(f"{tmp_path / 'empty.txt'},{tmp_path / 'empty.jsonl'}", val_fraction=0.0)
  (tmp_path / "one.txt").write_text("a single short document")
  with pytest.raises(ValueError, match="selected none"):
    build(str(tmp_path / "one.txt"), val_fraction=0.01)
  with pytest.raises(ValueError, match="val_fraction"):
    build(str(tmp_path / "one.txt"), val_fraction=1.5)
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({"content": ["x"]}), tmp_path / "no_text.parquet")
  with pytest.raises(ValueError, match="no 'text' column"):
    build(str(tmp_path / "no_text.parquet"), val_fraction=0.0)
  with pytest.raises(ValueError, match="not available here"):
    build("tfds:no_such_dataset_anywhere", val_fraction=0.0)


def test_unprepared_tfds_catalog_dataset_is_refused_clearly(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="is not prepared in .*may be offline"):
    build_lib.build_dataset(
      "tfds:ag_news_subset",
      str(tmp_path / "out"),
      seq_len=SEQ_LEN,
      tokenizer="bytes",
      num_workers=1,
      show_progress=False,
    )


def test_command_line(tmp_path):
  (tmp_path / "doc.txt").write_text("one document\n<|endoftext|>\nanother document\n")
  build_lib.main(
    [
      f"--source={tmp_path / 'doc.txt'}",
      f"--data_dir={tmp_path / 'out'}",
      "--seq_len=8",
      "--tokenizer=bytes",
      "--val_fraction=0",
      "--num_workers=1",
    ]
  )
  report = json.loads((tmp_path / "out" / "build_report.json").read_text())
  assert report["splits"]["train"]["documents"] == 2
  assert report["splits"]["train"]["tokens"] == len("one document\n") + len("another document\n") + 2


# ------------------------------------------------------------------ other layouts: text field, compression, HF

LAYOUT_DOCUMENTS = [
  f"Record {i}: " + " ".join(f"w{(i * 13 + j) % 37}" for j in range(i % 9 + 3)) + "\n" for i in range(48)
]


def write_layouts(directory):
  """The same documents under a `content` field in every supported layout; returns {name: source path}."""
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard

  directory.mkdir()
  lines = "".join(json.dumps({"id": i, "content": text}) + "\n" for i, text in enumerate(LAYOUT_DOCUMENTS))
  (directory / "plain.jsonl").write_text(lines)
  with gzip.open(directory / "docs.jsonl.gz", "wt") as f:
    f.write(lines)
  (directory / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
  with gzip.open(directory / "docs.txt.gz", "wt") as f:  # text files ignore --text_field
    f.write(f"{build_lib.TXT_DOCUMENT_SEPARATOR}\n".join(LAYOUT_DOCUMENTS))
  pq.write_table(
    pa.table({"id": range(len(LAYOUT_DOCUMENTS)), "content": LAYOUT_DOCUMENTS}), directory / "docs.parquet"
  )
  dataset = datasets.Dataset.from_dict({"id": list(range(len(LAYOUT_DOCUMENTS))), "content": LAYOUT_DOCUMENTS})
  dataset.save_to_disk(str(directory / "hf_dataset"))
  datasets.DatasetDict({"train": dataset, "test": dataset.select(range(3))}).save_to_disk(str(directory / "hf_dict"))
  return {
    name: str(directory / name)
    for name in (
      "plain.jsonl",
      "docs.jsonl.gz",
      "docs.jsonl.zst",
      "docs.txt.gz",
      "docs.parquet",
      "hf_dataset",
      "hf_dict",
    )
  }


def records(data_dir, split):
  import tensorflow_datasets as tfds

  source = tfds.builder_from_directory(build_lib.dataset_version_dir(data_dir)).as_data_source(split=split)
  return np.stack([source[i]["tokens"] for i in range(len(source))])


def test_every_layout_gives_the_records_of_the_documents_themselves(tmp_path):
  sources = write_layouts(tmp_path / "layouts")
  reference = str(tmp_path / "reference")
  build_lib.build_from_documents(
    LAYOUT_DOCUMENTS,
    reference,
    seq_len=SEQ_LEN,
    tokenizer="bytes",
    val_fraction=VAL_FRACTION,
    input_fingerprint=["reference"],
    num_workers=1,
    show_progress=False,
  )
  for name, source in sources.items():
    data_dir = str(tmp_path / f"out_{name}")
    report = build_lib.build_dataset(
      source,
      data_dir,
      seq_len=SEQ_LEN,
      tokenizer="bytes",
      val_fraction=VAL_FRACTION,
      num_workers=1,
      show_progress=False,
      text_field="content",
    )
    assert report["input"]["documents_read"] == len(LAYOUT_DOCUMENTS), name
    for split in build_lib.SPLITS:
      np.testing.assert_array_equal(records(data_dir, split), records(reference, split), err_msg=name)


def test_reading_reports_every_byte_of_the_sources(tmp_path):
  sources = write_layouts(tmp_path / "layouts")
  for source in sources.values():
    consumed = []
    stats = build_lib._ReadStats(advance=consumed.append)
    assert list(build_lib._iter_source_documents(source, stats, False, "content")) == LAYOUT_DOCUMENTS
    assert sum(consumed) == pytest.approx(build_lib.source_bytes(source)), source


def test_a_missing_text_field_is_named_with_the_fields_there_are(tmp_path):
  sources = write_layouts(tmp_path / "layouts")

  def build(source, **options):
    return build_lib.build_dataset(
      source, str(tmp_path / "out"), seq_len=SEQ_LEN, tokenizer="bytes", num_workers=1, show_progress=False, **options
    )

  with pytest.raises(
    ValueError,
    match=r"no documents found.*no string 'text' field; its fields: id, content.*"
    r"pass --text_field",
  ):
    build(sources["docs.jsonl.gz"])
  with pytest.raises(ValueError, match=r"has no 'body' column; columns: \['id', 'content'\].*--text_field"):
    build(sources["hf_dataset"], text_field="body")
  import datasets

  datasets.DatasetDict({"test": datasets.Dataset.from_dict({"content": ["x"]})}).save_to_disk(
    str(tmp_path / "test_only")
  )
  with pytest.raises(
    ValueError,
    match=r"holds splits \['test'\] and no 'train' split; give one split's directory "
    r"as --source, e.g. .*test_only/test",
  ):
    build(str(tmp_path / "test_only"), text_field="content")
  (tmp_path / "layouts" / "broken.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
  with pytest.raises(ValueError, match="cannot decompress .*broken.jsonl.gz"):
    build(str(tmp_path / "layouts" / "broken.jsonl.gz"), text_field="content")


def test_command_line_reads_a_content_field(tmp_path):
  sources = write_layouts(tmp_path / "layouts")
  build_lib.main(
    [
      f"--source={sources['plain.jsonl']}",
      f"--data_dir={tmp_path / 'out'}",
      f"--seq_len={SEQ_LEN}",
      "--tokenizer=bytes",
      "--val_fraction=0",
      "--num_workers=1",
      "--text_field=content",
    ]
  )
  report = json.loads((tmp_path / "out" / "build_report.json").read_text())
  assert report["splits"]["train"]["documents"] == len(LAYOUT_DOCUMENTS)
  with pytest.raises(SystemExit, match="^error: .*no documents found"):
    build_lib.main(
      [
        f"--source={sources['plain.jsonl']}",
        f"--data_dir={tmp_path / 'out2'}",
        "--seq_len=8",
        "--tokenizer=bytes",
        "--val_fraction=0",
        "--num_workers=1",
      ]
    )


# ------------------------------------------------------------------------------ interrupted and concurrent builds


def dead_pid():
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def scratch_left(data_dir):
  return sorted(name for name in os.listdir(data_dir) if name.startswith((".tokenizing-", ".build.lock"))) + sorted(
    name for name in os.listdir(os.path.join(data_dir, build_lib.DATASET_NAME)) if name.startswith("incomplete.")
  )


def test_a_killed_build_is_cleaned_up_by_the_rerun(tmp_path):
  words = [f"word{i}" for i in range(50)]
  rng = np.random.default_rng(0)
  documents = [" ".join(rng.choice(words, 200)) + "\n" for _ in range(1000)]  # ~3,000 records: seconds to write
  source = tmp_path / "corpus.jsonl.gz"
  with gzip.open(source, "wt") as f:
    f.writelines(json.dumps({"content": text}) + "\n" for text in documents)
  data_dir = tmp_path / "data"
  command = [
    sys.executable,
    "-m",
    "lsm_jax.data.build",
    f"--source={source}",
    f"--data_dir={data_dir}",
    "--seq_len=256",
    "--tokenizer=bytes",
    "--val_fraction=0.05",
    "--num_workers=1",
    "--text_field=content",
  ]
  build = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  spill = []
  while not any(os.path.getsize(path) for path in spill) and time.monotonic() < deadline and build.poll() is None:
    time.sleep(0.02)
    spill = glob.glob(str(data_dir / ".tokenizing-*" / "train.tokens"))
  assert build.poll() is None, "the build ended before it could be killed mid-way"
  os.kill(build.pid, signal.SIGKILL)
  build.wait()
  # What a kill during the TFDS write phase leaves as well.
  (data_dir / build_lib.DATASET_NAME / "incomplete.K1LLED_1.0.0").mkdir(parents=True)
  (data_dir / build_lib.DATASET_NAME / "incomplete.K1LLED_1.0.0" / "shard").write_bytes(b"x" * 1000)
  assert {".build.lock", os.path.basename(os.path.dirname(spill[0])), "incomplete.K1LLED_1.0.0"} <= set(
    scratch_left(data_dir)
  )
  report = build_lib.build_dataset(
    str(source),
    str(data_dir),
    seq_len=256,
    tokenizer="bytes",
    val_fraction=0.05,
    num_workers=1,
    show_progress=False,
    text_field="content",
  )
  assert scratch_left(data_dir) == []
  assert report["input"]["documents_read"] == len(documents)
  reference = str(tmp_path / "reference")
  build_lib.build_from_documents(
    documents,
    reference,
    seq_len=256,
    tokenizer="bytes",
    val_fraction=0.05,
    input_fingerprint=["reference"],
    num_workers=1,
    show_progress=False,
  )
  for split in build_lib.SPLITS:
    np.testing.assert_array_equal(records(str(data_dir), split), records(reference, split))


def test_a_running_build_keeps_its_lock_and_a_dead_one_loses_it(tmp_path, capsys):
  (tmp_path / "doc.txt").write_text("one document\n<|endoftext|>\nanother document\n")
  data_dir = tmp_path / "out"
  data_dir.mkdir()

  def build():
    return build_lib.build_dataset(
      str(tmp_path / "doc.txt"),
      str(data_dir),
      seq_len=8,
      tokenizer="bytes",
      val_fraction=0.0,
      num_workers=1,
      show_progress=False,
    )

  lock = data_dir / build_lib.BUILD_LOCK
  lock.write_text(json.dumps(build_lib.process_owner()))  # this very process: alive
  with pytest.raises(ValueError, match=f"another build is writing {data_dir} .*pid {os.getpid()}"):
    build()
  lock.write_text(json.dumps({**build_lib.process_owner(), "host": "elsewhere"}))  # unverifiable: kept
  with pytest.raises(ValueError, match="host elsewhere"):
    build()
  owner = build_lib.process_owner()
  # A reused pid: the recorded start time differs from the live process's.
  lock.write_text(json.dumps({**owner, "start_time": "0"}))
  assert build()["splits"]["train"]["documents"] == 2 and not lock.exists()
  assert "taking over" in capsys.readouterr().err
  # Killed after writing the dataset, before removing its spill directory: the rerun reuses it and cleans up.
  (data_dir / (build_lib.SCRATCH_PREFIX + "abc")).mkdir()
  lock.write_text(json.dumps({**owner, "pid": dead_pid()}))
  assert build()["reused"]
  assert scratch_left(str(data_dir)) == []


def test_the_smoke_model_trains_on_a_content_jsonl_a_jsonl_gz_and_a_saved_hf_dataset(tmp_path):
  import datasets
  import gin

  from lsm_jax import metrics, train, trainer
  from lsm_jax.data import corpora

  documents = corpora.embedded_documents()[:240]
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.jsonl").write_text("".join(json.dumps({"content": text}) + "\n" for text in documents[:80]))
  with gzip.open(corpus / "b.jsonl.gz", "wt") as f:
    f.writelines(json.dumps({"content": text}) + "\n" for text in documents[80:160])
  datasets.Dataset.from_dict({"content": documents[160:]}).save_to_disk(str(corpus / "c"))
  data_dir = str(tmp_path / "data")
  report = build_lib.build_dataset(
    f"{corpus / 'a.jsonl'},{corpus / 'b.jsonl.gz'},{corpus / 'c'}",
    data_dir,
    seq_len=128,
    tokenizer="bytes",
    val_fraction=0.05,
    num_workers=1,
    show_progress=False,
    text_field="content",
  )
  assert report["input"]["documents_read"] == len(documents)
  steps = 5
  gin.clear_config()
  try:
    # Training only: no validation, milestones or sample (the build is what is tested).
    train.parse_gin(
      ["gin/smoke/llama.gin"],
      [
        f"MODEL_DIR = '{tmp_path / 'run'}'",
        f"DATA_DIR = '{data_dir}'",
        f"TRAIN_STEPS = {steps}",
        "EVAL_EVERY_STEPS = 0",
        "trainer.train.sample_tokens = 0",
        "trainer.train.num_milestones = 0",
      ],
    )
    gin.get_configurable(trainer.train)(config_text=gin.config_str())
  finally:
    gin.clear_config()
  losses = [record["loss"] for record in metrics.read_metrics(str(tmp_path / "run"))]
  assert len(losses) == steps and np.all(np.isfinite(losses))
  assert abs(losses[0] - np.log(264)) < 0.1 and losses[-1] < losses[0] - 0.1


def test_embedded_corpus_staging_of_a_killed_process_is_removed(tmp_path):
  from lsm_jax.data import corpora

  for name, owner in (
    (".building-dead", {**build_lib.process_owner(), "pid": dead_pid()}),
    (".building-live", build_lib.process_owner()),
    (".building-starting", None),
  ):
    (tmp_path / name).mkdir()
    (tmp_path / name / "spill").write_bytes(b"x" * 100)
    if owner is not None:
      (tmp_path / name / "owner.json").write_text(json.dumps(owner))
  corpora._remove_killed_staging_dirs(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == [".building-live", ".building-starting"]
