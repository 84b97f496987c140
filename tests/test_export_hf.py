"""Hugging Face export and import, checked against lsm_jax itself: transformers' logits and greedy continuations of
every architecture's export and of hybrid stacks, the exported tokenizers, a transformers LLaMA imported into a run,
and lm-eval's `hf` model on an export."""

import dataclasses
import importlib
import importlib.util
import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from lsm_jax import checkpoint
from lsm_jax.data import tokenizer as tokenizer_lib
from lsm_jax.export import __main__ as export_cli
from lsm_jax.export import hf, hf_tokenizer
from lsm_jax.models import build_model, get_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ARCHS = ("llama", "tnl", "hgrn2", "cosformer2")
# (pattern, layers) of hybrids: HGRN2's 3:1 and a TNL/cosFormer2 mix whose block repeats, so that its scanned
# runs stack layers (0, 3), (1, 4) and (2, 5) (two softmax layers, two TNL layers sharing the decay depth).
HYBRIDS = {"hgrn2_hybrid": ("hgrn2*3,llama", 4), "tnl_hybrid": ("tnl,cosformer2,llama", 6)}
TEXT = "Hello, world! Ünïcödé 日本語 🤖\n\n  code(x) 1234567 it's THEY'RE\ttabs <|endoftext|> as text"
DTYPE_KEY = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # the tiny models gain nothing from threads on a shared CPU
  yield
  torch.set_num_threads(threads)


def tiny_config(arch, **overrides):
  # init_std 0.1 gives logits spread enough that greedy decoding has clear winners.
  shape = dict(num_layers=2, d_model=256, num_heads=2, ffn_dim=384, vocab_size=264)
  return get_config(arch, "70m", **{**shape, **overrides}, init_std=0.1, dtype="float32", rope_theta=5000.0)


def random_model(config, seed=1):
  """The model of `config` with seeded normal(0, init_std) weights, norm gains near one and non-uniform HGRN2
  lower-bound logits (they exercise the softmax over layers); filled from the abstract model, which skips the
  initialisers' compilation."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0))), nnx.Param)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return 1.0 + 0.1 * noise
    return noise if "lower_bound_logits" in name else config.init_std * noise

  nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(fill, params.to_pure_dict()))
  return nnx.merge(graphdef, params)


def export_tiny(config, tmp_path_factory):
  """(JAX model, export directory) of a random `config` saved as milestone 6 of a run with the byte tokenizer."""
  arch = config.arch
  model = random_model(config)
  run_dir = tmp_path_factory.mktemp(f"{arch}_run")
  saver = checkpoint.Checkpointer(
    str(run_dir),
    save_interval_steps=100,
    max_to_keep=1,
    milestone_steps=[6],
    milestone_dtype="float32",
    async_save=False,
    run_metadata={
      "arch": arch,
      "size": "70m",
      "model_config": dataclasses.asdict(config),
      "tokenizer": "bytes",
      "seq_len": 128,
    },
  )
  saver.save(6, {"params": nnx.state(model, nnx.Param).to_pure_dict()}, metadata={"tokens_seen": 6 * 128})
  saver.close()
  (run_dir / "metrics.jsonl").write_text('{"step": 4, "val_loss": 5.25}\n{"step": 8, "val_loss": 4.5}\n')
  out_dir = tmp_path_factory.mktemp(f"{arch}_hf")
  hf.export_hf(str(run_dir), str(out_dir), verify=False)
  return model, str(out_dir)


@pytest.fixture(scope="module", params=ARCHS)
def exported(request, tmp_path_factory):
  """(arch, JAX model, export directory) of a 2-layer model."""
  return request.param, *export_tiny(tiny_config(request.param), tmp_path_factory)


@pytest.fixture(scope="module", params=sorted(HYBRIDS))
def exported_hybrid(request, tmp_path_factory):
  """(JAX model, export directory) of a hybrid stack."""
  pattern, num_layers = HYBRIDS[request.param]
  return export_tiny(tiny_config(request.param, num_layers=num_layers, layer_pattern=pattern), tmp_path_factory)


def load(out_dir):
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
    out_dir, trust_remote_code=True, output_loading_info=True, **{DTYPE_KEY: torch.float32}
  )
  return model.eval(), info


def jax_greedy(model, prompt, new_tokens):
  """lsm_jax's own generation: prefill, then decode_step with the recurrent state / KV cache."""
  tokens = jnp.asarray([prompt], jnp.int32)
  logits, state = model.prefill(
    tokens,
    segment_ids=jnp.ones_like(tokens),
    positions=jnp.arange(len(prompt), dtype=jnp.int32)[None],
    max_length=len(prompt) + new_tokens,
  )
  step = nnx.jit(lambda model, token, state: model.decode_step(token, state))
  token, generated = jnp.argmax(logits[:, -1], -1).astype(jnp.int32), []
  for _ in range(new_tokens):
    generated.append(int(token[0]))
    logits, state = step(model, token, state)
    token = jnp.argmax(logits, -1).astype(jnp.int32)
  return generated


