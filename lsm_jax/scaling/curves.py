"""Reading and validating the tidy tables the scaling analysis consumes.

Training curves: one row per logged point, columns ``arch, size, non_embedding_params, tokens,
compute_pflops_days, loss``. Evaluation table: ``arch, size, step, tokens, compute_pflops_days, task,
metric, value``. Both come as CSV or JSON lines (one object per line).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import numpy as np

from lsm_jax import flops

CURVE_COLUMNS = ("arch", "size", "non_embedding_params", "tokens", "compute_pflops_days", "loss")
EVAL_COLUMNS = ("arch", "size", "step", "tokens", "compute_pflops_days", "task", "metric", "value")
_TEXT_COLUMNS = ("arch", "size", "task", "metric")


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a model size of one architecture, its points in logging order."""

  arch: str
  size: str
  non_embedding_params: float
  tokens: np.ndarray
  compute_pflops_days: np.ndarray
  loss: np.ndarray


def read_rows(path: str | os.PathLike) -> list[dict]:
  """Rows of a CSV or JSON-lines file as dicts (JSON lines when the first non-blank character is '{')."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ValueError(f"table file {path!r} does not exist")
  with open(path, encoding="utf-8") as file:
    text = file.read()
  if text.lstrip().startswith("{"):
    rows = []
    for line_number, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{line_number} is not a JSON object ({error.msg})") from None
    return rows
  return list(csv.DictReader(text.splitlines()))


def parse_table(rows: list[dict], columns: tuple[str, ...], name: str) -> dict[str, np.ndarray]:
  """Column arrays after checking every required column is there and every numeric cell parses."""
  if not rows:
    raise ValueError(f"the {name} table has no rows; expected columns {', '.join(columns)}")
  missing = [column for column in columns if column not in rows[0]]
  if missing:
    raise ValueError(
      f"the {name} table lacks column(s) {', '.join(missing)}; required columns are {', '.join(columns)}"
    )
  table = {}
  for column in columns:
    values = [row.get(column) for row in rows]
    if column in _TEXT_COLUMNS:
      table[column] = np.array([str(value) for value in values], dtype=object)
      continue
    parsed = np.empty(len(values))
    for index, value in enumerate(values):
      try:
        parsed[index] = float(value)
      except (TypeError, ValueError):
        raise ValueError(
          f"the {name} table's {column!r} in row {index + 1} is {value!r}, which is not a number"
        ) from None
    table[column] = parsed
  return table


def runs_from_table(table: dict[str, np.ndarray]) -> dict[str, list[Run]]:
  """Group curve rows into runs per architecture, refusing input no envelope can be built from."""
  for column in ("non_embedding_params", "tokens", "compute_pflops_days", "loss"):
    bad = np.flatnonzero(~np.isfinite(table[column]))
    if bad.size:
      raise ValueError(
        f"{column} is NaN or infinite in {bad.size} row(s), first row {bad[0] + 1}; drop or fix those rows"
      )
  for column in ("non_embedding_params", "tokens", "compute_pflops_days", "loss"):
    bad = np.flatnonzero(table[column] <= 0)
    if bad.size:
      raise ValueError(
        f"{column} must be > 0 for a log-log fit but is {table[column][bad[0]]} in row {bad[0] + 1}; drop step-0 rows"
      )
  runs: dict[str, list[Run]] = {}
  for arch in dict.fromkeys(table["arch"]):
    for size in dict.fromkeys(table["size"][table["arch"] == arch]):
      rows = np.flatnonzero((table["arch"] == arch) & (table["size"] == size))
      params = np.unique(table["non_embedding_params"][rows])
      if params.size != 1:
        raise ValueError(
          f"run {arch} {size} has {params.size} different non_embedding_params values; one run must have one model size"
        )
      compute = table["compute_pflops_days"][rows]
      tokens = table["tokens"][rows]
      for column, values in (("compute_pflops_days", compute), ("tokens", tokens)):
        steps_back = np.flatnonzero(np.diff(values) <= 0)
        if steps_back.size:
          row = rows[steps_back[0] + 1] + 1
          raise ValueError(
            f"{column} is not increasing within run {arch} {size} (row {row}: "
            f"{values[steps_back[0] + 1]} after {values[steps_back[0]]}); rows of a run "
            "must be in training order without repeats"
          )
      if rows.size < 2:
        raise ValueError(f"run {arch} {size} has a single point; a run needs at least two logged points")
      runs.setdefault(arch, []).append(
        Run(
          arch=str(arch),
          size=str(size),
          non_embedding_params=float(params[0]),
          tokens=tokens,
          compute_pflops_days=compute,
          loss=table["loss"][rows],
        )
      )
  for arch, arch_runs in runs.items():
    sizes = {run.non_embedding_params for run in arch_runs}
    if len(sizes) < 2:
      raise ValueError(
        f"arch {arch} has only one model size ({arch_runs[0].size}); the compute-optimal "
        "envelope needs runs of at least two sizes"
      )
  return runs


def load_curves(curves) -> dict[str, list[Run]]:
  """Runs per architecture from a curves file path, a list of row dicts, or an already-built mapping."""
  if isinstance(curves, dict):  # already grouped, e.g. by an earlier load_curves
    return curves
  rows = curves if isinstance(curves, list) else read_rows(curves)
  return runs_from_table(parse_table(rows, CURVE_COLUMNS, "curves"))


def load_eval_table(table) -> dict[str, np.ndarray]:
  """The evaluation tidy table (path or list of row dicts) as column arrays; NaN values are refused."""
  rows = table if isinstance(table, list) else read_rows(table)
  columns = parse_table(rows, EVAL_COLUMNS, "evaluation")
  bad = np.flatnonzero(~np.isfinite(columns["value"]) | ~np.isfinite(columns["compute_pflops_days"]))
  if bad.size:
    raise ValueError(f"the evaluation table has a NaN or infinite value/compute_pflops_days in row {bad[0] + 1}")
  return columns


def curves_from_run_dirs(run_dirs) -> list[dict]:
  """Curve rows from training run directories (``run_metadata.json`` + ``metrics.jsonl``).

  N is the Table 1 non-embedding count and C = step × Table 1 FLOPs/step (``lsm_jax.flops``), recomputed
  here so every run is measured by the same rule the paper fits with. A step logged twice (a resumed run
  re-logs the steps after its last checkpoint) keeps its last record; step 0 (C = 0) and records without
  a loss are skipped.
  """
  rows = []
  for run_dir in run_dirs:
    run_dir = os.fspath(run_dir)
    metadata_path = os.path.join(run_dir, "run_metadata.json")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    for path in (metadata_path, metrics_path):
      if not os.path.exists(path):
        raise ValueError(f"run directory {run_dir!r} has no {os.path.basename(path)}")
    with open(metadata_path, encoding="utf-8") as file:
      metadata = json.load(file)
    try:
      arch, size, model = metadata["arch"], metadata["size"], metadata["model_config"]
      shape = (model["num_layers"], model["d_model"], model["num_heads"])
      batch_size, seq_len = metadata["global_batch_size"], metadata["seq_len"]
    except KeyError as error:
      raise ValueError(
        f"{metadata_path} lacks {error.args[0]!r}; it needs arch, size, seq_len, "
        "global_batch_size and model_config with num_layers, d_model, num_heads"
      ) from None
    layer_pattern = model.get("layer_pattern")  # hybrids' mixer per layer; runs of the pure models lack it
    params = flops.non_embedding_params(arch, *shape, layer_pattern=layer_pattern)
    step_flops = flops.flops_per_step(arch, *shape, batch_size, seq_len, layer_pattern=layer_pattern)
    by_step = {}
    for record in read_rows(metrics_path):
      if record.get("loss") is not None and int(record["step"]) > 0:
        by_step[int(record["step"])] = record
    for step in sorted(by_step):
      record = by_step[step]
      rows.append(
        {
          "arch": arch,
          "size": size,
          "non_embedding_params": params,
          "tokens": float(record.get("tokens_seen", step * batch_size * seq_len)),
          "compute_pflops_days": flops.to_pflops_days(step * step_flops),
          "loss": float(record["loss"]),
        }
      )
  return rows


def write_curves(rows: list[dict], path: str | os.PathLike) -> None:
  """Curve rows as CSV with the columns ``fit --curves`` reads."""
  with open(path, "w", newline="", encoding="utf-8") as file:
    writer = csv.DictWriter(file, fieldnames=CURVE_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
