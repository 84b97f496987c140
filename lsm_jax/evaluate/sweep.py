"""Evaluate every milestone checkpoint of a run into one tidy table (the input of lsm_jax.scaling).

Rows: run, arch, size, d_model, num_layers, seq_len, ablation (the run's coordinates, from its run_metadata.json),
step, tokens, compute_pflops_days, task, metric, value. The table is written as JSON lines
(the source of truth, appended after each finished (step, task) so an interrupted sweep resumes where it
stopped) and mirrored to CSV. A (step, task) pair already in the table is skipped.

Tasks: the built-in TASKS below, or the name of any lm-eval task, group or tag (lm-eval's bundled tasks,
lsm_jax's local tasks in tasks/, and task YAML under `include_path`), whose rows hold every numeric metric
lm-eval reports for it and its subtasks. Rows also go to TensorBoard (see `evaluate_run`).
Built-in tasks (TASKS) and the rows they write:
  val_loss       val_loss/loss, val_loss/perplexity: mean next-token loss on the run's validation split
  wikitext       wikitext/word_perplexity                    (lm-eval task lsm_wikitext)
  lambada        lambada/perplexity, lambada/acc             (lsm_lambada)
  csr            <task>/<paper metric> for the 7 CSR tasks, csr/average (the paper's CSR avg)
  scrolls        <task>/rouge1|rouge2|rougeL|f1|em, scrolls/average (mean of the available numbers)
  niah, niah_standard   niah_easy|niah_standard/acc@2k ... weighted_avg, niah_score (+ heatmap PNG)
Accuracies are percentages, as in the paper's tables; perplexities are plain.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
from collections.abc import Sequence

from lsm_jax.evaluate import scorers

COLUMNS = (
  "run",
  "arch",
  "size",
  "d_model",
  "num_layers",
  "seq_len",
  "ablation",
  "step",
  "tokens",
  "compute_pflops_days",
  "task",
  "metric",
  "value",
)
LM_EVAL_TASKS = ("wikitext", "lambada", "csr", "scrolls")
TASKS = ("val_loss",) + LM_EVAL_TASKS + ("niah", "niah_standard")
# The table task whose row marks a sweep task as done at a step (a task's rows are appended in one write).
_COMPLETION_TASK = {
  "val_loss": "val_loss",
  "wikitext": "wikitext",
  "lambada": "lambada",
  "csr": "csr",
  "scrolls": "scrolls",
  "niah": "niah_easy",
  "niah_standard": "niah_standard",
}
_CSR_LM_EVAL_NAMES = {task: f"lsm_{task}" for task in scorers.CSR_METRICS}
_SCROLLS_LM_EVAL_NAMES = {task: f"lsm_scrolls_{task}" for task in scorers.SCROLLS_METRICS}


def parse_tasks(
  tasks: str | Sequence[str], include_path: str | Sequence[str] = (), eval_data_dir: str | None = None
) -> list[str]:
  """Task names, each a built-in sweep task (TASKS) or a task, group or tag lm-eval knows: its bundled tasks,
  lsm_jax's local tasks and the YAML under `include_path`. Unknown names are refused, saying where they were
  looked for."""
  include_path = [include_path] if isinstance(include_path, str) else list(include_path)
  names = [name.strip() for name in (tasks.split(",") if isinstance(tasks, str) else tasks) if name.strip()]
  if not names:
    raise ValueError(f"no evaluation task given; built-in: {', '.join(TASKS)}, or any lm-eval task name")
  others = [name for name in names if name not in TASKS]
  if others:
    known = set(lm_eval_task_manager(include_path, eval_data_dir).all_tasks)
    unknown = [name for name in others if name not in known]
    if unknown:
      where = ["lm-eval's bundled tasks", f"lsm_jax's local tasks ({_lsm_tasks_dir()})"]
      where += [f"--include_path {path}" for path in include_path]
      hint = "" if include_path else "; for a task defined in YAML elsewhere, pass --include_path=DIR"
      raise ValueError(
        f"unknown evaluation task(s) {unknown}: not a built-in sweep task ({', '.join(TASKS)}) nor "
        f"an lm-eval task, group or tag in {', '.join(where)}{hint}"
      )
  return list(dict.fromkeys(names))


def _lsm_tasks_dir() -> str:
  from lsm_jax.evaluate import lm_eval_cli

  return lm_eval_cli.TASKS_DIR


@functools.lru_cache(maxsize=4)
def _cached_task_manager(include_path: tuple[str, ...], eval_data_dir: str | None):
  from lm_eval.tasks import TaskManager

  metadata = {"data_dir": eval_data_dir} if eval_data_dir else None
  return TaskManager(include_path=[_lsm_tasks_dir(), *include_path], metadata=metadata)


def lm_eval_task_manager(include_path: str | Sequence[str] = (), eval_data_dir: str | None = None):
  """lm-eval's TaskManager over its bundled tasks, lsm_jax's local tasks and `include_path` (indexing every
  bundled YAML takes seconds, so one is kept per argument set)."""
  include_path = [include_path] if isinstance(include_path, str) else include_path
  include_path = tuple(os.path.abspath(path) for path in include_path)
  missing = [path for path in include_path if not os.path.exists(path)]
  if missing:
    raise ValueError(
      f"--include_path {', '.join(missing)} does not exist; give directories (or YAML files) "
      "holding lm-eval task configs"
    )
  return _cached_task_manager(include_path, eval_data_dir)


def table_paths(output: str) -> tuple[str, str]:
  """(jsonl, csv) paths of the tidy table named by `output` (either extension, or none)."""
  stem, extension = os.path.splitext(output)
  if extension not in (".jsonl", ".csv"):
    stem = output
  return stem + ".jsonl", stem + ".csv"


def read_table(output: str) -> list[dict]:
  jsonl_path, _ = table_paths(output)
  if not os.path.exists(jsonl_path):
    return []
  with open(jsonl_path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def append_rows(output: str, rows: list[dict]) -> None:
  """Appends rows to OUTPUT's JSON lines (fsynced) and rebuilds its CSV from them, atomically."""
  jsonl_path, csv_path = table_paths(output)
  os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
  with open(jsonl_path, "a", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())
  # The CSV is rewritten from the JSON lines, so it can never disagree with them.
  temporary = csv_path + ".tmp"
  with open(temporary, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(read_table(output))
  os.replace(temporary, csv_path)


# ------------------------------------------------------------------------------------------ task runners


def validation_loss(engine, run_metadata: dict, *, max_batches: int | None = None) -> dict[str, float]:
  """Mean next-token loss over the run's validation split (each record once, `engine.batch_size` rows a batch)."""
  from lsm_jax.data import loader as loader_lib

  loader = loader_lib.make_loader(
    run_metadata["data_dir"],
    split="validation",
    seq_len=run_metadata["seq_len"],
    global_batch_size=engine.batch_size,
    seed=run_metadata.get("seed", 0),
  )
  num_batches = max(1, loader.num_records // engine.batch_size)
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  loss_sum = token_count = 0.0
  for step in range(num_batches):
    batch = loader.global_batch(step)
    log_probs = engine.batch_log_probs(batch)
    loss_sum -= float((log_probs * batch["loss_mask"]).sum())
    token_count += float(batch["loss_mask"].sum())
  loss = loss_sum / token_count
  return {"loss": loss, "perplexity": math.exp(loss)}


def _lm_eval_results(
  engine, task_names: list[str], *, limit: int | None, eval_data_dir: str | None, progress: bool = True
) -> dict:
  import lm_eval
  from lm_eval.tasks import TaskManager

  from lsm_jax.evaluate import harness, lm_eval_cli

  metadata = {"data_dir": eval_data_dir} if eval_data_dir else None
  task_manager = TaskManager(include_path=lm_eval_cli.TASKS_DIR, include_defaults=False, metadata=metadata)
  output = lm_eval.simple_evaluate(
    model=harness.LsmJaxLM.from_engine(engine, progress=progress),
    tasks=task_names,
    task_manager=task_manager,
    limit=limit,
    log_samples=False,
    bootstrap_iters=0,
  )
  return output["results"]


def lm_eval_any_task_scores(
  engine, task: str, *, task_manager, limit: int | None = None, progress: bool = True
) -> list[tuple[str, str, float]]:
  """(task, metric, value) rows of any lm-eval task, group or tag: every numeric metric lm-eval reports for it
  and its subtasks, as lm-eval reports it (fractions, not percentages). A metric under a filter other than
  "none" is named metric:filter; standard errors are left out."""
  import lm_eval

  from lsm_jax.evaluate import harness

  output = lm_eval.simple_evaluate(
    model=harness.LsmJaxLM.from_engine(engine, progress=progress),
    tasks=[task],
    task_manager=task_manager,
    limit=limit,
    log_samples=False,
    bootstrap_iters=0,
  )
  rows = []
  for name, results in output["results"].items():
    for key, value in results.items():
      metric, _, filter_name = key.partition(",")
      if (
        not filter_name or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float))
      ):
        continue
      rows.append((name, metric if filter_name == "none" else f"{metric}:{filter_name}", float(value)))
  if not rows:
    raise ValueError(f"lm-eval task {task!r} reported no numeric metric")
  return rows


