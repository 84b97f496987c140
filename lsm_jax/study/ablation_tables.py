r"""Ablation tables in the layout of the paper's Tables 5 and 6 (arXiv 2406.16690 §3.6), from an evaluation sweep.

  python -m lsm_jax.study.ablation_tables EVAL_TABLE [--out=STEM]

EVAL_TABLE is a tidy table of `lsm_jax.evaluate.sweep` (eval.csv / eval.jsonl of a study, or a run's
eval/results.jsonl), whose rows carry each run's coordinates (run, arch, d_model, num_layers, seq_len). Each run
contributes one row: every (task, metric) at the last milestone it was evaluated at. Runs are grouped by their
coordinates, not their names:

* aspect ratio (Table 5): the runs of one context length; an architecture is listed when it has at least two
  shapes (d_model, layers) there. Rows by architecture, then hidden size.
* pre-training context (Table 6): the runs of one shape; an architecture is listed when it has at least two
  context lengths there. Rows by architecture, then context.

A run may sit in both (the paper's 1536 × 32 run at 8K is the reference row of both tables). Columns: the seven
CSR tasks and their average, WikiText-2 word perplexity, LAMBADA perplexity, NIAH (easy mode, weighted average),
SCROLLS average and, beyond the paper's columns, the validation loss; a task that was not evaluated shows '—'.
Prints the markdown and, with --out, writes STEM.json and STEM.csv.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os

from lsm_jax.evaluate import scorers

PAPER_MILESTONES = 1376  # intermediate checkpoints of the whole study, main grid and ablations (arXiv 2406.16690)
ARCH_ORDER = ("llama", "tnl", "hgrn2", "cosformer2")
DISPLAY_NAMES = {"llama": "LLaMA", "tnl": "TNL", "hgrn2": "HGRN2", "cosformer2": "cos2"}
_CSR_LABELS = {
  "boolq": "BoolQ",
  "piqa": "PIQA",
  "hellaswag": "HS",
  "winogrande": "WG",
  "arc_easy": "ARC-E",
  "arc_challenge": "ARC-C",
  "openbookqa": "OBQA",
}
# (label, task, metric, decimals): the paper's columns in its order, then the validation loss.
COLUMNS = (
  *((_CSR_LABELS[task], task, metric, 2) for task, metric in scorers.CSR_METRICS.items()),
  ("CSR", "csr", "average", 2),
  ("WIKI", "wikitext", "word_perplexity", 1),
  ("λ", "lambada", "perplexity", 1),
  ("NIAH", "niah_easy", "weighted_avg", 1),
  ("SCROLLS", "scrolls", "average", 2),
  ("val loss", "val_loss", "loss", 4),
)
PAPER_COLUMNS = tuple(label for label, *_ in COLUMNS[:-1])
_COORDINATES = ("run", "arch", "d_model", "num_layers", "seq_len")

# The paper's Table 5 (1B, 8K context): (arch, d_model, layers) → PAPER_COLUMNS.
PAPER_TABLE_5 = {
  ("llama", 1536, 32): (60.98, 69.91, 46.74, 54.85, 56.94, 28.50, 30.00, 49.70, 26.2, 13.4, 44.1, 11.01),
  ("llama", 1792, 24): (49.85, 70.51, 47.29, 53.20, 57.37, 28.16, 32.00, 48.34, 19.8, 13.4, 54.2, 12.45),
  ("llama", 2048, 18): (56.42, 69.97, 47.04, 52.72, 57.07, 28.16, 32.60, 49.14, 26.5, 12.8, 45.0, 12.20),
  ("llama", 3072, 8): (55.44, 69.53, 44.25, 51.62, 52.78, 26.54, 30.20, 47.19, 24.8, 16.7, 46.0, 10.88),
  ("cosformer2", 1536, 32): (56.42, 70.57, 45.99, 52.01, 57.49, 26.11, 32.00, 48.66, 21.3, 15.3, 10.9, 10.88),
  ("cosformer2", 1792, 24): (61.83, 70.67, 46.04, 51.70, 56.69, 27.39, 32.40, 49.53, 21.0, 14.0, 8.8, 10.31),
  ("cosformer2", 2048, 18): (44.28, 70.73, 45.55, 50.51, 55.22, 27.30, 31.00, 46.37, 21.2, 15.5, 12.3, 10.75),
  ("cosformer2", 3072, 8): (43.52, 69.86, 43.38, 50.83, 53.79, 26.62, 32.60, 45.80, 23.4, 18.3, 6.5, 9.85),
}
# The paper's Table 6 (1B, d 1536 × 32 layers): (arch, context) → PAPER_COLUMNS.
PAPER_TABLE_6 = {
  ("tnl", 2048): (61.96, 72.03, 49.94, 54.38, 57.58, 28.33, 31.20, 50.77, 26.4, 10.5, 8.0, 9.02),
  ("tnl", 4096): (61.80, 72.31, 49.88, 55.33, 57.91, 29.10, 32.20, 51.22, 23.9, 10.7, 12.1, 11.79),
  ("tnl", 8192): (54.53, 71.60, 49.94, 55.41, 58.50, 29.01, 34.20, 50.45, 20.6, 11.7, 28.0, 9.65),
  ("tnl", 16384): (49.05, 71.06, 49.51, 51.46, 57.53, 28.16, 31.60, 48.34, 20.6, 11.3, 14.2, 8.74),
  ("hgrn2", 2048): (62.23, 72.25, 50.68, 54.70, 60.02, 30.03, 33.40, 51.90, 22.2, 10.0, 2.3, 11.60),
  ("hgrn2", 4096): (61.77, 70.95, 51.21, 53.59, 60.19, 30.89, 31.20, 51.40, 20.9, 10.6, 2.1, 11.46),
  ("hgrn2", 8192): (59.54, 71.82, 50.65, 54.85, 60.40, 29.61, 34.20, 51.58, 20.3, 10.7, 10.0, 11.08),
  ("hgrn2", 16384): (54.92, 72.03, 50.37, 55.25, 59.01, 28.92, 32.00, 50.36, 20.1, 11.2, 8.8, 12.23),
  ("cosformer2", 2048): (60.95, 70.35, 47.37, 53.43, 56.44, 27.30, 31.00, 49.55, 22.7, 12.0, 6.8, 10.93),
  ("cosformer2", 4096): (55.66, 70.08, 47.05, 50.99, 55.35, 27.13, 33.00, 48.46, 21.3, 12.5, 6.5, 11.79),
  ("cosformer2", 8192): (56.42, 70.57, 45.99, 52.01, 57.49, 26.11, 32.00, 48.66, 21.3, 15.3, 10.9, 10.88),
  ("cosformer2", 16384): (62.51, 69.86, 44.61, 52.72, 54.25, 26.02, 32.20, 48.88, 22.1, 16.9, 9.6, 13.04),
}


def run_scores(eval_rows: list[dict]) -> list[dict]:
  """One entry per run: its coordinates, `step` (its last evaluated milestone) and `scores` {label: value}, each
  (task, metric) at the last step it was evaluated at."""
  if not eval_rows:
    raise ValueError("the evaluation table has no rows")
  missing = [column for column in _COORDINATES if column not in eval_rows[0] or eval_rows[0][column] in (None, "")]
  if missing:
    raise ValueError(
      f"the evaluation table lacks the run coordinate column(s) {', '.join(missing)}; evaluate the "
      "runs with lsm_jax.evaluate (its rows carry run, arch, d_model, num_layers, seq_len)"
    )
  labels = {(task, metric): label for label, task, metric, _ in COLUMNS}
  runs = {}
  latest = {}  # (run, label) → step of the value kept
  for row in eval_rows:
    name, step = row["run"], int(row["step"])
    run = runs.setdefault(
      name,
      {
        "run": name,
        "arch": row["arch"],
        "d_model": int(row["d_model"]),
        "num_layers": int(row["num_layers"]),
        "seq_len": int(row["seq_len"]),
        "ablation": row.get("ablation") or None,
        "step": step,
        "scores": {},
      },
    )
    run["step"] = max(run["step"], step)
    label = labels.get((row["task"], row["metric"]))
    if label is not None and step >= latest.get((name, label), -1):
      latest[(name, label)] = step
      run["scores"][label] = float(row["value"])
  return list(runs.values())


def _sorted_rows(runs: list[dict], key: str) -> list[dict]:
  return sorted(runs, key=lambda run: (ARCH_ORDER.index(run["arch"]), run[key], run["num_layers"]))


def build_tables(eval_rows: list[dict]) -> dict:
  """{"aspect": [{"seq_len", "rows"}], "context": [{"d_model", "num_layers", "rows"}]} from sweep rows."""
  runs = run_scores(eval_rows)
  unknown = sorted({run["arch"] for run in runs} - set(ARCH_ORDER))
  if unknown:
    raise ValueError(f"the evaluation table has unknown architecture(s) {unknown}; valid: {ARCH_ORDER}")
  aspect, context = [], []
  for seq_len in sorted({run["seq_len"] for run in runs}):
    group = [run for run in runs if run["seq_len"] == seq_len]
    shapes = collections.defaultdict(set)
    for run in group:
      shapes[run["arch"]].add((run["d_model"], run["num_layers"]))
    rows = [run for run in group if len(shapes[run["arch"]]) >= 2]
    if rows:
      aspect.append({"seq_len": seq_len, "rows": _sorted_rows(rows, "d_model")})
  for d_model, num_layers in sorted({(run["d_model"], run["num_layers"]) for run in runs}):
    group = [run for run in runs if (run["d_model"], run["num_layers"]) == (d_model, num_layers)]
    lengths = collections.defaultdict(set)
    for run in group:
      lengths[run["arch"]].add(run["seq_len"])
    rows = [run for run in group if len(lengths[run["arch"]]) >= 2]
    if rows:
      context.append({"d_model": d_model, "num_layers": num_layers, "rows": _sorted_rows(rows, "seq_len")})
  return {"aspect": aspect, "context": context}


def _context_label(seq_len: int) -> str:
  return f"{seq_len // 1024}K" if seq_len % 1024 == 0 else str(seq_len)


def _cell(value, decimals: int) -> str:
  return "—" if value is None else f"{value:.{decimals}f}"


def format_table(rows: list[dict], kind: str) -> str:
  """Markdown in Table 5 (kind 'aspect': Arch | Dim | L | …) or Table 6 (kind 'context': Arch | Len | …) layout."""
  keys = ("Dim", "L") if kind == "aspect" else ("Len",)
  labels = [label for label, *_ in COLUMNS]
  lines = [
    "| " + " | ".join(("Arch", *keys, *labels, "run", "step")) + " |",
    "|---" * (len(keys) + len(labels) + 3) + "|",
  ]
  for run in rows:
    key_cells = (str(run["d_model"]), str(run["num_layers"])) if kind == "aspect" else (_context_label(run["seq_len"]),)
    cells = [_cell(run["scores"].get(label), decimals) for label, _, _, decimals in COLUMNS]
    lines.append(
      "| " + " | ".join((DISPLAY_NAMES[run["arch"]], *key_cells, *cells, run["run"], str(run["step"]))) + " |"
    )
  return "\n".join(lines)


def format_paper_table(kind: str) -> str:
  """The paper's Table 5 or Table 6 in the same columns (no validation loss: the paper reports none)."""
  keys = ("Dim", "L") if kind == "aspect" else ("Len",)
  lines = [
    "| " + " | ".join(("Arch", *keys, *PAPER_COLUMNS)) + " |",
    "|---" * (len(keys) + len(PAPER_COLUMNS) + 1) + "|",
  ]
  table = PAPER_TABLE_5 if kind == "aspect" else PAPER_TABLE_6
  for (arch, *coordinates), values in table.items():
    key_cells = [str(value) for value in coordinates] if kind == "aspect" else [_context_label(coordinates[0])]
    value_cells = [_cell(value, decimals) for value, (_, _, _, decimals) in zip(values, COLUMNS)]
    lines.append("| " + " | ".join((DISPLAY_NAMES[arch], *key_cells, *value_cells)) + " |")
  return "\n".join(lines)


