"""The lm-eval adapter, the inference engine and the sweep on a tiny random checkpoint, against direct model calls."""

import dataclasses
import json
import os
import re
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from lm_eval.api.instance import Instance

from lsm_jax import checkpoint
from lsm_jax.data import build as build_lib
from lsm_jax.data import loader as loader_lib
from lsm_jax.data import tokenizer as tokenizer_lib
from lsm_jax.evaluate import engine as engine_lib
from lsm_jax.evaluate import harness, lm_eval_cli, sweep
from lsm_jax.models import build_model, get_config

SEQ_LEN = 64
BATCH = 4
TOKENIZER = tokenizer_lib.get_tokenizer("bytes")
# Large init so greedy text varies from token to token.
TINY = dict(
  num_layers=2,
  d_model=64,
  num_heads=2,
  head_dim=32,
  ffn_dim=128,
  vocab_size=TOKENIZER.vocab_size,
  dtype="float32",
  init_std=0.3,
)
STEP_SEEDS = {0: 0, 4: 1}  # milestone step -> init seed of its params


def _config(arch):
  return get_config(arch, "70m", **TINY)


def _model(arch, seed):
  return build_model(_config(arch), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run with two float32 milestones (random params) and a small bytes-tokenized dataset."""
  root = tmp_path_factory.mktemp("eval_run")
  documents = [f"Note {i}: " + " ".join(f"item{(i * 7 + j) % 23}" for j in range(30)) + "." for i in range(40)]
  data_dir = str(root / "data")
  build_lib.build_from_documents(
    documents,
    data_dir,
    seq_len=SEQ_LEN,
    tokenizer="bytes",
    val_fraction=0.3,
    input_fingerprint=["test_eval_harness"],
    num_workers=1,
    show_progress=False,
  )
  config = _config("hgrn2")
  metadata = {
    "arch": "hgrn2",
    "size": "70m",
    "model_config": dataclasses.asdict(config),
    "tokenizer": "bytes",
    "seq_len": SEQ_LEN,
    "global_batch_size": 2,
    "train_steps": 4,
    "flops_per_step": 8.64e19,
    "data_dir": data_dir,
    "seed": 0,
  }
  run = str(root / "run")
  checkpointer = checkpoint.Checkpointer(
    run,
    save_interval_steps=1000,
    max_to_keep=1,
    milestone_steps=list(STEP_SEEDS),
    milestone_dtype="float32",
    async_save=False,
    run_metadata=metadata,
  )
  for step, seed in STEP_SEEDS.items():
    checkpointer.save(step, {"params": nnx.state(_model("hgrn2", seed), nnx.Param).to_pure_dict()})
  checkpointer.close()
  return run


@pytest.fixture(scope="module")
def adapter(run_dir):
  return harness.LsmJaxLM(checkpoint=run_dir, step="4", batch_size=str(BATCH))


@pytest.fixture(scope="module")
def direct_model():
  return _model("hgrn2", STEP_SEEDS[4])


# The model's plain forward pass (no engine), jitted for one padded shape; right padding cannot reach earlier
# positions of a causal model.
_forward = nnx.jit(
  lambda model, tokens, segment_ids, positions: model(tokens, segment_ids=segment_ids, positions=positions)
)


def _padded_logits(model, tokens):
  padded = np.zeros((1, SEQ_LEN), np.int32)
  padded[0, : len(tokens)] = tokens
  positions = np.arange(SEQ_LEN, dtype=np.int32)[None]
  return np.asarray(_forward(model, padded, np.ones_like(padded), positions)[0, : len(tokens)])


def _direct_log_probs(model, tokens):
  """log p(tokens[i] | tokens[<i]) for i >= 1 from one forward pass."""
  log_probs = np.asarray(jax.nn.log_softmax(_padded_logits(model, tokens[:-1]), axis=-1))
  return log_probs[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]


def _greedy_full_forward(model, prompt, num_tokens):
  """Greedy tokens by re-running the whole sequence for every new token."""
  tokens = list(prompt)
  for _ in range(num_tokens):
    next_token = int(np.argmax(_padded_logits(model, tokens)[-1]))
    if next_token == TOKENIZER.eos_id:
      break
    tokens.append(next_token)
  return tokens[len(prompt) :]


def test_loglikelihood_equals_direct_computation(adapter, direct_model):
  requests = [("The cat", " sat on the mat"), ("", "Hello"), ("x" * 100, " tail")]
  results = adapter.loglikelihood([Instance("loglikelihood", {}, args, 0) for args in requests])
  for (context, continuation), (log_likelihood, _) in zip(requests, results):
    context_ids = TOKENIZER.encode(context) or [TOKENIZER.eos_id]
    continuation_ids = TOKENIZER.encode(continuation)
    # The third context is longer than the training context: the window keeps the last SEQ_LEN + 1 tokens.
    whole = (context_ids + continuation_ids)[-(SEQ_LEN + 1) :]
    expected = _direct_log_probs(direct_model, whole)[-len(continuation_ids) :].sum()
    assert log_likelihood == pytest.approx(float(expected), abs=1e-3)
  # is_greedy: the model's own greedy tokens are greedy; change the last one and they are not.
  context = TOKENIZER.encode("Hi")
  greedy = _greedy_full_forward(direct_model, context, 3)
  altered = greedy[:-1] + [(greedy[-1] + 1) % 256]
  assert [flag for _, flag in adapter.engine.loglikelihoods([(context, greedy), (context, altered)])] == [True, False]


def test_loglikelihood_rolling_equals_direct_sum(adapter, direct_model):
  text = "A short document."
  (total,) = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
  expected = _direct_log_probs(direct_model, [TOKENIZER.eos_id] + TOKENIZER.encode(text)).sum()
  assert total == pytest.approx(float(expected), abs=1e-3)
  # Longer than the context: disjoint windows, so every token is scored exactly once.
  long_text = "abcdefghij" * 15
  (long_total,) = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long_text,), 0)])
  ids = [TOKENIZER.eos_id] + TOKENIZER.encode(long_text)
  first = _direct_log_probs(direct_model, ids[: SEQ_LEN + 1]).sum()
  assert long_total < first < 0


def test_generate_until_honours_max_length_and_stop_sequences(adapter, direct_model):
  prompt = "Once upon a time"
  reference_ids = _greedy_full_forward(direct_model, TOKENIZER.encode(prompt), 10)
  reference = TOKENIZER.decode(reference_ids)
  (text,) = adapter.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 10}), 0)])
  assert text == reference
  (short,) = adapter.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 3}), 0)])
  assert short == TOKENIZER.decode(reference_ids[:3])
  stop = next(char for char in reference[2:] if char != "\ufffd")
  (stopped,) = adapter.generate_until(
    [Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 10}), 0)]
  )
  assert stopped == reference[: reference.index(stop)]
  with pytest.raises(ValueError, match="greedily"):
    adapter.generate_until([Instance("generate_until", {}, (prompt, {"do_sample": True}), 0)])


@pytest.mark.parametrize(
  "arch, overrides", [("hgrn2", {}), ("llama", {}), ("hgrn2_hybrid", {"layer_pattern": "hgrn2,llama"})]
)
def test_batched_decoding_matches_full_forward(arch, overrides):
  """Recurrent state (HGRN2) / KV cache (LLaMA) / both (a hybrid), left-padded batch of unequal prompts == full
  forward."""
  model = build_model(get_config(arch, "70m", **{**TINY, **overrides}), rngs=nnx.Rngs(3))
  engine = engine_lib.InferenceEngine(model, TOKENIZER, max_length=SEQ_LEN, batch_size=BATCH)
  prompts = [TOKENIZER.encode(text) for text in ("Hi", "The quick brown fox", "Numbers: 1 2 3 4 5 6 7")]
  generated = engine.generate(prompts, max_new_tokens=8)
  expected = [TOKENIZER.decode(_greedy_full_forward(model, prompt, 8)) for prompt in prompts]
  assert generated == expected


def test_sweep_val_loss_and_skips_finished_checkpoints(run_dir, tmp_path, monkeypatch):
  output = str(tmp_path / "table.jsonl")
  # Another run's row in the same table does not count as done for this run.
  other_run = {
    "arch": "llama",
    "size": "70m",
    "step": 0,
    "tokens": 0,
    "compute_pflops_days": 0.0,
    "task": "val_loss",
    "metric": "loss",
    "value": 1.0,
  }
  with open(output, "w") as f:
    f.write(json.dumps(other_run) + "\n")
  first = sweep.evaluate_run(run_dir, "val_loss", output, steps=[0], batch_size=BATCH, progress=False)
  assert {(row["step"], row["metric"]) for row in first} == {(0, "loss"), (0, "perplexity")}
  second = sweep.evaluate_run(run_dir, "val_loss", output, batch_size=BATCH, progress=False)
  assert {row["step"] for row in second} == {4}  # step 0 was done
  # Validation loss through a second path: the loader's batches and a plain forward pass of step 4's model.
  loader = loader_lib.make_loader(
    checkpoint.read_run_metadata(run_dir)["data_dir"], split="validation", seq_len=SEQ_LEN, global_batch_size=BATCH
  )
  model = _model("hgrn2", STEP_SEEDS[4])
  loss_sum = count = 0.0
  for step in range(max(1, loader.num_records // BATCH)):
    batch = loader.global_batch(step)
    logits = _forward(model, batch["inputs"], batch["segment_ids"], batch["positions"])
    log_probs = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), batch["targets"][..., None], -1)[..., 0]
    loss_sum -= float((log_probs * batch["loss_mask"]).sum())
    count += float(batch["loss_mask"].sum())
  row = next(row for row in second if row["metric"] == "loss")
  assert row["value"] == pytest.approx(loss_sum / count, rel=1e-4)
  assert row["tokens"] == 4 * 2 * SEQ_LEN and row["compute_pflops_days"] == pytest.approx(4.0)
  # Everything done: nothing is loaded, nothing appended; the CSV mirrors the JSON lines.
  monkeypatch.setattr(engine_lib, "load_model", lambda *a, **k: pytest.fail("a finished checkpoint was reloaded"))
  assert sweep.evaluate_run(run_dir, "val_loss", output, progress=False) == []
  with open(str(tmp_path / "table.csv")) as f:
    lines = f.read().splitlines()
  assert lines[0] == ",".join(sweep.COLUMNS) and len(lines) == 2 + len(first) + len(second)


TOY_DOCS = [
  {"question": "Color of the sky?", "choices": ["blue", "green", "loud"], "label": 0},
  {"question": "Opposite of up?", "choices": ["left", "down"], "label": 1},
  {"question": "Two plus two?", "choices": ["four", "five", "seven"], "label": 2},
]


def _write_toy_task(directory):
  """A user's multiple-choice lm-eval task outside the project: YAML (dataset_path: json) + local JSON lines."""
  directory.mkdir()
  with open(directory / "docs.jsonl", "w") as f:
    f.writelines(json.dumps(doc) + "\n" for doc in TOY_DOCS)
  (directory / "toy_mc.yaml").write_text(
    "task: toy_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
    f"    test: {directory / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
    'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: choices\ndoc_to_target: label\n'
    "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
  )
  return str(directory)


def _toy_accuracy(model):
  """The toy task's accuracy from direct model calls: the choice with the highest summed log-likelihood."""
  correct = 0
  for doc in TOY_DOCS:
    context = TOKENIZER.encode(f"Question: {doc['question']}\nAnswer:")
    scores = [
      _direct_log_probs(model, context + TOKENIZER.encode(" " + choice))[-len(choice) - 1 :].sum()
      for choice in doc["choices"]
    ]
    correct += int(np.argmax(scores) == doc["label"])
  return correct / len(TOY_DOCS)


def test_local_multiple_choice_task_through_lm_eval_cli(run_dir, direct_model, tmp_path, monkeypatch):
  """A user's local lm-eval YAML task (dataset_path: json) runs end to end via the lm_eval command line."""
  task_dir = _write_toy_task(tmp_path / "tasks")
  # In process (the lm_eval command line parses these arguments) to reuse this process's compiled programs.
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "argv", list(sys.argv))
  lm_eval_cli.main(
    [
      "--model",
      "lsm_jax",
      "--model_args",
      f"checkpoint={run_dir},step=4",
      "--tasks",
      "toy_mc",
      "--include_path",
      task_dir,
      "--batch_size",
      str(BATCH),
      "--output_path",
      str(tmp_path / "out"),
    ]
  )
  (results_file,) = [
    os.path.join(d, name) for d, _, names in os.walk(tmp_path / "out") for name in names if name.startswith("results")
  ]
  with open(results_file) as f:
    accuracy = json.load(f)["results"]["toy_mc"]["acc,none"]
  assert accuracy == pytest.approx(_toy_accuracy(direct_model))