def _metric(results: dict, task_name: str, metric: str) -> float:
  return float(results[task_name][f"{metric},none"])


def lm_eval_task_scores(
  engine, task: str, *, limit: int | None = None, eval_data_dir: str | None = None, progress: bool = True
) -> list[tuple[str, str, float]]:
  """(task, metric, value) rows of one LM_EVAL_TASKS entry."""

  def lm_eval_results(task_names):
    return _lm_eval_results(engine, task_names, limit=limit, eval_data_dir=eval_data_dir, progress=progress)

  if task == "wikitext":
    results = lm_eval_results(["lsm_wikitext"])
    return [("wikitext", "word_perplexity", _metric(results, "lsm_wikitext", "word_perplexity"))]
  if task == "lambada":
    results = lm_eval_results(["lsm_lambada"])
    return [
      ("lambada", "perplexity", _metric(results, "lsm_lambada", "perplexity")),
      ("lambada", "acc", 100.0 * _metric(results, "lsm_lambada", "acc")),
    ]
  if task == "csr":
    results = lm_eval_results(list(_CSR_LM_EVAL_NAMES.values()))
    scores = {
      name: 100.0 * _metric(results, _CSR_LM_EVAL_NAMES[name], metric) for name, metric in scorers.CSR_METRICS.items()
    }
    return [(name, scorers.CSR_METRICS[name], value) for name, value in scores.items()] + [
      ("csr", "average", scorers.csr_average(scores))
    ]
  if task == "scrolls":
    rows, scores = [], {}
    for name, metrics in scorers.SCROLLS_METRICS.items():
      # One lm-eval call per task: a failing task (e.g. missing data) is left out, as the paper does.
      try:
        results = lm_eval_results([_SCROLLS_LM_EVAL_NAMES[name]])
      except (FileNotFoundError, ValueError) as error:
        print(f"SCROLLS task {name} failed and is left out of the average: {error}")
        continue
      scores[name] = {metric: _metric(results, _SCROLLS_LM_EVAL_NAMES[name], metric) for metric in metrics}
      rows.extend((name, metric, value) for metric, value in scores[name].items())
    if scores:
      rows.append(("scrolls", "average", scorers.scrolls_average(scores)))
    return rows
  raise ValueError(f"{task!r} is not an lm-eval task; valid: {', '.join(LM_EVAL_TASKS)}")