def test_export_loads_with_transformers_and_gives_the_jax_logits(exported):
  arch, model, out_dir = exported
  hf_model, info = load(out_dir)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
  expected_class = "LlamaForCausalLM" if arch == "llama" else "LsmForCausalLM"
  assert type(hf_model).__name__ == expected_class
  config = json.loads(open(f"{out_dir}/config.json").read())
  assert ("auto_map" in config) == (arch != "llama")  # LLaMA needs no remote code
  tokens = np.random.default_rng(5).integers(0, 264, size=(2, 80))  # crosses the 64-token chunk boundary
  expected = np.asarray(jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32)))
  with torch.no_grad():
    actual = hf_model(torch.from_numpy(tokens)).logits.numpy()
  assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero logits
  np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def until_eos(ids, eos=256):
  """Greedy generation stops at EOS (transformers pads the rest)."""
  return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_greedy_generation_matches_lsm_jax_through_the_recurrent_path(exported, monkeypatch):
  arch, model, out_dir = exported
  hf_model, _ = load(out_dir)
  prompt, new_tokens = [72, 101, 108, 108, 111, 44, 32, 119, 111], 12
  expected = jax_greedy(model, prompt, new_tokens)
  steps = []
  if arch != "llama":  # count the one-token recurrent updates generate makes
    module = sys.modules[type(hf_model).__module__]
    step = module.linear_attention_step
    monkeypatch.setattr(module, "linear_attention_step", lambda *args: steps.append(1) or step(*args))
  with torch.no_grad():
    generated = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=256)
  assert until_eos(generated[0, len(prompt) :].tolist()) == until_eos(expected)
  if arch != "llama" and 256 not in expected:
    assert len(steps) == (new_tokens - 1) * 2  # every token after the first, in each of the 2 layers
  # Left padding: the shorter prompt of a batch continues exactly as when alone.
  short = prompt[3:]
  batch = torch.tensor([prompt, [256] * 3 + short])
  mask = torch.tensor([[1] * len(prompt), [0] * 3 + [1] * len(short)])
  with torch.no_grad():
    padded = hf_model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=256)
  assert until_eos(padded[0, len(prompt) :].tolist()) == until_eos(expected[:6])
  assert until_eos(padded[1, len(prompt) :].tolist()) == until_eos(jax_greedy(model, short, 6))


