"""Every experiment file's model and step: the 24 runs of the paper's Table 7 and the ablation runs of §3.6.

  python -m lsm_jax.summary [--format=table|json]

Lists gin/<arch>_<size>.gin and gin/ablations/{aspect,context}/*.gin, each parsed as `lsm_jax.train` parses it
(MODEL_DIR and DATA_DIR bound to placeholders). `non_embedding_params` is counted from the instantiated model's
parameter shapes (`nnx.eval_shape`, so no memory is allocated) minus the tied embedding; `pflops_per_step` is
`lsm_jax.flops.flops_per_step` (the paper's Table-1 expression) at the file's global batch × sequence length.
The 24 main runs stand next to Table 7's values (arXiv 2406.16690); ablation runs have no Table 7 entry.
"""

from __future__ import annotations

import argparse
import glob
import inspect
import json
import math
import os
import re
from typing import Sequence

import gin
import jax
from flax import nnx

from lsm_jax import flops, trainer
from lsm_jax import train as train_cli
from lsm_jax.models import configs
from lsm_jax.models.model import build_model

# Paper Table 7: (non-embedding params in millions, PFLOPs per step at 480 × 8192).
PAPER_TABLE_7 = {
  ("llama", "70m"): (20.5, 1.6),
  ("llama", "160m"): (85.0, 5.6),
  ("llama", "410m"): (334.1, 18.0),
  ("llama", "1b"): (906.2, 40.4),
  ("llama", "3b"): (2775.8, 99.6),
  ("llama", "7b"): (6476.5, 202.7),
  ("tnl", "70m"): (21.2, 0.5),
  ("tnl", "160m"): (87.3, 2.2),
  ("tnl", "410m"): (327.7, 7.9),
  ("tnl", "1b"): (918.6, 22.3),
  ("tnl", "3b"): (2798.4, 66.6),
  ("tnl", "7b"): (6509.6, 154.4),
  ("hgrn2", "70m"): (20.5, 0.5),
  ("hgrn2", "160m"): (84.9, 2.1),
  ("hgrn2", "410m"): (334.0, 8.0),
  ("hgrn2", "1b"): (906.0, 22.0),
  ("hgrn2", "3b"): (2775.5, 66.0),
  ("hgrn2", "7b"): (6476.1, 153.6),
  ("cosformer2", "70m"): (21.3, 0.5),
  ("cosformer2", "160m"): (87.5, 2.3),
  ("cosformer2", "410m"): (328.0, 8.1),
  ("cosformer2", "1b"): (919.1, 22.7),
  ("cosformer2", "3b"): (2799.0, 67.4),
  ("cosformer2", "7b"): (6511.0, 155.6),
}
ABLATION_DIRS = ("gin/ablations/aspect", "gin/ablations/context")
# What the command line must give a runnable experiment file; the summary needs neither.
_PLACEHOLDER_BINDINGS = ("MODEL_DIR = '/unused'", "DATA_DIR = '/unused'")
_TRAIN_DEFAULTS = inspect.signature(trainer.train).parameters


def count_non_embedding_params(config: configs.ModelConfig) -> int:
  """Parameters of the built model minus the tied vocab × d embedding, from abstract shapes only."""
  model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return total - config.vocab_size * config.d_model


def experiment_files(root: str = train_cli.REPO_ROOT) -> list[str]:
  """The runnable experiment files, relative to `root`: the main grid, then the ablations."""
  names = "|".join(configs.ALL_ARCHS), "|".join(configs.SIZES)
  main = [
    path
    for path in glob.glob(os.path.join(root, "gin", "*.gin"))
    if re.fullmatch(rf"({names[0]})_({names[1]})\.gin", os.path.basename(path))
  ]
  ablations = [path for directory in ABLATION_DIRS for path in glob.glob(os.path.join(root, directory, "*.gin"))]
  return [os.path.relpath(path, root) for path in main + ablations]


def _bound(name: str, default):
  """The value gin binds to `name` (a macro's `NAME/macro.value` or `configurable.parameter`), else `default`."""
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


