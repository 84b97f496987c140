"""A new training run initialised from another checkpoint (trainer.train.init_from): a random transformers LLaMA,
imported with `python -m lsm_jax.export import`, trains on in lsm_jax from exactly transformers' loss.

The fine-tuning run takes its model from the import (trainer.run_model_config in a gin file, as docs/training.md
shows) or from gin bindings written by hand (MATCHING_MODEL)."""

import json
import shutil

import gin
import numpy as np
import pytest

from lsm_jax import checkpoint, errors, metrics, train, trainer
from lsm_jax.data import loader
from lsm_jax.export import __main__ as export_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMOKE = "gin/smoke/llama.gin"
SEQ_LEN, BATCH, STEPS = 32, 8, 6
# The imported model's shapes and RoPE/norm constants; the smoke file's ModelConfig differs only in ffn_dim (192).
HF_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, head_dim=32)
MATCHING_MODEL = [
  "configs.ModelConfig.ffn_dim = 128",
  "configs.ModelConfig.rope_theta = 5000.0",
  "configs.ModelConfig.norm_eps = 1e-5",
]


def _train(model_dir, *bindings, steps=STEPS, gin_file=SMOKE):
  gin.clear_config()
  try:
    train.parse_gin(
      [str(gin_file)],
      [
        f"MODEL_DIR = '{model_dir}'",
        f"TRAIN_STEPS = {steps}",
        f"SEQ_LEN = {SEQ_LEN}",
        f"GLOBAL_BATCH_SIZE = {BATCH}",
        "EVAL_EVERY_STEPS = 0",
        "sharding.MeshConfig.num_devices = 1",
        "optim.OptimizerConfig.warmup_steps = 1",
        "trainer.train.checkpoint_every_steps = 3",
        "trainer.train.sample_prompt = None",
        "trainer.train.progress_bar = False",
        "trainer.train.enable_tensorboard = False",
        *bindings,
      ],
    )
    return gin.get_configurable(trainer.train)(config_text=gin.config_str())
  finally:
    gin.clear_config()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(transformers model, lsm_jax run directory of its import) of a random 2-layer LLaMA with the byte vocabulary."""
  root = tmp_path_factory.mktemp("init_from")
  config = transformers.LlamaConfig(
    **HF_SHAPE,
    vocab_size=264,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=5000.0,
    tie_word_embeddings=True,
    max_position_embeddings=SEQ_LEN,
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():  # norm gains away from 1, weights large enough to matter
      parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter) if "norm" in name else 0.1 * torch.randn_like(parameter))
  model.save_pretrained(str(root / "hf_llama"))
  export_cli.main(["import", f"--hf_dir={root / 'hf_llama'}", f"--run_dir={root / 'imported'}", "--tokenizer=bytes"])
  return model, root / "imported"


def transformers_loss(model, batch):
  """Mean next-token loss of the batch as the trainer defines it, from transformers' logits: every document piece
  of a packed row runs alone at its own positions, targets count where loss_mask is 1."""
  loss_sum, count = 0.0, 0.0
  for row in range(batch["inputs"].shape[0]):
    segments = batch["segment_ids"][row]
    for segment in np.unique(segments[segments > 0]):
      where = segments == segment
      with torch.no_grad():
        logits = model(
          torch.from_numpy(batch["inputs"][row][where][None].astype(np.int64)),
          position_ids=torch.from_numpy(batch["positions"][row][where][None].astype(np.int64)),
        ).logits[0]
      log_probs = torch.log_softmax(logits.double(), -1).numpy()
      token_losses = -log_probs[np.arange(int(where.sum())), batch["targets"][row][where]]
      loss_sum += float(np.sum(token_losses * batch["loss_mask"][row][where]))
      count += float(np.sum(batch["loss_mask"][row][where]))
  return loss_sum / count


def test_run_initialised_from_an_imported_llama_starts_at_transformers_loss_and_learns(imported, tmp_path):
  hf_model, imported_dir = imported
  model_dir = tmp_path / "finetune"
  finetune_gin = tmp_path / "finetune.gin"
  finetune_gin.write_text(
    f"from __gin__ import dynamic_registration\nfrom lsm_jax import trainer\ninclude '{SMOKE}'\n"
    f"MODEL_CONFIG = @trainer.run_model_config()\ntrainer.run_model_config.run_dir = '{imported_dir}'\n"
    f"trainer.train.init_from = '{imported_dir}'\n"
  )
  _train(model_dir, gin_file=finetune_gin)
  losses = [record["loss"] for record in metrics.read_metrics(str(model_dir))]
  assert len(losses) == STEPS
  batch = loader.make_loader("embedded:bytes", seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0).global_batch(0)
  # Step 1's loss is that of batch 0 under the initial parameters: the imported weights, in float32.
  np.testing.assert_allclose(losses[0], transformers_loss(hf_model, batch), atol=1e-4, rtol=0)
  assert losses[-1] < losses[0] - 0.3, losses  # it learns: about 1.4 nats in 6 steps

  run_metadata = checkpoint.read_run_metadata(str(model_dir))
  assert run_metadata["init_from"] == {"path": str(imported_dir), "step": None}
  origin = run_metadata["init_from_milestone"]
  assert (origin["run_dir"], origin["step"], origin["arch"]) == (str(imported_dir), 0, "llama")
  assert origin["imported_from"] == str(imported_dir.parent / "hf_llama") and origin["model_config_changes"] == {}
  assert run_metadata["model_config"] == checkpoint.read_run_metadata(str(imported_dir))["model_config"]
  # Fresh optimizer and step: the run's own milestone 0 holds the imported weights, its accounting starts at 0.
  milestone_zero, metadata = checkpoint.load_milestone(str(model_dir), 0, dtype="float32")
  imported_params, _ = checkpoint.load_milestone(str(imported_dir), 0)
  np.testing.assert_array_equal(
    np.asarray(milestone_zero["embedding"]), np.asarray(imported_params["embedding"]).astype("bfloat16")
  )
  assert metadata["tokens_seen"] == 0

  # Resuming never reads init_from again: the source may be gone, and the run continues from its own checkpoint
  # (the model config then comes from bindings: run_model_config would read the source).
  moved = tmp_path / "moved"
  shutil.move(str(imported_dir), str(moved))
  try:
    _train(
      model_dir,
      *MATCHING_MODEL,
      "configs.ModelConfig.size = 'imported'",
      f"trainer.train.init_from = '{imported_dir}'",
      steps=STEPS + 2,
    )
    assert [record["step"] for record in metrics.read_metrics(str(model_dir))][-3:] == [STEPS, STEPS + 1, STEPS + 2]
    assert checkpoint.read_run_metadata(str(model_dir))["init_from_milestone"] == origin
    # A changed init_from on resume is a change of the run, refused like any other.
    with pytest.raises(errors.ConfigChangeError, match=r"init_from: \{'path': '.*imported', 'step': None\} -> None"):
      _train(model_dir, *MATCHING_MODEL, "configs.ModelConfig.size = 'imported'", steps=STEPS + 4)
  finally:
    shutil.move(str(moved), str(imported_dir))


def test_a_model_config_that_does_not_fit_the_checkpoint_is_refused_before_anything_is_written(imported, tmp_path):
  _, imported_dir = imported
  model_dir = tmp_path / "mismatch"
  # The smoke file's own ModelConfig: ffn_dim 192 where the checkpoint has 128.
  with pytest.raises(
    trainer.InitCheckpointMismatchError,
    match=r"^trainer\.train\.init_from: milestone 0 of .*imported does not fit this run's model_config: 3 "
    r"parameter\(s\) differ in shape: layers\.mlp\.down\.kernel \(2, 128, 64\) in the checkpoint, \(2, 192, 64\) "
    r"in the model; layers\.mlp\.gate\.kernel \(2, 64, 128\) in the checkpoint, \(2, 64, 192\) in the model; "
    r"layers\.mlp\.up\.kernel .*\. ModelConfig fields that differ \(checkpoint -> this run\): ffn_dim 128 -> 192, "
    r"norm_eps 1e-05 -> 1e-06, rope_theta 5000\.0 -> 10000\.0\. Set MODEL_CONFIG to the checkpoint's model",
  ):
    _train(model_dir, f"trainer.train.init_from = '{imported_dir}'")
  assert not (model_dir / "run_metadata.json").exists() and not (model_dir / "checkpoints").exists()
  with pytest.raises(ValueError, match=r"trainer\.train\.init_from_step=3 is not a complete milestone of .*"):
    _train(
      model_dir, *MATCHING_MODEL, f"trainer.train.init_from = '{imported_dir}'", "trainer.train.init_from_step = 3"
    )
  with pytest.raises(ValueError, match=r"init_from_step needs trainer\.train\.init_from"):
    _train(model_dir, "trainer.train.init_from_step = 0")
  with pytest.raises(ValueError, match=r"init_from must be None or a run or milestone directory path, got ''"):
    _train(model_dir, "trainer.train.init_from = ''")
  assert json.loads((imported_dir / "run_metadata.json").read_text())["size"] == "imported"  # the source untouched
  with pytest.raises(
    ValueError, match=r"overrides: unknown ModelConfig field\(s\) \['d_modle'\]; valid: \[.*'d_model'"
  ):
    trainer.run_model_config(str(imported_dir), {"d_modle": 32})
  assert trainer.run_model_config(str(imported_dir), {"dtype": "bfloat16"}).dtype == "bfloat16"
