"""Scaling fits recover known laws: envelope power laws, the Chinchilla surface, and the paper's Table 3."""

import dataclasses
import json
import pathlib
import re

import numpy as np
import pytest
import scipy.stats

from lsm_jax import flops, scaling
from lsm_jax.scaling.envelope import smooth_log_loss

# Chinchilla's published surface (Hoffmann et al. 2022), used as the known truth.
SURFACE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
SHAPES = {
  "70m": (6, 512, 4),
  "160m": (12, 768, 6),
  "410m": (25, 1024, 8),
  "1b": (32, 1536, 12),
  "3b": (35, 2560, 20),
  "7b": (32, 4096, 32),
}
TOKENS_PER_STEP = 480 * 8192
STEPS = np.unique(np.geomspace(100, 76294, 57).astype(int))  # log-spaced checkpoints of a full run


def true_loss(params, tokens, surface=SURFACE):
  return surface["E"] + surface["A"] / params ** surface["alpha"] + surface["B"] / tokens ** surface["beta"]


def synthetic_rows(arch="tnl"):
  rows = []
  for size, (layers, d_model, heads) in SHAPES.items():
    params = flops.non_embedding_params(arch, layers, d_model, heads)
    step_flops = flops.flops_per_step(arch, layers, d_model, heads, 480, 8192)
    for step in STEPS:
      tokens = step * TOKENS_PER_STEP
      rows.append(
        {
          "arch": arch,
          "size": size,
          "non_embedding_params": params,
          "tokens": float(tokens),
          "compute_pflops_days": step * step_flops / 8.64e19,
          "loss": true_loss(params, tokens),
        }
      )
  return rows


def exact_envelope_fit(arch="tnl", num_points=1000):
  """The envelope of the exact surface over the six sizes, and log-log regressions through it."""
  sizes = []
  for layers, d_model, heads in SHAPES.values():
    step_pf_days = flops.flops_per_step(arch, layers, d_model, heads, 480, 8192) / 8.64e19
    sizes.append((flops.non_embedding_params(arch, layers, d_model, heads), step_pf_days))
  low = min(STEPS[0] * step for _, step in sizes)
  high = max(STEPS[-1] * step for _, step in sizes)
  compute = np.exp(np.linspace(np.log(low), np.log(high), num_points))
  compute[[0, -1]] = low, high
  best = np.full((3, num_points), np.inf)  # loss, params, tokens
  for params, step_pf_days in sizes:
    tokens = compute / step_pf_days * TOKENS_PER_STEP
    loss = np.where(
      (compute >= STEPS[0] * step_pf_days) & (compute <= STEPS[-1] * step_pf_days), true_loss(params, tokens), np.inf
    )
    better = loss < best[0]
    best[:, better] = np.stack([loss, np.full(num_points, params), tokens])[:, better]
  laws = {}
  for law, values in zip(("loss", "n_opt", "d_opt"), best):
    regression = scipy.stats.linregress(np.log(compute), np.log(values))
    laws[law] = (np.exp(regression.intercept), regression.slope)
  return laws


@pytest.fixture(scope="module")
def tnl_fit():
  return scaling.fit_all(synthetic_rows("tnl"), num_bootstrap=200)["tnl"]


def test_envelope_power_laws_match_the_exact_envelope_within_one_percent(tnl_fit):
  expected = exact_envelope_fit("tnl")
  for law, (coefficient, exponent) in expected.items():
    fitted = getattr(tnl_fit, law)
    assert fitted.coefficient == pytest.approx(coefficient, rel=0.01), law
    assert fitted.exponent == pytest.approx(exponent, rel=0.01), law
    low, high = fitted.exponent_ci
    assert low < fitted.exponent < high
    assert fitted.coefficient_ci[0] < fitted.coefficient < fitted.coefficient_ci[1]
  assert tnl_fit.loss.exponent < 0 < tnl_fit.n_opt.exponent
  assert tnl_fit.sizes == tuple(SHAPES)


def test_llama_envelope_with_its_width_dependent_attention_flops():
  fitted = scaling.fit_all(synthetic_rows("llama"), num_bootstrap=0, chinchilla=False)["llama"]
  for law, (coefficient, exponent) in exact_envelope_fit("llama").items():
    assert getattr(fitted, law).coefficient == pytest.approx(coefficient, rel=0.01), law
    assert getattr(fitted, law).exponent == pytest.approx(exponent, rel=0.01), law
    assert getattr(fitted, law).exponent_ci is None