def experiment(gin_files: str | Sequence[str], bindings: Sequence[str] = ()) -> dict:
  """What a run of `gin_files` (an experiment file, or files that later win) and `bindings` trains: its model
  config, context, global batch, steps, milestone count, run name and ablation group. Clears gin's config."""
  with gin.unlock_config():
    gin.clear_config()
    train_cli.parse_gin([gin_files] if isinstance(gin_files, str) else gin_files, [*_PLACEHOLDER_BINDINGS, *bindings])
  try:
    config = gin.query_parameter("MODEL_CONFIG/macro.value").scoped_configurable_fn()
    return dict(
      config=config,
      seq_len=gin.query_parameter("SEQ_LEN/macro.value"),
      global_batch_size=gin.query_parameter("GLOBAL_BATCH_SIZE/macro.value"),
      train_steps=gin.query_parameter("TRAIN_STEPS/macro.value"),
      num_milestones=_bound("trainer.train.num_milestones", _TRAIN_DEFAULTS["num_milestones"].default),
      run_name=_bound("trainer.train.run_name", None) or f"{config.arch}_{config.size}",
      ablation=_bound("trainer.train.ablation", None),
    )
  finally:
    with gin.unlock_config():
      gin.clear_config()


def summary_row(path: str) -> dict:
  """One experiment file's row: its coordinates, parameter count and PFLOPs per step (+ Table 7 if listed)."""
  run = experiment(path)
  config = run["config"]
  pflops = (
    flops.flops_per_step(
      config.arch,
      config.num_layers,
      config.d_model,
      config.num_heads,
      run["global_batch_size"],
      run["seq_len"],
      layer_pattern=config.layer_pattern,
    )
    / 1e15
  )
  paper = PAPER_TABLE_7.get((config.arch, config.size)) if run["ablation"] is None else None
  return dict(
    file=path,
    run_name=run["run_name"],
    ablation=run["ablation"],
    arch=config.arch,
    size=config.size,
    layer_pattern=config.layer_pattern,
    num_layers=config.num_layers,
    d_model=config.d_model,
    num_heads=config.num_heads,
    ffn_dim=config.ffn_dim,
    seq_len=run["seq_len"],
    global_batch_size=run["global_batch_size"],
    non_embedding_params=count_non_embedding_params(config),
    paper_non_embedding_params=round(paper[0] * 1e6) if paper else None,
    pflops_per_step=pflops,
    paper_pflops_per_step=paper[1] if paper else None,
  )


def summary_rows() -> list[dict]:
  """Rows of every experiment file: the main grid by (arch, size), then each ablation group by arch and shape."""
  rows = [summary_row(path) for path in experiment_files()]
  size_order = {size: index for index, size in enumerate(configs.SIZES)}
  arch_order = {arch: index for index, arch in enumerate(configs.ALL_ARCHS)}
  return sorted(
    rows,
    key=lambda row: (
      row["ablation"] or "",
      arch_order[row["arch"]],
      size_order[row["size"]],
      row["d_model"],
      row["seq_len"],
    ),
  )


def _cell(value, width: int, scale: float = 1.0, digits: int = 1) -> str:
  return f"{'—':>{width}}" if value is None else f"{value / scale:>{width}.{digits}f}"


def format_table(rows) -> str:
  header = (
    f"{'run':<20}{'group':<8}{'l':>4}{'d':>6}{'h':>4}{'g':>7}{'ctx':>7}{'batch':>6}{'params (M)':>12}"
    f"{'paper':>9}{'PFLOPs/step':>13}{'paper':>8}"
  )
  lines = [header, "-" * len(header)]
  for row in rows:
    lines.append(
      f"{row['run_name']:<20}{row['ablation'] or 'main':<8}{row['num_layers']:>4}{row['d_model']:>6}"
      f"{row['num_heads']:>4}{row['ffn_dim']:>7}{row['seq_len']:>7}{row['global_batch_size']:>6}"
      f"{row['non_embedding_params'] / 1e6:>12.1f}{_cell(row['paper_non_embedding_params'], 9, 1e6)}"
      f"{row['pflops_per_step']:>13.2f}{_cell(row['paper_pflops_per_step'], 8)}"
    )
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--format", choices=("table", "json"), default="table")
  args = parser.parse_args(argv)
  rows = summary_rows()
  print(json.dumps(rows, indent=1) if args.format == "json" else format_table(rows))


if __name__ == "__main__":
  main()
