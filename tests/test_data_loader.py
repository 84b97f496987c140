"""The batch loader: (seed, step) determinism across process counts and resumption, epochs, batch convention."""

import collections
import os
import subprocess
import sys

import numpy as np
import pytest

from lsm_jax.data import build as build_lib
from lsm_jax.data import corpora
from lsm_jax.data import loader as loader_lib

SEQ_LEN = 12
BATCH = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("loader")
  rng = np.random.default_rng(1)
  documents = [" ".join(f"w{rng.integers(100)}" for _ in range(rng.integers(1, 15))) for _ in range(120)]
  build_lib.build_from_documents(
    documents,
    str(root),
    seq_len=SEQ_LEN,
    tokenizer="bytes",
    val_fraction=0.2,
    input_fingerprint="loader-test",
    num_workers=1,
    show_progress=False,
  )
  return str(root)


def all_records(data_dir, split="train"):
  import tensorflow_datasets as tfds

  source = tfds.builder_from_directory(build_lib.dataset_version_dir(data_dir)).as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def row_keys(batch):
  return [tuple(row) for row in np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)]


def test_global_batch_is_identical_for_any_process_count(data_dir):
  single = loader_lib.make_loader(data_dir, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=7)
  for process_count in (2, 4):
    other = loader_lib.make_loader(data_dir, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=7)
    for step in (0, 3, 41):
      locals_ = [other.local_batch(step, process_index=p, process_count=process_count) for p in range(process_count)]
      expected = single.global_batch(step)
      for key in loader_lib._BATCH_KEYS:
        assert locals_[0][key].shape == (BATCH // process_count, SEQ_LEN)
        np.testing.assert_array_equal(np.concatenate([b[key] for b in locals_]), expected[key])


def test_another_interpreter_reads_the_same_rows(data_dir, tmp_path):
  """Process 1 of 2 in a separate interpreter (other hash seed) reads exactly its half of the global batch."""
  script = (
    f"import numpy as np; from lsm_jax.data import loader; "
    f"b = loader.make_loader({data_dir!r}, seq_len={SEQ_LEN}, global_batch_size={BATCH}, seed=7)"
    f".local_batch(5, process_index=1, process_count=2); np.savez({str(tmp_path / 'rows.npz')!r}, **b)"
  )
  subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
  rows = np.load(tmp_path / "rows.npz")
  expected = loader_lib.make_loader(data_dir, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=7).global_batch(5)
  for key in loader_lib._BATCH_KEYS:
    np.testing.assert_array_equal(rows[key], expected[key][BATCH // 2 :])


def test_resumed_read_equals_uninterrupted_read(data_dir):
  uninterrupted = loader_lib.make_loader(data_dir, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=3)
  stream = [uninterrupted.global_batch(step) for step in range(12)]
  resumed = loader_lib.make_loader(data_dir, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=3)
  for step in range(6, 12):
    batch = resumed.local_batch(step, process_index=0, process_count=1)
    for key in loader_lib._BATCH_KEYS:
      np.testing.assert_array_equal(batch[key], stream[step][key])
  prefetched = resumed.iterate(6, process_index=0, process_count=1, prefetch=3)
  for expected_step in range(6, 12):
    step, batch = next(prefetched)
    assert step == expected_step
    np.testing.assert_array_equal(batch["inputs"], stream[step]["inputs"])
  prefetched.close()
  other_seed = loader_lib.make_loader(data_dir, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=4)
  assert not np.array_equal(other_seed.global_batch(0)["inputs"], stream[0]["inputs"])


def test_each_epoch_is_a_fresh_permutation_of_all_records(data_dir):
  records = all_records(data_dir)
  expected = collections.Counter(
    row_keys(
      loader_lib.records_to_batch(
        {name: np.stack([r[name] for r in records]) for name in ("tokens", "segment_ids", "positions")}
      )
    )
  )
  # One batch holding three whole epochs: each epoch is every record exactly once, in a different order.
  loader = loader_lib.make_loader(data_dir, seq_len=SEQ_LEN, global_batch_size=3 * len(records), seed=0)
  rows = row_keys(loader.global_batch(0))
  epochs = [rows[i * len(records) : (i + 1) * len(records)] for i in range(3)]
  for epoch in epochs:
    assert collections.Counter(epoch) == expected
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_batch_convention(data_dir):
  loader = loader_lib.make_loader(data_dir, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0)
  records = {tuple(r["tokens"]): r for r in all_records(data_dir)}
  eos = loader.tokenizer.eos_id
  for step in range(5):
    batch = loader.global_batch(step)
    assert batch["inputs"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    for row in range(BATCH):
      record = records[tuple(batch["inputs"][row]) + (batch["targets"][row, -1],)]
      np.testing.assert_array_equal(batch["targets"][row], record["tokens"][1:])
      np.testing.assert_array_equal(batch["segment_ids"][row], record["segment_ids"][:-1])
      np.testing.assert_array_equal(batch["positions"][row], record["positions"][:-1])
      for t in range(SEQ_LEN):
        here, after = record["segment_ids"][t], record["segment_ids"][t + 1]
        assert batch["loss_mask"][row, t] == float(here != 0 and here == after)
        if batch["targets"][row, t] == eos and here != 0:
          assert batch["loss_mask"][row, t] == 1.0  # the EOS closing a document is predicted
        if batch["inputs"][row, t] == eos and here != 0:
          assert batch["loss_mask"][row, t] == 0.0  # the next document's first token is not


def test_bad_loader_arguments(data_dir, tmp_path):
  with pytest.raises(ValueError, match="seq_len=13 does not match"):
    loader_lib.make_loader(data_dir, seq_len=SEQ_LEN + 1, global_batch_size=BATCH)
  with pytest.raises(ValueError, match="split 'test'"):
    loader_lib.make_loader(data_dir, split="test", seq_len=SEQ_LEN, global_batch_size=BATCH)
  with pytest.raises(ValueError, match="holds no dataset"):
    loader_lib.make_loader(str(tmp_path), seq_len=SEQ_LEN, global_batch_size=BATCH)
  loader = loader_lib.make_loader(data_dir, seq_len=SEQ_LEN, global_batch_size=BATCH)
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    loader.local_batch(0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="process_index=2"):
    loader.local_batch(0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="step"):
    loader.global_batch(-1)
  with pytest.raises(ValueError, match="seed"):
    loader_lib.make_loader(data_dir, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=-1)


def test_embedded_corpus_concurrent_first_use(tmp_path):
  """Two processes building a (shrunk) embedded corpus at once both get the one complete dataset."""
  script = (
    "from lsm_jax.data import corpora; "
    "corpora.embedded_documents = lambda: [f'Embedded test document {i}: ' + 'lorem ipsum ' * i "
    "for i in range(40)]; "
    f"print(corpora.embedded_dataset_dir(seq_len={SEQ_LEN}, tokenizer='bytes'))"
  )
  environment = {**os.environ, "LSM_JAX_CACHE_DIR": str(tmp_path)}
  children = [
    subprocess.Popen([sys.executable, "-c", script], env=environment, stdout=subprocess.PIPE, text=True)
    for _ in range(2)
  ]
  results = [child.communicate(timeout=300)[0].strip().splitlines()[-1] for child in children]
  assert [child.returncode for child in children] == [0, 0]
  assert results[0] == results[1]
  assert os.listdir(os.path.dirname(results[0])) == [os.path.basename(results[0])]  # no staging leftovers
  assert build_lib.read_dataset_metadata(results[0])["report"]["input"]["documents_read"] == 40


@pytest.mark.slow  # extracts and packs the whole 2 MB corpus (~10 s on 2 idle cores)
def test_embedded_corpus_is_real_python_documentation(tmp_path, monkeypatch):
  monkeypatch.setenv("LSM_JAX_CACHE_DIR", str(tmp_path))
  documents = corpora.embedded_documents()
  assert sum(map(len, documents)) > 500_000 and len(documents) > 100
  monkeypatch.setattr(corpora, "embedded_documents", lambda: documents)
  loader = loader_lib.make_loader("embedded:bytes", seq_len=1024, global_batch_size=4, seed=0)
  text = " ".join(loader.tokenizer.decode(row) for row in loader.global_batch(0)["inputs"])
  assert sum(word in text.split() for word in ("the", "of", "a", "is", "to")) >= 3
  assert loader.build_report["splits"]["train"]["tokens"] > 400_000
  monkeypatch.setattr(corpora, "embedded_documents", lambda: pytest.fail("the cached corpus was rebuilt"))
  again = loader_lib.make_loader("embedded:bytes", seq_len=1024, global_batch_size=4, seed=0, split="validation")
  assert again.num_records > 0