def test_envelope_interpolates_only_inside_each_run():
  runs = scaling.load_curves(synthetic_rows("llama"))["llama"]
  envelope = scaling.compute_envelope(runs, num_points=300)
  for index, run in enumerate(runs):
    at = envelope.run_index == index
    assert np.all(envelope.compute_pflops_days[at] >= run.compute_pflops_days[0] * (1 - 1e-12))
    assert np.all(envelope.compute_pflops_days[at] <= run.compute_pflops_days[-1] * (1 + 1e-12))
  # The envelope is never above any run that covers that compute.
  for run in runs:
    inside = (envelope.compute_pflops_days >= run.compute_pflops_days[0]) & (
      envelope.compute_pflops_days <= run.compute_pflops_days[-1]
    )
    run_loss = np.exp(
      np.interp(np.log(envelope.compute_pflops_days[inside]), np.log(run.compute_pflops_days), np.log(run.loss))
    )
    assert np.all(envelope.loss[inside] <= run_loss * (1 + 1e-12))


def test_pure_power_law_is_recovered_exactly():
  compute = np.geomspace(0.01, 1000, 50)
  law = scaling.fit_power_law(compute, 3.5 * compute**-0.077, num_bootstrap=100)
  assert law.coefficient == pytest.approx(3.5, rel=1e-10)
  assert law.exponent == pytest.approx(-0.077, rel=1e-10)


def test_chinchilla_fit_recovers_a_known_surface_despite_outliers(tnl_fit):
  for name, value in SURFACE.items():
    assert getattr(tnl_fit.chinchilla, name) == pytest.approx(value, rel=1e-3), name
  rows = synthetic_rows("tnl")
  params, tokens, loss, compute = (
    np.array([row[key] for row in rows]) for key in ("non_embedding_params", "tokens", "loss", "compute_pflops_days")
  )
  noisy = loss * np.exp(np.random.default_rng(0).normal(0, 0.002, loss.size))
  noisy[::40] *= 1.3  # loss spikes: the Huber loss must keep them from dragging the fit
  surface = scaling.fit_chinchilla(params, tokens, noisy, compute)
  for name, value in SURFACE.items():
    assert getattr(surface, name) == pytest.approx(value, rel=0.05), name


def test_chinchilla_allocation_matches_a_brute_force_minimum(tnl_fit):
  surface = tnl_fit.chinchilla
  for budget in (0.1, 10.0, 300.0):
    product = budget * 8.64e19 / surface.flops_per_param_token
    candidates = np.geomspace(1e6, 1e13, 200001)
    losses = true_loss(candidates, product / candidates)
    n_opt, d_opt, loss = surface.optimal_allocation(budget)
    assert n_opt == pytest.approx(candidates[np.argmin(losses)], rel=1e-3)
    assert n_opt * d_opt == pytest.approx(product, rel=1e-12)
    assert loss == pytest.approx(losses.min(), rel=1e-9)


# Compute-optimal allocations derived from arXiv 2406.16690 Table 3 at these budgets: N_opt / D_opt / L.
DERIVED = {
  1: {
    "llama": ("0.18B", "25.6B", "3.709"),
    "tnl": ("0.27B", "44.3B", "3.539"),
    "hgrn2": ("0.27B", "48.0B", "3.479"),
    "cosformer2": ("0.27B", "42.3B", "3.588"),
  },
  10: {
    "llama": ("0.94B", "82.9B", "3.086"),
    "tnl": ("1.22B", "130B", "2.965"),
    "hgrn2": ("1.17B", "135B", "2.925"),
    "cosformer2": ("1.19B", "120B", "3.015"),
  },
  100: {
    "llama": ("4.83B", "268B", "2.568"),
    "tnl": ("5.39B", "383B", "2.485"),
    "hgrn2": ("5.13B", "381B", "2.459"),
    "cosformer2": ("5.33B", "341B", "2.533"),
  },
  1000: {
    "llama": ("24.9B", "869B", "2.137"),
    "tnl": ("23.9B", "1.13T", "2.082"),
    "hgrn2": ("22.5B", "1.07T", "2.068"),
    "cosformer2": ("23.9B", "966B", "2.128"),
  },
}


def printed_value_and_half_unit(text):
  """'1.13T' -> (1.13e12, 0.005e12): the value and the rounding a printed number allows."""
  number, unit = re.fullmatch(r"([0-9.]+)([BT]?)", text).groups()
  scale = {"": 1, "B": 1e9, "T": 1e12}[unit]
  decimals = len(number.split(".")[1]) if "." in number else 0
  return float(number) * scale, 0.5 * 10**-decimals * scale


