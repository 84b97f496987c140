r"""A scaling study end to end: train a grid, evaluate every milestone, fit the laws, write the report.

  python -m lsm_jax.study --gin_file=gin/study/mini/grid.gin --out=DIR [--parallel=N [--gpus=0,1]]
      [--time_limit_s=SECONDS] [--gin.NAME=VALUE ...]

The grid file binds `study.StudyGrid` (architectures, size files, the run file, evaluation settings). Each run
`<arch>_<size>` is trained by `trainer.train` from three gin files — `gin/models/<arch>/base.gin`, the size
file and the run file — in `DIR/runs/<arch>_<size>`, and right after training every one of its milestones is
evaluated (`lsm_jax.evaluate`) into `DIR/runs/<arch>_<size>/eval/`. A run that finished both writes
`study_run.json`; rerunning the command skips those runs and resumes the others from their checkpoints, so a
grid can be trained across several invocations. Overrides: a `--gin.study.…` binding configures the grid; any
other `--gin.…` binding is applied to every run (e.g. `--gin.TRAIN_STEPS=300` halves the mini study).

Parallelism (`parallel` ≥ 1): each run is a separate `python -m lsm_jax.study --out=DIR --run=<arch>_<size>`
worker process, `parallel` at a time, largest runs first (longest-processing-time order), so XLA compilation
(CPU-bound) of one run overlaps the training and evaluation of others. `gpus` assigns worker slots round-robin
to GPUs through CUDA_VISIBLE_DEVICES, and a run starts in a free slot of the GPU with the least running work;
workers do not preallocate GPU memory, so several share a GPU. Worker output goes to `DIR/runs/<run>/log.txt`.
`time_limit_s` bounds the training phase: then no run starts, running workers are stopped (SIGTERM: they save a
resume checkpoint) and the study fits what finished. A failed run is started once more (it resumes from its own
checkpoints: workers sharing a GPU can die of a transient device error); one that fails again is named with its log
tail in the report and on stderr; architectures with at least two finished sizes are still fitted, and the command
then fails. `parallel` = 0 trains in this process, one run after another.

Then the training curves become scaling-law inputs (`lsm_jax.scaling`) and `DIR/report.md` collects the
Table-3-style fits, the Figure-1/2-style PNGs and the raw tidy tables (`curves.csv`, `eval.csv`).

An ablation grid (`study.StudyGrid.experiments`, e.g. gin/study/ablations_all.gin) lists whole runs by name
instead: each is trained from its gin files in `DIR/runs/<name>` (named `<name>` in its metadata and tables),
evaluated the same way, and `DIR/report.md` holds Table 5/6-style tables (`lsm_jax.study.ablation_tables`) and the
milestone count beside the paper's 1,376 instead of fits; see docs/ablations.md.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Sequence

import gin
from absl import logging

GRID_SCOPE = "study."
GRID_FILE = "study_grid.json"  # DIR/study_grid.json: the grid, read by worker processes
RUN_RESULT_FILE = "study_run.json"  # DIR/runs/<run>/study_run.json: written when the run is trained and evaluated
RUN_LOG_FILE = "log.txt"
_LOG_TAIL_LINES = 30
WORKER_RETRIES = 1  # a failed run is started once more before the study reports it
_STOP_GRACE_S = 30  # SIGTERM lets the trainer save a resume checkpoint before the worker is killed


def split_bindings(bindings: Sequence[str]) -> tuple[list[str], list[str]]:
  """(grid bindings, per-run bindings): `study.…` bindings configure the grid, the rest every run."""
  grid = [b for b in bindings if b.strip().startswith(GRID_SCOPE)]
  return grid, [b for b in bindings if not b.strip().startswith(GRID_SCOPE)]


def train_run(run_dir: str, gin_files: Sequence[str], bindings: Sequence[str]) -> dict:
  """Trains (or resumes, or finds finished) one run with a fresh gin config."""
  from lsm_jax import train as train_cli
  from lsm_jax import trainer

  # Each run gets a fresh config; parsing finalizes (locks) it, so clear and parse while unlocked.
  with gin.unlock_config():
    gin.clear_config()
    train_cli.parse_gin(gin_files, [f"MODEL_DIR = {run_dir!r}", *bindings])
  return gin.get_configurable(trainer.train)(config_text=gin.config_str())


@dataclasses.dataclass(frozen=True)
class StudyGrid:
  """What a study trains, one of two kinds of grid.

  A scaling grid: `archs` × `size_files` (size name → gin file setting configs.ModelConfig's shape), each with
  `run_file` (data, steps, optimizer, milestones) and the architecture's `arch_bindings` (arch → bindings); the
  study fits scaling laws. An ablation grid: `experiments` (run name → a gin file, or a list of gin files where
  later wins, each a whole run such as gin/ablations/aspect/llama_1792x24.gin), with `data_dirs` (sequence length →
  DATA_DIR, for runs of several contexts); the study writes Table 5/6-style tables (lsm_jax.study.ablation_tables).
  Then `run_bindings` apply to every run. Every milestone is evaluated on `eval_tasks` and the last one also on
  `final_eval_tasks`, in batches of `eval_batch_size` rows; `val_max_batches` caps the validation batches (None:
  the whole validation split); `niah_overrides` are lsm_jax.evaluate.niah.NIAHConfig fields (e.g. shorter
  context_lengths for small models)."""

  archs: Sequence[str] = ()
  size_files: dict = dataclasses.field(default_factory=dict)
  run_file: str | None = None
  experiments: dict = dataclasses.field(default_factory=dict)
  data_dirs: dict = dataclasses.field(default_factory=dict)
  eval_tasks: Sequence[str] = ("val_loss",)
  final_eval_tasks: Sequence[str] = ()
  eval_batch_size: int = 32
  val_max_batches: int | None = None
  niah_overrides: dict = dataclasses.field(default_factory=dict)
  run_bindings: Sequence[str] = ()
  arch_bindings: dict = dataclasses.field(default_factory=dict)
  description: str = ""

  @property
  def is_ablation(self) -> bool:
    return bool(self.experiments)


@dataclasses.dataclass(frozen=True)
class StudyRun:
  """One run of a grid: its name (`<arch>_<size>`, or an ablation grid's key), directory, gin files and bindings."""

  name: str
  arch: str
  size: str
  run_dir: str
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...]


def _config_path_exists(path: str) -> bool:
  from lsm_jax import train as train_cli

  return os.path.exists(os.path.join(train_cli.CONFIG_ROOT, path)) or os.path.exists(path)


def experiment_runs(out_dir: str, grid: StudyGrid) -> list[StudyRun]:
  """An ablation grid's runs in the grid's order, each named by its key and given its context's DATA_DIR."""
  from lsm_jax import summary

  scaling_fields = [name for name in ("archs", "size_files", "run_file", "arch_bindings") if getattr(grid, name)]
  if scaling_fields:
    raise ValueError(
      f"study.StudyGrid lists experiments and also {', '.join(scaling_fields)}; a grid is either "
      "experiments (an ablation grid) or archs × size_files with a run_file (a scaling grid)"
    )
  data_dirs = {int(seq_len): data_dir for seq_len, data_dir in grid.data_dirs.items()}
  runs = []
  for name, files in grid.experiments.items():
    gin_files = (files,) if isinstance(files, str) else tuple(files)
    missing = [path for path in gin_files if not _config_path_exists(path)]
    if not gin_files or missing:
      raise ValueError(f"study.StudyGrid.experiments[{name!r}] names gin file(s) that do not exist: {missing or files}")
    run = summary.experiment(gin_files, grid.run_bindings)
    bindings = [f"trainer.train.run_name = {name!r}"]
    if data_dirs:
      if run["seq_len"] not in data_dirs:
        raise ValueError(
          f"study.StudyGrid.data_dirs has no dataset for run {name!r}'s context {run['seq_len']}; "
          f"it has {sorted(data_dirs)}"
        )
      bindings.append(f"DATA_DIR = {data_dirs[run['seq_len']]!r}")
    runs.append(
      StudyRun(
        name,
        run["config"].arch,
        run["config"].size,
        os.path.join(out_dir, "runs", name),
        gin_files,
        (*bindings, *grid.run_bindings),
      )
    )  # command-line bindings win
  return runs


def grid_runs(out_dir: str, grid: StudyGrid) -> list[StudyRun]:
  """The grid's runs (scaling grids in (arch, size) order), after checking the grid."""
  from lsm_jax import summary
  from lsm_jax.models import configs

  if grid.is_ablation:
    return experiment_runs(out_dir, grid)
  if not grid.archs or grid.run_file is None:
    raise ValueError(
      "study.StudyGrid needs either experiments (an ablation grid) or archs, size_files and run_file (a scaling grid)"
    )
  for field in ("archs", "arch_bindings"):
    unknown = sorted(set(getattr(grid, field)) - set(configs.ALL_ARCHS))
    if unknown:
      raise ValueError(f"study.StudyGrid.{field} has unknown architectures {unknown}; valid: {configs.ALL_ARCHS}")
  if len(grid.size_files) < 2:
    raise ValueError(f"study.StudyGrid.size_files has {len(grid.size_files)} size(s); a scaling fit needs at least 2")
  for path in (grid.run_file, *grid.size_files.values()):
    if not _config_path_exists(path):
      raise ValueError(f"gin file {path!r} of the study grid does not exist")
  runs = [
    StudyRun(
      f"{arch}_{size}",
      arch,
      size,
      os.path.join(out_dir, "runs", f"{arch}_{size}"),
      (f"gin/models/{arch}/base.gin", size_file, grid.run_file),
      (*grid.arch_bindings.get(arch, ()), *grid.run_bindings),
    )  # command-line bindings win
    for arch in grid.archs
    for size, size_file in grid.size_files.items()
  ]
  # Every run's config is parsed now, so a misspelled binding stops the study before the first run trains.
  for run in runs:
    try:
      summary.experiment(run.gin_files, run.bindings)
    except (ValueError, TypeError, FileNotFoundError) as error:
      raise ValueError(f"run {run.name} of the study grid: {error}") from error
  return runs


def _run_identity(run: StudyRun, grid: StudyGrid) -> dict:
  """What a finished run's result must match to be reused: its gin files, bindings and evaluation (as JSON
  holds them, so a result read back compares equal)."""
  identity = {
    "gin_files": list(run.gin_files),
    "bindings": list(run.bindings),
    "eval_tasks": list(grid.eval_tasks),
    "final_eval_tasks": list(grid.final_eval_tasks),
    "val_max_batches": grid.val_max_batches,
    "niah_overrides": dict(grid.niah_overrides),
  }
  return json.loads(json.dumps(identity))


def read_run_result(run: StudyRun, grid: StudyGrid) -> dict | None:
  """The run's study_run.json if it finished with this grid's settings, else None."""
  path = os.path.join(run.run_dir, RUN_RESULT_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    result = json.load(f)
  return result if result.get("identity") == _run_identity(run, grid) else None


def train_and_evaluate(run: StudyRun, grid: StudyGrid) -> dict:
  """Trains `run` to its last step, evaluates every milestone into RUN_DIR/eval/, writes study_run.json."""
  import jax

  from lsm_jax import checkpoint
  from lsm_jax.evaluate import sweep

  start = time.perf_counter()
  logging.info("study: training %s", run.run_dir)
  summary = train_run(run.run_dir, run.gin_files, run.bindings)
  train_steps = checkpoint.read_run_metadata(run.run_dir)["train_steps"]
  if summary["step"] != train_steps:
    raise RuntimeError(
      f"run {run.name} stopped at step {summary['step']} of {train_steps} (preempted); rerun the study to resume it"
    )
  trained = time.perf_counter()
  logging.info("study: evaluating %s", run.run_dir)
  evaluation = dict(
    batch_size=grid.eval_batch_size,
    val_max_batches=grid.val_max_batches,
    niah_overrides=dict(grid.niah_overrides),
    progress=False,
  )
  sweep.evaluate_run(run.run_dir, tasks=list(grid.eval_tasks), **evaluation)
  if grid.final_eval_tasks:
    last_milestone = checkpoint.list_milestones(run.run_dir)[-1]
    sweep.evaluate_run(run.run_dir, tasks=list(grid.final_eval_tasks), steps=[last_milestone], **evaluation)
  result = {
    "run": run.name,
    "identity": _run_identity(run, grid),
    "final_loss": _final_loss(run.run_dir),
    "train_s": round(trained - start, 1),
    "eval_s": round(time.perf_counter() - trained, 1),
    "device_kind": jax.devices()[0].device_kind,
    "device_count": jax.device_count(),
    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
  }
  with open(os.path.join(run.run_dir, RUN_RESULT_FILE), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  return result


def _final_loss(run_dir: str) -> float:
  """The training loss of the last logged step (a run resumed at its end logs nothing new)."""
  from lsm_jax import metrics

  return [record["loss"] for record in metrics.read_metrics(run_dir) if record.get("loss") is not None][-1]


def write_grid(out_dir: str, grid: StudyGrid) -> None:
  with open(os.path.join(out_dir, GRID_FILE), "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(grid), f, indent=1)


def read_grid(out_dir: str) -> StudyGrid:
  with open(os.path.join(out_dir, GRID_FILE), encoding="utf-8") as f:
    return StudyGrid(**json.load(f))


def run_worker(out_dir: str, run_name: str) -> dict:
  """A worker process's job: train and evaluate the run named `run_name` of the grid in DIR/study_grid.json."""
  grid = read_grid(out_dir)
  runs = {run.name: run for run in grid_runs(out_dir, grid)}
  if run_name not in runs:
    raise ValueError(f"--run={run_name!r} is not a run of the grid in {out_dir}; valid: {', '.join(runs)}")
  return train_and_evaluate(runs[run_name], grid)


def run_cost(run: StudyRun) -> float:
  """Relative training cost of a run (its non-embedding parameters; the runs of a grid see the same tokens)."""
  from lsm_jax import flops, summary

  config = summary.experiment(run.gin_files, run.bindings)["config"]
  return flops.non_embedding_params(
    run.arch,
    config.num_layers,
    config.d_model,
    config.num_heads,
    ffn_dim=config.ffn_dim,
    layer_pattern=config.layer_pattern,
  )


def _log_tail(path: str) -> str:
  if not os.path.exists(path):
    return "(no log)"
  with open(path, encoding="utf-8", errors="replace") as f:
    return "".join(collections.deque(f, maxlen=_LOG_TAIL_LINES)).rstrip()


def largest_first(runs: Sequence[StudyRun], costs: dict[str, float]) -> list[StudyRun]:
  """The workers' queue: runs by cost ({name: run_cost}), largest first, so the longest start while every
  worker is free."""
  return sorted(runs, key=lambda run: costs[run.name], reverse=True)


def _train_in_workers(
  out_dir: str, grid: StudyGrid, runs: list[StudyRun], *, parallel: int, gpus: Sequence[str], deadline: float | None
) -> tuple[dict, dict]:
  """Runs `runs` in `parallel` worker processes, largest first; returns ({name: result}, {name: failure})."""
  write_grid(out_dir, grid)
  costs = {run.name: run_cost(run) for run in runs}
  queue = largest_first(runs, costs)
  logging.info(
    "study: %d run(s) in %d worker(s), largest first: %s", len(queue), parallel, ", ".join(run.name for run in queue)
  )
  base_env = dict(os.environ)
  # Several processes share a GPU: each allocates what it uses instead of 75% of the memory up front.
  if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in base_env:
    base_env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  active = {}  # slot → (run, process, log file)
  results, failures = {}, {}
  attempts = collections.Counter()
  stopping = False

  def gpu_load(slot):  # slots belong to GPUs round-robin; a run starts on the least loaded GPU's free slot
    return sum(
      costs[running.name] for other, (running, _, _) in active.items() if gpus and other % len(gpus) == slot % len(gpus)
    )

  try:
    while queue or active:
      if deadline is not None and time.monotonic() > deadline and not stopping:
        stopping = True
        logging.warning(
          "study: time limit reached; stopping %d worker(s), %d run(s) not started", len(active), len(queue)
        )
        for run in queue:
          failures[run.name] = "not started: the time limit was reached"
        queue = []
        for _, process, _ in active.values():
          process.terminate()
        stop_by = time.monotonic() + _STOP_GRACE_S
      while queue and len(active) < parallel:
        slot = min((slot for slot in range(parallel) if slot not in active), key=gpu_load)
        run = queue.pop(0)
        env = dict(base_env)
        if gpus:
          env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        os.makedirs(run.run_dir, exist_ok=True)
        log = open(os.path.join(run.run_dir, RUN_LOG_FILE), "a", encoding="utf-8")
        command = [sys.executable, "-m", "lsm_jax.study", f"--out={out_dir}", f"--run={run.name}"]
        log.write(f"$ {shlex.join(command)}  (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')})\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        active[slot] = (run, process, log)
        attempts[run.name] += 1
        logging.info("study: started %s (slot %d, pid %d)", run.name, slot, process.pid)
      for slot, (run, process, log) in list(active.items()):
        if stopping and time.monotonic() > stop_by and process.poll() is None:
          process.kill()
        if process.poll() is None:
          continue
        log.close()
        del active[slot]
        result = read_run_result(run, grid)
        if process.returncode == 0 and result is not None:
          results[run.name] = result
          logging.info("study: finished %s (train %.0f s, eval %.0f s)", run.name, result["train_s"], result["eval_s"])
        elif not stopping and attempts[run.name] <= WORKER_RETRIES:
          # A worker can die of a transient device error (seen: a CUDA-graph capture failing while ten workers
          # shared one GPU); the run resumes from its own checkpoints.
          logging.warning("study: run %s exited with status %d; running it again", run.name, process.returncode)
          queue.insert(0, run)
        else:
          reason = "stopped at the time limit" if stopping else f"worker exited with status {process.returncode}"
          if attempts[run.name] > 1:
            reason += f" in each of {attempts[run.name]} attempts"
          log_path = os.path.join(run.run_dir, RUN_LOG_FILE)
          failures[run.name] = f"{reason}; last lines of {log_path}:\n{_log_tail(log_path)}"
          logging.error("study: run %s failed: %s", run.name, failures[run.name])
      time.sleep(0.2)
  finally:  # this process failing (or interrupted) takes its workers along
    for _, process, log in active.values():
      process.kill()
      log.close()
  return results, failures


def _merge_eval_tables(runs: Sequence[StudyRun], output: str) -> str:
  """DIR/eval.jsonl + eval.csv: every run's RUN_DIR/eval/results table, in run order."""
  from lsm_jax.evaluate import sweep

  rows = [row for run in runs for row in sweep.read_table(os.path.join(run.run_dir, "eval", "results.jsonl"))]
  jsonl_path, csv_path = sweep.table_paths(output)
  if os.path.exists(jsonl_path):  # rebuilt from the runs' tables every time
    os.remove(jsonl_path)
  sweep.append_rows(output, rows)
  return csv_path


def _device_line(results: dict, parallel: int, gpus: Sequence[str]) -> str:
  """The devices of the runs: this process's, or those the workers reported (`results`)."""
  import jax

  if not parallel:
    return f"{jax.device_count()} × {jax.devices()[0].device_kind}"
  # This process stays off the accelerators (a backend here would take GPU memory from the workers).
  kinds = sorted({result["device_kind"] for result in results.values()})
  counts = sorted({result["device_count"] for result in results.values()})
  placement = f"GPUs {','.join(gpus)} (CUDA_VISIBLE_DEVICES)" if gpus else "every visible device"
  return (
    f"{len(gpus) or 'all visible'} × {', '.join(kinds)}: {parallel} worker processes over {placement}, "
    f"each run on {' or '.join(map(str, counts))} device(s)"
  )


def run_study(
  out_dir: str, grid: StudyGrid, *, parallel: int = 0, gpus: Sequence[str] = (), time_limit_s: float | None = None
) -> str:
  """Trains and evaluates every arch × size, fits the scaling laws, writes report.md; returns its path.

  parallel: worker processes (0: train in this process); gpus: CUDA_VISIBLE_DEVICES values for the worker
  slots, round-robin; time_limit_s: after this many seconds no run starts and running workers are stopped,
  and the study fits what finished. Raises RuntimeError naming the failed runs (after writing the report when
  at least one architecture has two finished sizes).
  """
  from lsm_jax import scaling

  if parallel < 0:
    raise ValueError(f"parallel must be >= 0 (0: train in this process), got {parallel}")
  if gpus and not parallel:
    raise ValueError("gpus assigns worker processes to GPUs; give parallel >= 1 with it")
  started = time.monotonic()
  deadline = started + time_limit_s if time_limit_s else None
  runs = grid_runs(out_dir, grid)
  os.makedirs(out_dir, exist_ok=True)
  results = {run.name: result for run in runs if (result := read_run_result(run, grid)) is not None}
  skipped = list(results)
  todo = [run for run in runs if run.name not in results]
  if skipped:
    logging.info("study: %d finished run(s) skipped: %s", len(skipped), ", ".join(skipped))
  failures = {}
  if parallel:
    new_results, failures = _train_in_workers(out_dir, grid, todo, parallel=parallel, gpus=gpus, deadline=deadline)
  else:
    new_results = {}
    for run in todo:
      if deadline is not None and time.monotonic() > deadline:
        failures[run.name] = "not started: the time limit was reached"
        continue
      new_results[run.name] = train_and_evaluate(run, grid)
  results.update(new_results)

  finished = [run for run in runs if run.name in results]
  failure_text = "\n".join(f"- {name}: {reason}" for name, reason in failures.items())
  if grid.is_ablation:
    if not finished:
      raise RuntimeError(f"no run of the ablation grid finished; failed runs:\n{failure_text}")
    report = write_ablation_report(
      out_dir,
      grid,
      runs=runs,
      finished=finished,
      results={run.name: results[run.name] for run in finished},
      skipped=skipped,
      failures=failures,
      device=_device_line(results, parallel, gpus),
      wall_s=time.monotonic() - started,
    )
    if failures:
      raise RuntimeError(f"{len(failures)} run(s) failed (report without them: {report}):\n{failure_text}")
    return report
  sizes_per_arch = collections.Counter(run.arch for run in finished)
  fitted_archs = [arch for arch in grid.archs if sizes_per_arch[arch] >= 2]
  if not fitted_archs:
    finished_text = ", ".join(run.name for run in finished) or "none"
    raise RuntimeError(
      f"no architecture has two finished sizes to fit (finished runs: {finished_text}); failed runs:\n{failure_text}"
    )
  fitted_runs = [run for run in finished if run.arch in fitted_archs]
  run_dirs = [run.run_dir for run in fitted_runs]
  eval_path = _merge_eval_tables(fitted_runs, os.path.join(out_dir, "eval.csv"))
  curves_path = os.path.join(out_dir, "curves.csv")
  scaling.write_curves(scaling.curves_from_run_dirs(run_dirs), curves_path)
  curves = scaling.load_curves(curves_path)
  fits = scaling.fit_all(curves)
  with open(os.path.join(out_dir, "fits.json"), "w", encoding="utf-8") as f:
    json.dump(scaling.fits_to_json(fits), f, indent=1)
  plot_dir = os.path.join(out_dir, "plots")
  figures = scaling.plot_fits(fits, curves, plot_dir)
  figures += scaling.plot_downstream(scaling.load_eval_table(eval_path), plot_dir)
  scaling_report = os.path.join(out_dir, "scaling.md")
  scaling.write_report(fits, scaling_report)
  report = write_report(
    out_dir,
    fits=fits,
    figures=figures,
    scaling_report=scaling_report,
    results={run.name: results[run.name] for run in finished},
    skipped=skipped,
    failures=failures,
    device=_device_line(results, parallel, gpus),
    wall_s=time.monotonic() - started,
    description=grid.description,
  )
  if failures:
    raise RuntimeError(f"{len(failures)} run(s) failed (report without them: {report}):\n{failure_text}")
  return report


def _evaluated_steps(run_dir: str) -> set[int]:
  with open(os.path.join(run_dir, "eval", "results.jsonl"), encoding="utf-8") as f:
    return {json.loads(line)["step"] for line in f if line.strip()}


def milestone_counts(runs: Sequence[StudyRun], finished: Sequence[StudyRun]) -> tuple[int, int]:
  """(milestones the finished runs saved and evaluated, milestones the whole grid plans).

  Saved milestones are counted from each run's evaluation records (the study evaluates every milestone), so a study
  directory shared without its checkpoints reports the same count.
  """
  from lsm_jax import checkpoint, summary

  saved = sum(len(_evaluated_steps(run.run_dir)) for run in finished)
  planned = 0
  for run in runs:
    spec = summary.experiment(run.gin_files, run.bindings)
    planned += len(checkpoint.milestone_schedule(spec["train_steps"], spec["num_milestones"]))
  return saved, planned


def _provenance(results, skipped, device, wall_s) -> list[str]:
  import jax

  return [
    f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
    f"- device: {device} (jax {jax.__version__}, Python {platform.python_version()})",
    f"- wall time: {wall_s:.0f} s ({len(results) - len(skipped)} run(s) trained and evaluated, "
    f"{len(skipped)} finished earlier and skipped)",
    f"- command: `python -m lsm_jax.study {shlex.join(sys.argv[1:])}`",
    f"- runs: {', '.join(results)}",
  ]


def _runs_table(results) -> list[str]:
  lines = [
    "| Run | final train loss | train s | eval s | CUDA_VISIBLE_DEVICES | finished |",
    "|---|---|---|---|---|---|",
  ]
  for name, result in results.items():
    lines.append(
      f"| {name} | {result['final_loss']:.4f} | {result['train_s']:.0f} | {result['eval_s']:.0f} | "
      f"{result['cuda_visible_devices'] or '—'} | {result['finished_at'][:19]} |"
    )
  return lines


def write_ablation_report(out_dir, grid, *, runs, finished, results, skipped, failures, device, wall_s) -> str:
  """An ablation grid's outputs: eval.csv/jsonl (every milestone, with run coordinates), ablation_tables.csv/json
  and report.md with the Table 5/6-style tables beside the paper's; returns the report's path."""
  from lsm_jax.evaluate import sweep
  from lsm_jax.study import ablation_tables

  eval_path = _merge_eval_tables(finished, os.path.join(out_dir, "eval.csv"))
  tables = ablation_tables.build_tables(sweep.read_table(eval_path))
  ablation_tables.write_tables(tables, os.path.join(out_dir, "ablation_tables"))
  saved, planned = milestone_counts(runs, finished)
  lines = [
    "# Ablation study",
    "",
    *_provenance(results, skipped, device, wall_s),
    f"- milestone checkpoints: {saved:,} saved by the {len(finished)} finished run(s), {planned:,} planned by "
    f"the grid's {len(runs)} run(s); the paper's study saved {ablation_tables.PAPER_MILESTONES:,} over its "
    "24 main runs and its ablations (arXiv 2406.16690)",
    "",
  ]
  if grid.description:
    lines += [grid.description, ""]
  if failures:
    lines += ["## Failed runs (left out of the tables)", ""]
    for name, reason in failures.items():
      lines += [f"### {name}", "", "```", reason, "```", ""]
  lines += [
    ablation_tables.format_report(tables),
    "",
    "## Runs",
    "",
    *_runs_table(results),
    "",
    "## Raw tables",
    "",
    "- `eval.csv`: every milestone's evaluation with each run's coordinates (run, arch, size, d_model, "
    "num_layers, seq_len, ablation, step, tokens, compute_pflops_days, task, metric, value)",
    "- `ablation_tables.csv` / `.json`: the tables above, one row per run at its last evaluated milestone",
    "- `runs/<run>/log.txt` (worker processes) and `runs/<run>/study_run.json`: each run's log and timings",
    "",
  ]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  return path


def write_report(
  out_dir, *, fits, figures, scaling_report, results, skipped, failures, device, wall_s, description
) -> str:
  """report.md: provenance, the fits beside the paper's Table 3, per-run timings, figures and the raw tables."""
  from lsm_jax.scaling import paper

  paper_table = paper.paper_fits()
  lines = ["# Scaling study", "", *_provenance(results, skipped, device, wall_s), ""]
  if description:
    lines += [description, ""]
  if failures:
    lines += ["## Failed runs (left out of the fits)", ""]
    for name, reason in failures.items():
      lines += [f"### {name}", "", "```", reason, "```", ""]
  lines += [
    "## Fitted exponents beside the paper's Table 3",
    "",
    "| Arch | α_L (ours) | α_L (paper) | a, N_opt (ours) | a (paper) | b, D_opt (ours) | b (paper) |",
    "|---|---|---|---|---|---|---|",
  ]
  for arch, fit in fits.items():
    reference = paper_table.get(arch)
    exponents = []
    for law in ("loss", "n_opt", "d_opt"):
      exponents.append(f"{getattr(fit, law).exponent:.4f}")
      exponents.append(f"{getattr(reference, law).exponent:.4f}" if reference else "—")
    lines.append(f"| {arch} | " + " | ".join(exponents) + " |")
  with open(scaling_report, encoding="utf-8") as f:
    lines += ["", f.read().strip(), ""]
  lines += ["## Runs", "", *_runs_table(results), "", "## Figures", ""]
  lines += [f"![{os.path.basename(path)}]({os.path.relpath(path, out_dir)})" for path in figures]
  lines += [
    "",
    "## Raw tables",
    "",
    "- `curves.csv`: training loss per logged step (arch, size, "
    "non_embedding_params, tokens, compute_pflops_days, loss)",
    "- `eval.csv`: every milestone's evaluation (run, arch, size, d_model, num_layers, seq_len, ablation, "
    "step, tokens, compute_pflops_days, task, metric, value)",
    "- `fits.json`: the fitted coefficients with bootstrap intervals",
    "- `runs/<run>/log.txt` (worker processes) and `runs/<run>/study_run.json`: each run's log and timings",
    "",
  ]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  return path
