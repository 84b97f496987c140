"""End-to-end `python -m lsm_jax.scaling` (fit, plot, predict) and refusal of degenerate input."""

import csv
import dataclasses
import json
import math
import pathlib
import re
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from lsm_jax import scaling
from lsm_jax.scaling.__main__ import main

SIZES = {"70m": 2e7, "160m": 8.5e7, "410m": 3.3e8, "1b": 9.1e8, "3b": 2.8e9, "7b": 6.5e9}


def curve_rows(archs=("tnl", "hgrn2"), points=20):
  """Runs sampled from L = 1.8 + 400/N^0.34 + 400/D^0.28 with C = 6·N·D (in PFLOP/s-days)."""
  rows = []
  for arch in archs:
    for size, params in SIZES.items():
      for tokens in np.geomspace(4e8, 3e11, points):
        rows.append(
          {
            "arch": arch,
            "size": size,
            "non_embedding_params": params,
            "tokens": tokens,
            "compute_pflops_days": 6 * params * tokens / 8.64e19,
            "loss": 1.8 + 400 / params**0.34 + 400 / tokens**0.28,
          }
        )
  return rows


def write_csv(path, rows, columns=None):
  columns = columns or list(rows[0])
  with open(path, "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return str(path)


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def run_cli(capsys, *argv):
  code = main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_fit_prints_table3_layout_and_json(tmp_path, capsys):
  rows = curve_rows()
  csv_path = write_csv(tmp_path / "curves.csv", rows)
  code, out, _ = run_cli(capsys, "fit", f"--curves={csv_path}", "--format=table", "--bootstrap=50")
  assert code == 0
  expected = scaling.fit_all(rows, num_bootstrap=50)
  assert out.startswith("| Arch | L(C) | N_opt(C) | D_opt(C) |")
  for arch, name in (("tnl", "TNL"), ("hgrn2", "HGRN2")):
    loss = expected[arch].loss
    assert f"| {name} | {loss.coefficient:.4f} C^{loss.exponent:.4f} |" in out
  # CSV and JSON lines give the same fit.
  jsonl_path = write_jsonl(tmp_path / "curves.jsonl", rows)
  code, out, _ = run_cli(capsys, "fit", f"--curves={jsonl_path}", "--format=json", "--bootstrap=50")
  assert code == 0
  document = json.loads(out)
  assert document["unit_of_compute"] == "PFLOP/s-days"
  assert document["fits"]["tnl"]["n_opt"]["exponent"] == pytest.approx(expected["tnl"].n_opt.exponent, rel=1e-12)
  assert document["fits"]["hgrn2"]["chinchilla"]["alpha"] == pytest.approx(0.34, rel=1e-3)
  # The fit file drives predict.
  fit_path = tmp_path / "fit.json"
  fit_path.write_text(out)
  code, out, _ = run_cli(capsys, "predict", "--arch=hgrn2", "--compute=10", f"--fit={fit_path}", "--format=json")
  assert code == 0
  assert json.loads(out)["n_opt"] == pytest.approx(float(expected["hgrn2"].n_opt(10.0)), rel=1e-9)


def test_compute_range_restricts_the_envelope(tmp_path, capsys):
  csv_path = write_csv(tmp_path / "curves.csv", curve_rows(("tnl",)))
  code, out, _ = run_cli(
    capsys,
    "fit",
    f"--curves={csv_path}",
    "--format=json",
    "--bootstrap=0",
    "--no_chinchilla",
    "--min_compute=0.1",
    "--max_compute=10",
  )
  assert code == 0
  low, high = json.loads(out)["fits"]["tnl"]["compute_range"]
  assert 0.1 <= low < 0.11 and 9 < high <= 10


def test_plot_writes_valid_pngs(tmp_path, capsys):
  rows = curve_rows(("tnl",), points=12)
  csv_path = write_csv(tmp_path / "curves.csv", rows)
  eval_rows = []
  for row in rows[::3]:
    for task, metric, value in (
      ("csr", "acc_avg", 0.6 - 0.01 * row["loss"]),
      ("wikitext2", "ppl", math.exp(row["loss"])),
    ):
      eval_rows.append(
        {
          "arch": row["arch"],
          "size": row["size"],
          "step": 1,
          "tokens": row["tokens"],
          "compute_pflops_days": row["compute_pflops_days"],
          "task": task,
          "metric": metric,
          "value": value,
        }
      )
  eval_path = write_csv(tmp_path / "eval.csv", eval_rows)
  out_dir = tmp_path / "plots"
  code, out, err = run_cli(
    capsys,
    "plot",
    f"--curves={csv_path}",
    f"--eval_table={eval_path}",
    f"--out={out_dir}",
    "--bootstrap=0",
    "--no_chinchilla",
  )
  assert code == 0, err
  expected = {"figure1.png", "scaling_tnl.png", "downstream_csr_acc_avg.png", "downstream_wikitext2_ppl.png"}
  assert {path.name for path in out_dir.iterdir()} == expected
  assert sorted(out.split()) == sorted(str(out_dir / name) for name in expected)
  for name in expected:
    assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out_dir / name)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.01  # something was drawn


