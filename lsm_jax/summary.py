"""The 24 model configurations beside the paper's Table 7.

  python -m lsm_jax.summary [--format=table|json]

`non_embedding_params` is counted from the instantiated model's parameter shapes (`nnx.eval_shape`, so no
memory is allocated) minus the tied embedding; `pflops_per_step` is `lsm_jax.flops.flops_per_step` (the
paper's Table-1 expression) at 480 sequences × 8192 tokens. Both stand next to Table 7's values.
"""
from __future__ import annotations

import argparse
import json
import math

import jax
from flax import nnx

from lsm_jax import flops
from lsm_jax.models import configs
from lsm_jax.models.model import build_model

BATCH_SIZE = 480
SEQ_LEN = 8192

# Paper Table 7: (non-embedding params in millions, PFLOPs per step at 480 × 8192).
PAPER_TABLE_7 = {
    ("llama", "70m"): (20.5, 1.6), ("llama", "160m"): (85.0, 5.6), ("llama", "410m"): (334.1, 18.0),
    ("llama", "1b"): (906.2, 40.4), ("llama", "3b"): (2775.8, 99.6), ("llama", "7b"): (6476.5, 202.7),
    ("tnl", "70m"): (21.2, 0.5), ("tnl", "160m"): (87.3, 2.2), ("tnl", "410m"): (327.7, 7.9),
    ("tnl", "1b"): (918.6, 22.3), ("tnl", "3b"): (2798.4, 66.6), ("tnl", "7b"): (6509.6, 154.4),
    ("hgrn2", "70m"): (20.5, 0.5), ("hgrn2", "160m"): (84.9, 2.1), ("hgrn2", "410m"): (334.0, 8.0),
    ("hgrn2", "1b"): (906.0, 22.0), ("hgrn2", "3b"): (2775.5, 66.0), ("hgrn2", "7b"): (6476.1, 153.6),
    ("cosformer2", "70m"): (21.3, 0.5), ("cosformer2", "160m"): (87.5, 2.3), ("cosformer2", "410m"): (328.0, 8.1),
    ("cosformer2", "1b"): (919.1, 22.7), ("cosformer2", "3b"): (2799.0, 67.4), ("cosformer2", "7b"): (6511.0, 155.6),
}


def count_non_embedding_params(config: configs.ModelConfig) -> int:
  """Parameters of the built model minus the tied vocab × d embedding, from abstract shapes only."""
  model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return total - config.vocab_size * config.d_model


def summary_rows() -> list[dict]:
  rows = []
  for arch in configs.ARCHS:
    for size in configs.SIZES:
      config = configs.get_config(arch, size)
      paper_params_m, paper_pflops = PAPER_TABLE_7[(arch, size)]
      pflops = flops.flops_per_step(arch, config.num_layers, config.d_model, config.num_heads, BATCH_SIZE,
                                    SEQ_LEN) / 1e15
      rows.append(dict(arch=arch, size=size, num_layers=config.num_layers, d_model=config.d_model,
                       num_heads=config.num_heads, ffn_dim=config.ffn_dim,
                       non_embedding_params=count_non_embedding_params(config),
                       paper_non_embedding_params=round(paper_params_m * 1e6),
                       pflops_per_step=pflops, paper_pflops_per_step=paper_pflops))
  return rows


def format_table(rows) -> str:
  header = (f"{'arch':<11}{'size':<6}{'l':>4}{'d':>6}{'h':>4}{'g':>7}{'params (M)':>12}{'paper':>9}"
            f"{'PFLOPs/step':>13}{'paper':>8}")
  lines = [header, "-" * len(header)]
  for row in rows:
    lines.append(f"{row['arch']:<11}{row['size']:<6}{row['num_layers']:>4}{row['d_model']:>6}{row['num_heads']:>4}"
                 f"{row['ffn_dim']:>7}{row['non_embedding_params'] / 1e6:>12.1f}"
                 f"{row['paper_non_embedding_params'] / 1e6:>9.1f}{row['pflops_per_step']:>13.2f}"
                 f"{row['paper_pflops_per_step']:>8.1f}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--format", choices=("table", "json"), default="table")
  args = parser.parse_args(argv)
  rows = summary_rows()
  print(json.dumps(rows, indent=1) if args.format == "json" else format_table(rows))


if __name__ == "__main__":
  main()
