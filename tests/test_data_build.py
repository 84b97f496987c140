"""The dataset builder: packing invariants, document fidelity, build report, idempotency, bad input."""
import hashlib
import json
import os

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
    chunk = stream[start:start + seq_len + 1]
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
  report = build_lib.build_dataset(str(root / "corpus"), str(root / "data"), seq_len=SEQ_LEN, tokenizer="bytes",
                                   val_fraction=VAL_FRACTION, num_workers=2, show_progress=False)
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
  assert report["input"] == {"documents_read": len(kept), "empty_documents_skipped": 2,
                             "malformed_records_skipped": 2, "documents_with_invalid_utf8": 1}
  assert any("b.jsonl:31" in location for location in report["skipped_locations"])
  assert report["splits"]["train"]["documents_longer_than_record"] + \
      report["splits"]["validation"]["documents_longer_than_record"] >= 1


def test_build_is_idempotent(built):
  root, _, report = built
  shard = [name for name in os.listdir(build_lib.dataset_version_dir(str(root / "data"))) if "train" in name][0]
  shard_path = os.path.join(build_lib.dataset_version_dir(str(root / "data")), shard)
  modified = os.stat(shard_path).st_mtime_ns
  again = build_lib.build_dataset(str(root / "corpus"), str(root / "data"), seq_len=SEQ_LEN, tokenizer="bytes",
                                  val_fraction=VAL_FRACTION, num_workers=1, show_progress=False)
  assert again["reused"] and again["splits"] == report["splits"]
  assert os.stat(shard_path).st_mtime_ns == modified
  with pytest.raises(ValueError, match="other inputs or options"):
    build_lib.build_dataset(str(root / "corpus"), str(root / "data"), seq_len=SEQ_LEN + 1, tokenizer="bytes",
                            val_fraction=VAL_FRACTION, show_progress=False)


def test_serial_and_parallel_builds_write_identical_records(built, tmp_path):
  import tensorflow_datasets as tfds
  root, _, _ = built
  build_lib.build_dataset(str(root / "corpus"), str(tmp_path), seq_len=SEQ_LEN, tokenizer="bytes",
                          val_fraction=VAL_FRACTION, num_workers=1, show_progress=False)
  sources = [tfds.builder_from_directory(build_lib.dataset_version_dir(d)).as_data_source(split="train")
             for d in (str(root / "data"), str(tmp_path))]
  assert len(sources[0]) == len(sources[1])
  for i in range(len(sources[0])):
    for name in ("tokens", "segment_ids", "positions"):
      np.testing.assert_array_equal(sources[0][i][name], sources[1][i][name])


def test_bad_sources_are_refused(tmp_path):
  def build(source, **options):
    return build_lib.build_dataset(source, str(tmp_path / "out"), seq_len=SEQ_LEN, tokenizer="bytes",
                                   num_workers=1, show_progress=False, **options)
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
    build_lib.build_dataset("tfds:ag_news_subset", str(tmp_path / "out"), seq_len=SEQ_LEN, tokenizer="bytes",
                            num_workers=1, show_progress=False)


def test_command_line(tmp_path):
  (tmp_path / "doc.txt").write_text("one document\n<|endoftext|>\nanother document\n")
  build_lib.main([f"--source={tmp_path / 'doc.txt'}", f"--data_dir={tmp_path / 'out'}", "--seq_len=8",
                  "--tokenizer=bytes", "--val_fraction=0", "--num_workers=1"])
  report = json.loads((tmp_path / "out" / "build_report.json").read_text())
  assert report["splits"]["train"]["documents"] == 2
  assert report["splits"]["train"]["tokens"] == len("one document\n") + len("another document\n") + 2