def test_predict_as_a_module_uses_the_papers_table3():
  result = subprocess.run(
    [sys.executable, "-m", "lsm_jax.scaling", "predict", "--arch=llama", "--compute=100", "--format=json"],
    capture_output=True,
    text=True,
    check=True,
  )
  prediction = json.loads(result.stdout)
  assert prediction["n_opt"] == pytest.approx(4.83e9, rel=1e-3)
  assert prediction["d_opt"] == pytest.approx(2.68e11, rel=2e-3)
  assert prediction["loss"] == pytest.approx(2.568, abs=5e-4)


def degenerate(case):
  rows = curve_rows(("tnl",), points=6)
  if case == "one size":
    return [row for row in rows if row["size"] == "1b"]
  if case == "nan loss":
    rows[7]["loss"] = float("nan")
  elif case == "non-monotone compute":
    rows[9]["compute_pflops_days"], rows[10]["compute_pflops_days"] = (
      rows[10]["compute_pflops_days"],
      rows[9]["compute_pflops_days"],
    )
  elif case == "zero compute":
    rows[0]["compute_pflops_days"] = 0.0
  elif case == "text loss":
    rows[3]["loss"] = "diverged"
  elif case == "two param counts in a run":
    rows[2]["non_embedding_params"] = 1e8
  elif case == "single-point run":
    rows = [row for row in rows if row["size"] != "7b"] + rows[-1:]
  return rows


@pytest.mark.parametrize(
  "case, message",
  [
    ("one size", r"arch tnl has only one model size \(1b\).*at least two sizes"),
    ("nan loss", r"loss is NaN or infinite in 1 row\(s\), first row 8"),
    ("non-monotone compute", r"compute_pflops_days is not increasing within run tnl 160m \(row 11: "),
    ("zero compute", r"compute_pflops_days must be > 0 .* row 1"),
    ("text loss", r"'loss' in row 4 is 'diverged', which is not a number"),
    ("two param counts in a run", r"run tnl 70m has 2 different non_embedding_params"),
    ("single-point run", r"run tnl 7b has a single point"),
  ],
)
def test_degenerate_curves_are_refused(case, message, tmp_path, capsys):
  rows = degenerate(case)
  with pytest.raises(ValueError, match=message):
    scaling.fit_all(rows, num_bootstrap=0, chinchilla=False)
  path = write_jsonl(tmp_path / "curves.jsonl", rows)
  code, out, err = run_cli(capsys, "fit", f"--curves={path}")
  assert code == 2 and out == ""
  assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_missing_columns_and_files_are_named(tmp_path, capsys):
  rows = curve_rows(("tnl",), points=4)
  path = write_csv(tmp_path / "curves.csv", rows, columns=["arch", "size", "tokens", "loss"])
  with pytest.raises(
    ValueError,
    match=r"lacks column\(s\) non_embedding_params, compute_pflops_days; "
    r"required columns are arch, size, non_embedding_params",
  ):
    scaling.load_curves(path)
  code, _, err = run_cli(capsys, "plot", f"--curves={tmp_path / 'absent.csv'}", f"--out={tmp_path}")
  assert code == 2 and "does not exist" in err
  with pytest.raises(ValueError, match="has no rows"):
    scaling.load_curves(write_csv(tmp_path / "empty.csv", [], columns=list(rows[0])))
  with pytest.raises(ValueError, match="one model size only"):  # two sizes, but one dominates everywhere
    runs = scaling.load_curves(rows)
    scaling.fit_runs(runs["tnl"][:2], num_bootstrap=0, chinchilla=False, compute_range=(1e-4, 2e-3))