def test_hybrid_export_gives_the_jax_logits_and_generates_with_mixed_caches(exported_hybrid, monkeypatch):
  """Each layer has its own mixer (softmax layers RoPE and a KV cache, linear ones their recurrent state): the
  logits are lsm_jax's, and greedy generation with the mixed cache equals a full forward per token (so lsm_jax's
  greedy continuation, whose logits these are)."""
  model, out_dir = exported_hybrid
  hf_model, info = load(out_dir)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
  assert type(hf_model).__name__ == "LsmForCausalLM"
  config = json.loads(open(f"{out_dir}/config.json").read())
  assert config["layer_mixers"] == list(model.config.layer_mixers) and config["arch"] in ARCHS
  mixers = [type(layer.token_mixer).__name__ for layer in hf_model.layers]
  softmax_layers = model.config.layer_mixers.count("llama")
  assert mixers.count("SoftmaxAttentionMixer") == softmax_layers > 0
  tokens = np.random.default_rng(5).integers(0, 264, size=(2, 80))
  expected = np.asarray(jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32)))
  with torch.no_grad():
    actual = hf_model(torch.from_numpy(tokens)).logits.numpy()
  assert np.abs(expected).max() > 1.0
  np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)
  # The cache continues a prefix: token by token (the recurrent step, one new key), then a chunk (the chunked
  # form from a state, queries offset by the cached keys), as the full forward.
  module = sys.modules[type(hf_model).__module__]
  with torch.no_grad():
    state = getattr(hf_model(torch.from_numpy(tokens[:, :50]), use_cache=True), module.CACHE_FIELD)
    continued = []
    for start, end in ((50, 51), (51, 52), (52, 53), (53, 80)):
      output = hf_model(torch.from_numpy(tokens[:, start:end]), past_key_values=state, use_cache=True)
      continued.append(output.logits.numpy())
      state = getattr(output, module.CACHE_FIELD)
  np.testing.assert_allclose(np.concatenate(continued, 1), expected[:, 50:], atol=1e-4, rtol=0)
  card = open(f"{out_dir}/README.md").read()
  assert f"layer pattern {model.config.layer_pattern}" in card and "trust_remote_code=True" in card

  prompt, new_tokens = [72, 101, 108, 108, 111, 44, 32, 119, 111], 12
  steps = []
  step = module.linear_attention_step
  monkeypatch.setattr(module, "linear_attention_step", lambda *args: steps.append(1) or step(*args))

  def greedy(ids, mask=None, use_cache=True, max_new_tokens=new_tokens):
    with torch.no_grad():
      generated = hf_model.generate(
        torch.tensor(ids),
        attention_mask=None if mask is None else torch.tensor(mask),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=256,
        use_cache=use_cache,
      )
    return [until_eos(row[len(ids[0]) :].tolist()) for row in generated]

  (cached,) = greedy([prompt])
  if 256 not in cached:
    # every token after the first, in each linear layer
    assert len(steps) == (new_tokens - 1) * (model.config.num_layers - softmax_layers)
  steps.clear()
  assert greedy([prompt], use_cache=False) == [cached] and not steps  # a full forward per token
  # Left padding: the KV cache and the states skip it, so the shorter prompt continues as when alone.
  short = prompt[3:]
  padded = greedy([prompt, [256] * 3 + short], [[1] * len(prompt), [0] * 3 + [1] * len(short)], max_new_tokens=6)
  assert padded == [until_eos(cached[:6]), *greedy([short], max_new_tokens=6)]


def test_export_writes_tokenizer_generation_config_and_model_card(exported):
  arch, _, out_dir = exported
  tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
  assert tokenizer(TEXT)["input_ids"] == tokenizer_lib.ByteTokenizer().encode(TEXT)
  assert tokenizer.decode(tokenizer(TEXT)["input_ids"]) == TEXT
  assert tokenizer.eos_token_id == 256 and len(tokenizer) == 264
  generation = transformers.GenerationConfig.from_pretrained(out_dir)
  assert generation.eos_token_id == 256 and generation.do_sample is False
  card = open(f"{out_dir}/README.md").read()
  parameters = sum(value.size for value in safetensors.numpy.load_file(f"{out_dir}/model.safetensors").values())
  assert f"| Parameters | {parameters:,} |" in card and "| Tokens seen | 768 |" in card
  assert "| Validation loss | 5.25 |" in card  # the last one logged at or before the milestone (step 6)
  assert arch in card and "arXiv 2406.16690" in card


def test_cl100k_tokenizer_file_encodes_like_lsm_jax(tmp_path):
  special = hf_tokenizer.write_tokenizer_files("cl100k", str(tmp_path), model_max_length=2048)
  assert special == {"eos_token": "<|endoftext|>", "eos_token_id": 100257}
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  ours = tokenizer_lib.get_tokenizer("cl100k")
  texts = [TEXT, "The quick brown fox's 1234567 jumps.\r\n\n   indented\n", "x" * 300 + " y", "  trailing  "]
  for text in texts:
    assert tokenizer(text)["input_ids"] == ours.encode(text), text
    assert tokenizer.decode(ours.encode(text)) == text
  assert len(tokenizer) == tokenizer_lib.CL100K_VOCAB_SIZE and tokenizer.eos_token_id == 100257
  assert tokenizer.convert_ids_to_tokens([100276, 100256]) == ["<|endofprompt|>", "<|reserved_special_token_100256|>"]