def niah_scores(engine, mode: str, *, haystack_text: str, output_dir: str, config_overrides: dict | None = None):
  from lsm_jax.evaluate import niah

  config = niah.NIAHConfig(mode=mode, **(config_overrides or {}))
  # NIAH deliberately runs past the training context (the paper goes to 16K after 8K training).
  max_context = max(config.context_lengths) + config.max_new_tokens

  def generate(prompts, max_new_tokens):
    return engine.generate(prompts, max_new_tokens, max_context=max_context)

  result = niah.run_niah(generate, engine.tokenizer, haystack_text, config, batch_size=engine.batch_size)
  result.save(output_dir)
  return [(f"niah_{mode}", metric, value) for metric, value in result.summary().items()]


def default_haystack_text() -> str:
  """The data package's embedded corpus (Python's own documentation text), joined into one haystack."""
  from lsm_jax.data import corpora

  return "\n\n".join(corpora.embedded_documents())


# ----------------------------------------------------------------------------------------------- sweep


def evaluate_run(
  run_dir: str,
  tasks: str | Sequence[str],
  output: str | None = None,
  *,
  steps: Sequence[int] | None = None,
  batch_size: int = 8,
  compute_dtype: str | None = None,
  val_max_batches: int | None = None,
  lm_eval_limit: int | None = None,
  eval_data_dir: str | None = None,
  haystack_file: str | None = None,
  niah_overrides: dict | None = None,
  progress: bool = True,
  include_path: str | Sequence[str] = (),
  tensorboard_dir: str | None = None,
) -> list[dict]:
  """Evaluates `tasks` on every milestone of `run_dir` (or `steps`) not yet in `output`; returns the new rows.

  tasks: built-in TASKS, or any lm-eval task, group or tag (its bundled tasks, lsm_jax's local tasks and the task
  YAML under `include_path`); see `parse_tasks` and `lm_eval_any_task_scores`.
  output defaults to RUN_DIR/eval/results.jsonl (+ .csv). NIAH heatmaps go to <output dir>/niah/step_<N>/.
  Each new row is also a TensorBoard scalar in `tensorboard_dir` (default RUN_DIR/tensorboard/eval; "" for
  none): eval/<task>/<metric> at the milestone's step, and eval_by_tokens/<task>/<metric> at its tokens seen.
  Runs sharing an output must differ in their run name (`trainer.train.run_name`, default `<arch>_<size>`).
  """
  from lsm_jax import checkpoint
  from lsm_jax.evaluate import engine as engine_lib

  tasks = parse_tasks(tasks, include_path, eval_data_dir)
  output = output or os.path.join(run_dir, "eval", "results.jsonl")
  available = checkpoint.list_milestones(run_dir)
  if steps is not None:
    missing = sorted(set(steps) - set(available))
    if missing:
      raise ValueError(f"steps {missing} are not milestones of {run_dir}; available: {available}")
    available = sorted(set(steps))
  # One table may hold several runs, told apart by their run name (a row without one: <arch>_<size>).
  coordinates = run_coordinates(checkpoint.read_run_metadata(run_dir))
  done = {
    (row["step"], row["task"])
    for row in read_table(output)
    if (row.get("run") or f"{row['arch']}_{row['size']}") == coordinates["run"]
  }
  # An lm-eval task is done when it has rows under its own name (a group reporting no aggregate has none, and
  # is evaluated again).
  pending = [
    (step, task) for step in available for task in tasks if (step, _COMPLETION_TASK.get(task, task)) not in done
  ]
  haystack_text = None
  new_rows: list[dict] = []
  tensorboard = _TensorBoardScalars(
    os.path.join(run_dir, "tensorboard", "eval") if tensorboard_dir is None else tensorboard_dir
  )
  bar = _progress_bar(len(pending), progress)
  for step in sorted({step for step, _ in pending}):
    overrides = {"dtype": compute_dtype} if compute_dtype else {}
    model, tokenizer, run_metadata, checkpoint_metadata = engine_lib.load_model(run_dir, step, **overrides)
    engine = engine_lib.InferenceEngine(model, tokenizer, max_length=run_metadata["seq_len"], batch_size=batch_size)
    identity = {
      **coordinates,
      "step": step,
      "tokens": checkpoint_metadata.get("tokens_seen"),
      "compute_pflops_days": checkpoint_metadata.get("compute_pflops_days"),
    }
    for task in [task for pending_step, task in pending if pending_step == step]:
      bar.set_description(f"step {step} {task}")
      if task == "val_loss":
        scores = [
          ("val_loss", metric, value)
          for metric, value in validation_loss(engine, run_metadata, max_batches=val_max_batches).items()
        ]
      elif task in LM_EVAL_TASKS:
        scores = lm_eval_task_scores(engine, task, limit=lm_eval_limit, eval_data_dir=eval_data_dir, progress=progress)
      elif task not in TASKS:
        scores = lm_eval_any_task_scores(
          engine,
          task,
          limit=lm_eval_limit,
          progress=progress,
          task_manager=lm_eval_task_manager(include_path, eval_data_dir),
        )
      else:
        if haystack_text is None:
          haystack_text = _read_text(haystack_file) if haystack_file else default_haystack_text()
        niah_dir = os.path.join(os.path.dirname(os.path.abspath(output)), "niah", f"step_{step}")
        scores = niah_scores(
          engine,
          "easy" if task == "niah" else "standard",
          haystack_text=haystack_text,
          output_dir=niah_dir,
          config_overrides=niah_overrides,
        )
      rows = [{**identity, "task": name, "metric": metric, "value": float(value)} for name, metric, value in scores]
      append_rows(output, rows)
      tensorboard.add(rows)
      new_rows.extend(rows)
      bar.update(1)
  bar.close()
  tensorboard.close()
  return new_rows