@pytest.mark.parametrize("budget", sorted(DERIVED))
def test_predict_reproduces_the_papers_derived_allocations(budget):
  for arch, printed in DERIVED[budget].items():
    prediction = scaling.predict(arch, budget)
    for key, text in zip(("n_opt", "d_opt", "loss"), printed):
      value, half_unit = printed_value_and_half_unit(text)
      assert abs(prediction[key] - value) <= half_unit * 1.02, (arch, budget, key, prediction[key], text)


def test_predict_from_own_fit_and_from_json_round_trip(tnl_fit, tmp_path):
  fits = {"tnl": tnl_fit}
  path = tmp_path / "fit.json"
  path.write_text(json.dumps(scaling.fits_to_json(fits)))
  from_file = scaling.predict("tnl", 42.0, fit=path)
  direct = scaling.predict("tnl", 42.0, fit=fits)
  assert from_file["arch"] == direct["arch"] == "tnl"
  numeric = ("compute_pflops_days", "n_opt", "d_opt", "loss")
  assert {key: from_file[key] for key in numeric} == pytest.approx({key: direct[key] for key in numeric}, rel=1e-12)
  assert set(from_file) == set(direct) == {"arch", *numeric}
  assert direct["n_opt"] == pytest.approx(tnl_fit.n_opt.coefficient * 42.0**tnl_fit.n_opt.exponent)
  reloaded = scaling.load_fits(path)["tnl"]
  assert reloaded.chinchilla == tnl_fit.chinchilla
  assert reloaded.loss == tnl_fit.loss


def test_table3_is_shipped_as_data():
  assert scaling.TABLE_3["llama"]["loss"] == (3.7087, -0.0798)
  assert scaling.TABLE_3["hgrn2"]["n_opt"] == (2.66e8, 0.6427)
  assert set(scaling.TABLE_3) == set(flops.ARCHS)
  text = scaling.format_table(scaling.paper_fits())
  assert "| LLaMA | 3.7087 C^-0.0798 | (1.82×10^8) C^0.7118 | (2.56×10^10) C^0.5102 |" in text
  assert "| cosFormer2 | 3.5877 C^-0.0756 | (2.65×10^8) C^0.6516 | (4.23×10^10) C^0.4529 |" in text


def test_write_report(tnl_fit, tmp_path):
  text = scaling.write_report({"tnl": tnl_fit}, tmp_path / "report.md")
  assert (tmp_path / "report.md").read_text() == text
  assert f"| TNL | {tnl_fit.loss.coefficient:.4f} C^{tnl_fit.loss.exponent:.4f} |" in text
  assert "| TNL | 3.5391 C^-0.0768 |" in text  # the paper's row beside ours
  assert "| TNL | 1.6900 | 406.4 | 0.3400 | 410.7 | 0.2800 |" in text


def test_smoothing_is_a_centred_moving_average_of_log_loss():
  loss = np.exp(np.random.default_rng(1).normal(1.0, 0.1, 12))
  smoothed = np.log(smooth_log_loss(loss, 5))
  log_loss = np.log(loss)
  np.testing.assert_allclose(smoothed[2:-2], np.convolve(log_loss, np.ones(5) / 5, mode="valid"), rtol=1e-12)
  np.testing.assert_allclose(
    smoothed[[0, 1, -2, -1]], [log_loss[0], log_loss[:3].mean(), log_loss[-3:].mean(), log_loss[-1]], rtol=1e-12
  )
  # A straight line in log space is left as it is.
  line = np.exp(np.linspace(2, 1, 9))
  np.testing.assert_allclose(smooth_log_loss(line, 7), line, rtol=1e-12)
  with pytest.raises(ValueError, match="smoothing_window must be an odd positive integer, got 4"):
    smooth_log_loss(loss, 4)


def test_smoothing_removes_most_of_the_noise_bias_of_the_envelope():
  rows = synthetic_rows("tnl")
  noise = np.exp(np.random.default_rng(2).normal(0, 0.01, len(rows)))
  for row, factor in zip(rows, noise):
    row["loss"] *= factor
  expected_coefficient, expected_exponent = exact_envelope_fit("tnl")["loss"]
  errors = {}
  for window in (1, 7):
    fitted = scaling.fit_all(rows, num_bootstrap=0, chinchilla=False, smoothing_window=window)["tnl"].loss
    errors[window] = abs(np.log(fitted.coefficient / expected_coefficient))
  assert errors[7] < 0.5 * errors[1]