@pytest.mark.parametrize("exported", ["tnl"], indirect=True)
def test_missing_weights_are_refused(exported, tmp_path):
  _, model, out_dir = exported
  params = nnx.state(model, nnx.Param).to_pure_dict()
  check = hf.verify_export(out_dir, params, dataclasses.asdict(model.config))
  assert check["verified"] and check["max_abs_logit_difference"] < 1e-4
  damaged = tmp_path / "damaged"
  shutil.copytree(out_dir, damaged)
  weights = safetensors.numpy.load_file(str(damaged / "model.safetensors"))
  del weights["layers.1.token_mixer.o_proj.weight"]
  safetensors.numpy.save_file(weights, str(damaged / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(hf.ExportVerificationError, match=r"missing_keys.*layers\.1\.token_mixer\.o_proj\.weight"):
    hf.verify_export(str(damaged), params, dataclasses.asdict(model.config))


def tiny_hf_llama(tmp_path, **overrides):
  shape = dict(
    vocab_size=264,
    hidden_size=256,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    max_position_embeddings=128,
    rope_theta=5000.0,
  )
  config = transformers.LlamaConfig(**{**shape, **overrides})
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():  # norm gains away from 1, weights large enough to matter
      parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter) if "norm" in name else 0.1 * torch.randn_like(parameter))
  model.save_pretrained(str(tmp_path / "hf_llama"))
  return model, tmp_path / "hf_llama"


def test_imported_llama_gives_transformers_logits_and_exports_back(tmp_path):
  from lsm_jax.evaluate import engine

  hf_model, hf_dir = tiny_hf_llama(tmp_path)
  export_cli.main(["import", f"--hf_dir={hf_dir}", f"--run_dir={tmp_path / 'run'}", "--tokenizer=bytes"])
  model, _, run_metadata, _ = engine.load_model(str(tmp_path / "run"), dtype="float32")
  assert run_metadata["model_config"]["rope_theta"] == 5000.0 and run_metadata["model_config"]["norm_eps"] == 1e-5
  tokens = np.random.default_rng(1).integers(0, 264, size=(2, 40))
  with torch.no_grad():
    expected = hf_model(torch.from_numpy(tokens)).logits.numpy()
  actual = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)
  # lsm_jax -> transformers gives back the very tensors it read.
  hf.export_hf(str(tmp_path / "run"), str(tmp_path / "back"), verify=False)
  original = safetensors.numpy.load_file(str(hf_dir / "model.safetensors"))
  back = safetensors.numpy.load_file(str(tmp_path / "back" / "model.safetensors"))
  assert sorted(back) == sorted(original)
  for name in original:
    np.testing.assert_array_equal(back[name], original[name], err_msg=name)


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"num_key_value_heads": 1}, "num_key_value_heads=1 != num_attention_heads=2"),
    ({"tie_word_embeddings": False}, "untied output head"),
    ({"attention_bias": True}, "biases"),
    ({"vocab_size": 200}, "tokenizer has 264 ids but the model's vocab_size is 200"),
  ],
)
def test_llama_import_refuses_what_lsm_jax_cannot_represent(tmp_path, overrides, message):
  _, hf_dir = tiny_hf_llama(tmp_path, **overrides)
  with pytest.raises(ValueError, match=message):
    hf.import_llama(str(hf_dir), str(tmp_path / "run"), tokenizer="bytes")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("exported", ["hgrn2"], indirect=True)  # one architecture with remote code