class _TensorBoardScalars:
  """Table rows as TensorBoard scalars; the writer (and its directory) is created with the first row."""

  def __init__(self, log_dir: str):
    self._log_dir = log_dir
    self._writer = None

  def add(self, rows: list[dict]) -> None:
    if not self._log_dir or not rows:
      return
    if self._writer is None:
      from tensorboardX import SummaryWriter  # heavy import; only when there is something to write

      self._writer = SummaryWriter(self._log_dir)
    for row in rows:
      tag = f"{row['task']}/{row['metric']}"
      self._writer.add_scalar(f"eval/{tag}", row["value"], int(row["step"]))
      if row["tokens"] is not None:
        self._writer.add_scalar(f"eval_by_tokens/{tag}", row["value"], int(row["tokens"]))
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def run_coordinates(run_metadata: dict) -> dict:
  """A run's name and ablation coordinates from its run_metadata.json (one without a run name: <arch>_<size>)."""
  model = run_metadata["model_config"]
  return {
    "run": run_metadata.get("run_name") or f"{run_metadata['arch']}_{run_metadata['size']}",
    "arch": run_metadata["arch"],
    "size": run_metadata["size"],
    "d_model": model["d_model"],
    "num_layers": model["num_layers"],
    "seq_len": run_metadata["seq_len"],
    "ablation": run_metadata.get("ablation"),
  }


def _read_text(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _progress_bar(total: int, enabled: bool):
  from tqdm import tqdm

  return tqdm(total=total, disable=not enabled, unit="eval")