def test_predict_refuses_unknown_arch_and_bad_compute(tmp_path, capsys):
  with pytest.raises(ValueError, match=r"no fit for arch 'mamba'; available: llama, tnl, hgrn2, cosformer2"):
    scaling.predict("mamba", 1.0)
  with pytest.raises(ValueError, match="compute must be a positive number"):
    scaling.predict("tnl", -3.0)
  bad_fit = tmp_path / "bad.json"
  bad_fit.write_text('{"tnl": {}}')
  code, _, err = run_cli(capsys, "predict", "--arch=tnl", "--compute=1", f"--fit={bad_fit}")
  assert code == 2 and "fit file must be a JSON object" in err


def test_fit_lists_degenerate_fits_and_predict_refuses_one(tmp_path, capsys):
  # The committed mini study's curves: cosFormer2's L(N, D) fit degenerates (α ≈ 19, A ≈ 6e112, E = 0).
  curves_path = pathlib.Path(__file__).parent.parent / "benchmarks/results/mini_study/curves.csv"
  code, out, _ = run_cli(capsys, "fit", f"--curves={curves_path}", "--bootstrap=0", "--num_points=200")
  assert code == 0
  problems = out.split("Degenerate fits (marked †; left out of every prediction in this report):")[1]
  assert "- cosFormer2 L(N, D): E = 0 is at its bound 0" in problems
  # A degenerate optimum: α lands near 19, its digits depending on the CPU's floating-point kernels.
  (alpha,) = re.findall(r"cosFormer2 L\(N, D\):.*α = ([0-9.]+) is outside \(0, 2\)", problems)
  assert 10 < float(alpha) < 30
  assert "| cosFormer2 † |" in out and "HGRN2 L(N, D)" not in problems
  fits = scaling.fit_all(curve_rows(("tnl",), points=6), num_bootstrap=0, chinchilla=False)
  fits["tnl"] = dataclasses.replace(fits["tnl"], d_opt=scaling.PowerLaw(1e9, 1.3))
  fit_path = tmp_path / "fit.json"
  fit_path.write_text(json.dumps(scaling.fits_to_json(fits)))
  code, out, err = run_cli(capsys, "predict", "--arch=tnl", "--compute=1", f"--fit={fit_path}")
  assert code == 2 and out == ""
  assert err.strip() == "error: the tnl fit is degenerate and predicts nothing: d_opt: exponent = 1.3 is outside (0, 1)"


def write_run_dir(run_dir, size, layers, d_model, heads, steps):
  run_dir.mkdir()
  metadata = {
    "arch": "tnl",
    "size": size,
    "seq_len": 8192,
    "global_batch_size": 480,
    "model_config": {"num_layers": layers, "d_model": d_model, "num_heads": heads},
  }
  (run_dir / "run_metadata.json").write_text(json.dumps(metadata))
  records = [{"step": 0, "loss": 11.5, "tokens_seen": 0}]
  for step in steps:
    records.append(
      {
        "step": step,
        "loss": 2 + 50 / step**0.3 + 1e3 / d_model,
        "tokens_seen": step * 480 * 8192,
        "learning_rate": 3e-4,
      }
    )
  # Logged before a preemption, then logged again by the resumed run: the later record counts.
  records.insert(1, {"step": steps[0], "loss": 99.0, "tokens_seen": steps[0] * 480 * 8192})
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def test_curves_from_run_directories(tmp_path, capsys):
  steps = [10, 100, 1000, 10000]
  write_run_dir(tmp_path / "tnl_160m", "160m", 12, 768, 6, steps)
  write_run_dir(tmp_path / "tnl_1b", "1b", 32, 1536, 12, steps)
  out = tmp_path / "curves.csv"
  code, printed, err = run_cli(
    capsys, "curves", f"--run_dir={tmp_path / 'tnl_160m'}", f"--run_dir={tmp_path / 'tnl_1b'}", f"--out={out}"
  )
  assert code == 0, err
  assert "wrote 8 rows from 2 run(s)" in printed
  runs = scaling.load_curves(str(out))["tnl"]
  table7_pflops_per_step = {"160m": 2.2, "1b": 22.3}  # the paper's Table 7, one decimal
  for run in runs:
    np.testing.assert_allclose(run.tokens, np.array(steps) * 480 * 8192)
    np.testing.assert_allclose(
      run.compute_pflops_days * 8.64e19 / 1e15, np.array(steps) * table7_pflops_per_step[run.size], rtol=0.025
    )
    assert run.loss[0] < 99
  assert runs[1].non_embedding_params == pytest.approx(906.0e6 + 2 * 32 * 1536 * 128, rel=1e-3)
  with pytest.raises(ValueError, match=r"has no run_metadata.json"):
    scaling.curves_from_run_dirs([tmp_path])