def _tensorboard_scalars(log_dir):
  """{tag: [(step, value)]} from the TensorBoard event files in log_dir (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for name in sorted(os.listdir(log_dir)):
    with open(os.path.join(log_dir, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = np.frombuffer(data[offset : offset + 8], "<u8")
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + int(length)])
      offset += 12 + int(length) + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_sweep_runs_a_task_written_outside_the_project_over_every_milestone(run_dir, tmp_path, monkeypatch, capsys):
  from lsm_jax.evaluate import __main__ as evaluate_main

  task_dir = _write_toy_task(tmp_path / "tasks")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  output, log_dir = str(tmp_path / "table.jsonl"), str(tmp_path / "tb")
  argv = [
    "--run_dir",
    run_dir,
    "--tasks",
    "toy_mc",
    "--include_path",
    task_dir,
    "--output",
    output,
    "--batch_size",
    str(BATCH),
    "--tensorboard_dir",
    log_dir,
    "--no_progress",
  ]
  evaluate_main.main(argv)
  rows = sweep.read_table(output)
  assert [(row["step"], row["task"], row["metric"]) for row in rows] == [(0, "toy_mc", "acc"), (4, "toy_mc", "acc")]
  for row in rows:
    assert row["value"] == pytest.approx(_toy_accuracy(_model("hgrn2", STEP_SEEDS[row["step"]])))
    assert row["tokens"] == row["step"] * 2 * SEQ_LEN
  # TensorBoard: one scalar per (task, metric) at each milestone's step and at its tokens.
  scalars = _tensorboard_scalars(log_dir)
  assert scalars["eval/toy_mc/acc"] == [(row["step"], pytest.approx(row["value"])) for row in rows]
  assert scalars["eval_by_tokens/toy_mc/acc"] == [(row["tokens"], pytest.approx(row["value"])) for row in rows]
  # Done pairs are skipped; an unknown name is refused with where it was looked for.
  monkeypatch.setattr(engine_lib, "load_model", lambda *a, **k: pytest.fail("a finished checkpoint was reloaded"))
  assert sweep.evaluate_run(run_dir, "toy_mc", output, include_path=[task_dir], progress=False) == []
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    evaluate_main.main([*argv[:3], "toy_mcq", *argv[4:]])
  assert exit_info.value.code == 2  # a user error (lsm_jax/errors.py)
  assert re.match(
    r"error: unknown evaluation task\(s\) \['toy_mcq'\]: not a built-in sweep "
    r"task \(val_loss, .*\) nor an lm-eval task, group or tag in lm-eval's "
    rf"bundled tasks, lsm_jax's local tasks \(.*\), --include_path {task_dir}\n$",
    capsys.readouterr().err,
  )
  with pytest.raises(ValueError, match=r"--include_path .*nowhere does not exist"):
    sweep.parse_tasks("toy_mc", [str(tmp_path / "nowhere")])


def test_scoring_shows_a_progress_bar_with_the_request_count(adapter, capsys):
  requests = [Instance("loglikelihood", {}, ("The sky is", " blue"), index) for index in range(5)]
  adapter.loglikelihood(requests)
  progress = capsys.readouterr().err
  assert "lsm_jax loglikelihood: 100%" in progress and "5/5" in progress
  adapter.loglikelihood(requests, disable_tqdm=True)
  assert capsys.readouterr().err == ""
  # lm-eval's evaluator passes no disable_tqdm: the sweep's --no_progress reaches the adapter as progress=False.
  harness.LsmJaxLM.from_engine(adapter.engine, progress=False).loglikelihood(requests)
  assert capsys.readouterr().err == ""


def test_the_model_is_declared_for_lm_evals_plugin_discovery():
  import configparser
  from importlib import metadata

  config = configparser.ConfigParser()
  config.read(os.path.join(os.path.dirname(__file__), "..", "setup.cfg"))
  (line,) = config["options.entry_points"]["lm_eval.models"].strip().splitlines()
  name, value = (part.strip() for part in line.split("="))
  assert name == "lsm_jax"
  assert metadata.EntryPoint(name=name, value=value, group="lm_eval.models").load() is harness.LsmJaxLM


def test_importing_the_adapter_keeps_lm_evals_own_models():
  # A fresh interpreter: lm-eval registers its models only while its registry is empty.
  import subprocess

  code = (
    "import lsm_jax.evaluate.harness\n"
    "from lm_eval.api.registry import get_model\n"
    "print(get_model('hf').__name__, get_model('lsm_jax').__name__)\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert result.stdout.split() == ["HFLM", "LsmJaxLM"]