# The committed mini study (1M-50M models, 300 steps): cosFormer2's curves are nearly flat, and its L(N, D) fit
# ends at E = 0, A ≈ 6e112, α ≈ 19 (benchmarks/results/mini_study/fits.json).
MINI_STUDY_CURVES = pathlib.Path(__file__).parent.parent / "benchmarks/results/mini_study/curves.csv"
MINI_STUDY_COSFORMER2_SURFACE = dict(
  E=0.0,
  A=6.034625255778014e112,
  B=64.40266580858564,
  alpha=19.004943968495343,
  beta=0.2189786380613681,
  flops_per_param_token=7.078943777292577,
)


def test_plausible_fits_have_no_problems(tnl_fit):
  assert tnl_fit.problems() == {}
  assert all(fit.problems() == {} for fit in scaling.paper_fits().values())


def test_mini_study_surface_numbers_are_flagged_with_each_reason():
  problems = scaling.ChinchillaFit(**MINI_STUDY_COSFORMER2_SURFACE).problems()
  assert len(problems) == 3
  assert problems[0].startswith("E = 0 is at its bound 0")
  assert problems[1] == "A = 6.03e+112 exceeds 1e+30"
  assert problems[2] == "α = 19 is outside (0, 2)"
  sane = scaling.ChinchillaFit(**{**MINI_STUDY_COSFORMER2_SURFACE, "E": 1.69, "A": 406.4, "alpha": 0.34})
  assert sane.problems() == []
  assert scaling.ChinchillaFit(**{**sane.to_dict(), "B": float("inf")}).problems() == ["B = inf is not finite"]


def test_mini_study_refit_is_flagged_and_kept_out_of_the_report(tmp_path):
  runs = scaling.load_curves(str(MINI_STUDY_CURVES))
  fits = {arch: scaling.fit_runs(runs[arch], num_bootstrap=0) for arch in ("hgrn2", "cosformer2")}
  surface = fits["cosformer2"].chinchilla
  assert surface.alpha > 2 and surface.A > 1e30 and surface.E < 1e-3  # the same degenerate optimum again
  assert set(fits["cosformer2"].problems()) == {"chinchilla"}
  assert fits["hgrn2"].problems() == {}
  text = scaling.write_report(fits, tmp_path / "report.md", compare_to_paper=False)
  rows = {
    line.split(" |")[0]: line
    for line in text.splitlines()
    if line.startswith("| cosFormer2") or line.startswith("| HGRN2")
  }
  # The surface's numbers stay visible, marked; its allocation is left out. HGRN2's is computed.
  assert rows["| cosFormer2 †"].endswith("| — | — |")
  n_opt, d_opt, _ = fits["hgrn2"].chinchilla.optimal_allocation(100.0)
  assert rows["| HGRN2"].endswith(f"| {n_opt / 1e9:.2f}B | {d_opt / 1e9:.2f}B |")
  section = text.split("## Degenerate fits")[1]
  assert "- cosFormer2 L(N, D): E = 0 is at its bound 0" in section
  # A degenerate optimum: α lands near 19, its digits depending on the CPU's floating-point kernels.
  (alpha,) = re.findall(r"cosFormer2 L\(N, D\):.*α = ([0-9.]+) is outside \(0, 2\)", section)
  assert 10 < float(alpha) < 30
  assert "HGRN2" not in section
  document = scaling.fits_to_json(fits)
  assert document["fits"]["cosformer2"]["degenerate"]["chinchilla"][-1] == f"α = {alpha} is outside (0, 2)"
  assert scaling.fits_from_json(json.loads(json.dumps(document)))["cosformer2"].chinchilla == surface


def test_degenerate_power_law_is_marked_and_predicts_nothing(tnl_fit, tmp_path):
  rising = dataclasses.replace(tnl_fit, loss=scaling.PowerLaw(2.0, 0.05), n_opt=scaling.PowerLaw(float("inf"), 0.7))
  assert rising.problems()["loss"] == ["exponent = 0.05 is outside (-1, 0)"]
  assert rising.problems()["n_opt"] == ["coefficient = inf is not finite"]
  assert "| TNL | 2.0000 C^0.0500 † | (inf) C^0.7000 † |" in scaling.format_table({"tnl": rising})
  d_opt = tnl_fit.d_opt(1.0) / 1e9
  assert f"| 1 | — / {d_opt:.2f}B / — |" in scaling.report.format_allocations({"tnl": rising})
  with pytest.raises(ValueError, match=r"the tnl fit is degenerate and predicts nothing: loss: exponent = 0.05"):
    scaling.predict("tnl", 10.0, fit={"tnl": rising})
  text = scaling.write_report({"tnl": rising}, tmp_path / "report.md", compare_to_paper=False)
  assert "- TNL L(C): exponent = 0.05 is outside (-1, 0)" in text
  assert "- TNL N_opt(C): coefficient = inf is not finite" in text