def test_lm_eval_hf_model_runs_a_local_task_on_an_export(exported, tmp_path):
  _, _, out_dir = exported
  lm_eval = pytest.importorskip("lm_eval")
  pytest.importorskip("accelerate")  # lm-eval's hf model imports it
  from lm_eval.tasks import TaskManager

  docs = [
    {"question": "Is fire hot or cold?", "choices": ["hot", "cold"], "label": 0},
    {"question": "Two plus two is", "choices": ["three", "four", "five"], "label": 1},
    {"question": "Ice is", "choices": ["warm", "frozen"], "label": 1},
  ]
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
  (tmp_path / "toy_choice.yaml").write_text(
    "task: toy_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
    f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
    'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: label\ndoc_to_choice: "{{choices}}"\n'
    "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
  )
  results = lm_eval.simple_evaluate(
    model="hf",
    model_args=f"pretrained={out_dir},trust_remote_code=True,dtype=float32,device=cpu",
    tasks=["toy_choice"],
    task_manager=TaskManager(include_path=str(tmp_path)),
    batch_size=1,
    log_samples=True,
  )
  # The same scores computed directly with the exported model: sum of log-probabilities of each answer's bytes.
  hf_model, _ = load(out_dir)
  scores, correct = {}, []
  for doc in docs:
    context = list(f"Question: {doc['question']}\nAnswer:".encode())
    doc_scores = []
    for choice in doc["choices"]:
      answer = list(f" {choice}".encode())
      with torch.no_grad():
        logits = hf_model(torch.tensor([context + answer])).logits[0].log_softmax(-1)
      doc_scores.append(sum(float(logits[len(context) - 1 + i, token]) for i, token in enumerate(answer)))
    scores[doc["question"]] = doc_scores
    correct.append(float(np.argmax(doc_scores) == doc["label"]))
  for sample in results["samples"]["toy_choice"]:
    lm_eval_scores = [loglikelihood for loglikelihood, _ in sample["filtered_resps"]]
    np.testing.assert_allclose(lm_eval_scores, scores[sample["doc"]["question"]], atol=1e-4)
  assert results["results"]["toy_choice"]["acc,none"] == pytest.approx(np.mean(correct))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_parallel_form_matches_the_recurrent_step(device):
  """The chunked parallel form (plain torch on CPU; fla's chunk_gla on CUDA when fla is installed) equals the
  one-token recurrence generation uses, with per-channel decays and an initial state."""
  if device == "cuda" and (not torch.cuda.is_available() or importlib.util.find_spec("fla") is None):
    pytest.skip("needs CUDA and fla (flash-linear-attention)")
  modeling = importlib.import_module("lsm_jax.export.modeling_lsm")
  generator = torch.Generator().manual_seed(0)
  batch, length, heads, dim = 2, 100, 2, 32
  q, k, v = (torch.randn(batch, length, heads, dim, generator=generator) * 0.3 for _ in range(3))
  log_decay = torch.nn.functional.logsigmoid(torch.randn(batch, length, heads, dim, generator=generator) + 3)
  initial = torch.randn(batch, heads, dim, dim, generator=generator) * 0.1
  expected, state = [], initial.double()
  for t in range(length):  # float64: S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t, o_t = q_t S_t
    state = log_decay[:, t].double().exp()[..., None] * state + k[:, t, ..., None].double() * v[:, t, :, None].double()
    expected.append(torch.einsum("bhk,bhkv->bhv", q[:, t].double(), state))
  actual, final = modeling.chunked_linear_attention(*(x.to(device) for x in (q, k, v, log_decay, initial)))
  tolerance = 1e-5 if device == "cpu" else 2e-3  # fla computes in tf32
  np.testing.assert_allclose(actual.cpu().numpy(), torch.stack(expected, 1).numpy(), atol=tolerance, rtol=tolerance)
  np.testing.assert_allclose(final.cpu().numpy(), state.numpy(), atol=tolerance, rtol=tolerance)


def test_trained_smoke_run_exports_with_its_metadata(tmp_path):
  """A freshly trained smoke run (gin/smoke/hgrn2.gin, 4 steps) through the CLI with verification: transformers'
  logits and greedy continuation are lsm_jax's, the card carries the run's tokens, compute and validation loss."""
  import gin

  from lsm_jax import metrics, train, trainer
  from lsm_jax.evaluate import engine

  run_dir = str(tmp_path / "run")
  gin.clear_config()
  try:
    train.parse_gin(
      ["gin/smoke/hgrn2.gin"],
      [
        f"MODEL_DIR = '{run_dir}'",
        "TRAIN_STEPS = 4",
        "EVAL_EVERY_STEPS = 4",
        "sharding.MeshConfig.num_devices = 1",
        "trainer.train.sample_prompt = None",
        "trainer.train.enable_tensorboard = False",
        "trainer.train.progress_bar = False",
      ],
    )
    gin.get_configurable(trainer.train)(config_text=gin.config_str())
  finally:
    gin.clear_config()
  export_cli.main([f"--checkpoint={run_dir}", f"--out={tmp_path / 'hf'}"])
  provenance = json.loads((tmp_path / "hf" / "lsm_jax_export.json").read_text())
  assert provenance["verification"]["verified"] and provenance["verification"]["max_abs_logit_difference"] < 1e-4
  last = metrics.read_metrics(run_dir)[-1]
  assert provenance["step"] == 4 and provenance["tokens_seen"] == last["tokens_seen"] == 4 * 16 * 128
  assert provenance["compute_pflops_days"] == pytest.approx(last["compute_pflops_days"])
  assert provenance["validation_loss"] == pytest.approx(last["val_loss"])
  card = (tmp_path / "hf" / "README.md").read_text()
  assert f"| Validation loss | {last['val_loss']:.6g} |" in card and "| Tokens seen | 8,192 |" in card
  model, *_ = engine.load_model(run_dir, dtype="float32")
  hf_model, _ = load(str(tmp_path / "hf"))
  prompt = list(b"Hello, wo")
  with torch.no_grad():
    generated = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=256)
  assert until_eos(generated[0, len(prompt) :].tolist()) == until_eos(jax_greedy(model, prompt, 10))
