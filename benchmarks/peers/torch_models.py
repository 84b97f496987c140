"""Training throughput of the PyTorch peers that benchmarks/train_step.py compares against.

fla's HGRN2ForCausalLM, fla's RetNetForCausalLM (the fixed-decay peer of TNL: one decay per head, head dim 128
for keys and values) and Hugging Face's LlamaForCausalLM (SDPA attention) at the paper's 410M and 1B shapes
(arXiv 2406.16690 Table 2, head dim 128, vocabulary 100,280, tied embeddings), bf16 autocast with fp32 fused AdamW,
a fixed number of tokens per step (default 32,768, the same as train_step.py). Per (model, size, sequence length):
median step time of 6 steps after 3 warm-up steps (step s + 1 queued before step s's loss is read, as
benchmarks/train_step.py times lsm_jax), tokens/s and the peak of torch's allocated memory. A failing shape
(e.g. out of memory) becomes a row with an error. Rows are written after every shape, so a run cut off by a time
limit keeps what it measured.

On a GPU machine with torch, transformers and fla (pip install flash-linear-attention==0.6.0 fla-core==0.6.0):
  python3 benchmarks/peers/torch_models.py --out benchmarks/peers/torch_models_h200.json \
      --sizes 410m,1b --seq_lens 2048,8192,32768 --models hgrn2,llama
fla's first call autotunes its Triton kernels (minutes per process), which the warm-up steps absorb.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
import traceback

import torch
from provenance import package_versions  # benchmarks/peers/, the script's own directory

# Layers, width, heads and GLU width of the paper's shapes (head dim 128, 1B GLU width 4096).
SIZES = {"410m": dict(d=1024, layers=26, heads=8, ffn=2816), "1b": dict(d=1536, layers=32, heads=12, ffn=4096)}
MODELS = ("hgrn2", "retnet", "llama")
VOCAB = 100280


def build(model: str, size: str, max_seq_len: int) -> torch.nn.Module:
  shape = SIZES[size]
  fla_shape = dict(
    hidden_size=shape["d"],
    num_hidden_layers=shape["layers"],
    num_heads=shape["heads"],
    intermediate_size=shape["ffn"],
    vocab_size=VOCAB,
    tie_word_embeddings=True,
    fuse_cross_entropy=True,
  )
  if model == "hgrn2":
    from fla.models import HGRN2Config, HGRN2ForCausalLM

    return HGRN2ForCausalLM(HGRN2Config(expand_ratio=None, **fla_shape))
  if model == "retnet":
    from fla.models import RetNetConfig, RetNetForCausalLM

    return RetNetForCausalLM(RetNetConfig(expand_k=1, expand_v=1, hidden_ratio=None, **fla_shape))
  from transformers import LlamaConfig, LlamaForCausalLM

  config = LlamaConfig(
    hidden_size=shape["d"],
    num_hidden_layers=shape["layers"],
    num_attention_heads=shape["heads"],
    num_key_value_heads=shape["heads"],
    intermediate_size=shape["ffn"],
    vocab_size=VOCAB,
    tie_word_embeddings=True,
    max_position_embeddings=max_seq_len,
    attn_implementation="sdpa",
  )
  return LlamaForCausalLM(config)


def bench(
  model_name: str, size: str, seq_len: int, tokens_per_step: int, max_seq_len: int, steps: int = 6, warmup: int = 3
) -> dict:
  torch.manual_seed(0)
  model = build(model_name, size, max_seq_len).cuda()
  num_params = sum(p.numel() for p in model.parameters())
  optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
  batch = max(1, tokens_per_step // seq_len)
  tokens = torch.randint(0, VOCAB, (batch, seq_len), device="cuda")
  torch.cuda.reset_peak_memory_stats()

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  start = time.perf_counter()
  for _ in range(warmup):
    step()
  torch.cuda.synchronize()
  warmup_s = time.perf_counter() - start
  # The loop lsm_jax's trainer runs (benchmarks/train_step.py times it the same way): step s + 1 is queued
  # before step s's loss is read; a step's time is the interval between consecutive completions.
  completions = []
  unread = step()
  for _ in range(steps):
    loss = step()
    unread.item()
    completions.append(time.perf_counter())
    unread = loss
  unread.item()
  completions.append(time.perf_counter())
  step_s = statistics.median(b - a for a, b in zip(completions, completions[1:]))
  synced = []
  for _ in range(steps):
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    synced.append(time.perf_counter() - start)
  row = dict(
    model=model_name,
    size=size,
    seq=seq_len,
    batch=batch,
    params=num_params,
    step_s=step_s,
    tokens_per_s=batch * seq_len / step_s,
    timing="run_ahead",
    synced_step_s=statistics.median(synced),
    peak_gib=torch.cuda.max_memory_allocated() / 2**30,
    warmup_s=warmup_s,
  )
  return row


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="JSON file to write")
  parser.add_argument("--sizes", default="410m,1b", help=f"comma-separated, of {sorted(SIZES)}")
  parser.add_argument("--seq_lens", default="2048,8192,32768")
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
  parser.add_argument("--tokens_per_step", type=int, default=32768)
  args = parser.parse_args(argv)
  sizes, models = args.sizes.split(","), args.models.split(",")
  for name, chosen, valid in (("--sizes", sizes, SIZES), ("--models", models, MODELS)):
    if unknown := [value for value in chosen if value not in valid]:
      parser.error(f"{name}: unknown {unknown}; valid: {sorted(valid)}")
  seq_lens = [int(value) for value in args.seq_lens.split(",")]
  device = torch.cuda.get_device_properties(0)
  record = {
    "provenance": {
      "script": "benchmarks/peers/torch_models.py",
      "command": "python3 benchmarks/peers/torch_models.py "
      + " ".join(f"--{key} {value}" for key, value in vars(args).items()),
      "packages": package_versions("torch", "transformers", "triton", "fla"),
      "device": f"{torch.cuda.device_count()}x {device.name} ({device.total_memory / 1e9:.0f} GB)",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "setup": "bf16 autocast, fp32 fused AdamW (lr 3e-4, weight decay 0.1), tied embeddings; fla "
      "HGRN2ForCausalLM and RetNetForCausalLM (fused cross-entropy), transformers LlamaForCausalLM (sdpa); "
      "after 3 warm-up steps, the median of 6 intervals between step completions with step s + 1 queued before "
      "step s's loss is read (run-ahead), and of 6 steps each synchronized (synced_step_s)",
    },
    "tokens_per_step": args.tokens_per_step,
    "results": [],
  }
  for size in sizes:
    for seq_len in seq_lens:
      for model in models:
        try:
          row = bench(model, size, seq_len, args.tokens_per_step, max(seq_lens))
        except Exception as error:  # one failing shape (e.g. out of memory) must not stop the table
          traceback.print_exc()
          row = dict(model=model, size=size, seq=seq_len, error=repr(error)[:300])
        torch.cuda.empty_cache()  # the finished shape's model and optimizer are gone with bench()'s frame
        record["results"].append(row)
        print(json.dumps(row), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
          json.dump(record, f, indent=1)
  return record


if __name__ == "__main__":
  main()