def format_report(tables: dict) -> str:
  """Markdown sections: each aspect-ratio and context group beside the paper's Table 5 / Table 6."""
  sections = []
  for group in tables["aspect"]:
    sections += [
      f"## Aspect ratio, {_context_label(group['seq_len'])}-token context (Table 5 layout)",
      "",
      format_table(group["rows"], "aspect"),
      "",
    ]
  if not tables["aspect"]:
    sections += ["## Aspect ratio (Table 5 layout)", "", "No architecture has two shapes at one context.", ""]
  sections += ["### The paper's Table 5 (1B, 8K context)", "", format_paper_table("aspect"), ""]
  for group in tables["context"]:
    sections += [
      f"## Pre-training context at d {group['d_model']} × {group['num_layers']} layers (Table 6 layout)",
      "",
      format_table(group["rows"], "context"),
      "",
    ]
  if not tables["context"]:
    sections += ["## Pre-training context (Table 6 layout)", "", "No architecture has two contexts at one shape.", ""]
  sections += ["### The paper's Table 6 (1B, d 1536 × 32 layers)", "", format_paper_table("context")]
  return "\n".join(sections)


def write_tables(tables: dict, stem: str) -> tuple[str, str]:
  """STEM.json (the tables as built) and STEM.csv (one line per table row: table, coordinates, columns)."""
  json_path, csv_path = stem + ".json", stem + ".csv"
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(tables, f, indent=1)
  labels = [label for label, *_ in COLUMNS]
  with open(csv_path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["table", *_COORDINATES, "ablation", "step", *labels])
    for kind, groups in tables.items():
      for group in groups:
        for run in group["rows"]:
          writer.writerow(
            [
              kind,
              *(run[column] for column in _COORDINATES),
              run["ablation"] or "",
              run["step"],
              *(run["scores"].get(label, "") for label in labels),
            ]
          )
  return json_path, csv_path


def main(argv=None) -> None:
  from lsm_jax.evaluate import sweep

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("eval_table", help="an lsm_jax.evaluate tidy table (.csv or .jsonl; the .jsonl is read)")
  parser.add_argument("--out", help="write the tables to OUT.json and OUT.csv")
  args = parser.parse_args(argv)
  rows = sweep.read_table(args.eval_table)
  if not rows:
    parser.error(f"{args.eval_table}: no evaluation rows (its .jsonl is missing or empty)")
  tables = build_tables(rows)
  if args.out:
    write_tables(tables, args.out)
  print(format_report(tables))


if __name__ == "__main__":
  main()
