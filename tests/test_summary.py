"""Table 7 reproduced (parameter counts of the built models and PFLOPs/step for the 24 main runs) and every
ablation experiment file listed with its coordinates."""

import json

import pytest

from lsm_jax import flops, summary
from lsm_jax.models import configs

# Paper Table 7, typed in: (non-embedding params, millions; PFLOPs per step at 480 × 8192).
TABLE_7 = """
llama 70m 20.5 1.6 | llama 160m 85.0 5.6 | llama 410m 334.1 18.0 | llama 1b 906.2 40.4 | llama 3b 2775.8 99.6
llama 7b 6476.5 202.7 | tnl 70m 21.2 0.5 | tnl 160m 87.3 2.2 | tnl 410m 327.7 7.9 | tnl 1b 918.6 22.3
tnl 3b 2798.4 66.6 | tnl 7b 6509.6 154.4 | hgrn2 70m 20.5 0.5 | hgrn2 160m 84.9 2.1 | hgrn2 410m 334.0 8.0
hgrn2 1b 906.0 22.0 | hgrn2 3b 2775.5 66.0 | hgrn2 7b 6476.1 153.6 | cosformer2 70m 21.3 0.5
cosformer2 160m 87.5 2.3 | cosformer2 410m 328.0 8.1 | cosformer2 1b 919.1 22.7 | cosformer2 3b 2799.0 67.4
cosformer2 7b 6511.0 155.6
"""
PAPER = {
  (arch, size): (float(params), float(pflops))
  for arch, size, params, pflops in (entry.split() for entry in TABLE_7.replace("\n", "|").split("|") if entry.strip())
}


@pytest.fixture(scope="module")
def rows():
  return summary.summary_rows()


def main_rows(rows):
  """The paper's 24 runs (the hybrid families' experiment files follow them in the main group)."""
  return [row for row in rows if row["ablation"] is None and row["arch"] in configs.ARCHS]


def test_all_24_configurations_listed_first(rows):
  assert len(PAPER) == 24
  assert [(row["arch"], row["size"]) for row in rows[:24]] == [(a, s) for a in configs.ARCHS for s in configs.SIZES]
  assert main_rows(rows) == rows[:24]
  hybrids = [(a, s) for a in configs.HYBRID_ARCHS for s in configs.SIZES]
  assert [(row["arch"], row["size"]) for row in rows[24:36]] == hybrids
  assert {row["ablation"] for row in rows[24:36]} == {None}
  assert [row["file"] for row in rows[:2]] == ["gin/llama_70m.gin", "gin/llama_160m.gin"]
  assert {(row["seq_len"], row["global_batch_size"]) for row in rows[:24]} == {(8192, 480)}


def test_non_embedding_params_match_table_7(rows):
  for row in main_rows(rows):
    paper_params = PAPER[(row["arch"], row["size"])][0] * 1e6
    tolerance = max(0.01 * paper_params, 0.3e6)
    assert abs(row["non_embedding_params"] - paper_params) <= tolerance, row
    assert row["paper_non_embedding_params"] == round(paper_params)


def test_pflops_per_step_match_table_7(rows):
  for row in main_rows(rows):
    paper_pflops = PAPER[(row["arch"], row["size"])][1]
    # Table 7 prints one decimal: within 1% or half a printed unit.
    assert abs(row["pflops_per_step"] - paper_pflops) <= max(0.01 * paper_pflops, 0.05), row


def test_hybrid_rows_count_the_built_model_and_mix_the_pure_rows(rows):
  by_name = {row["run_name"]: row for row in rows}
  for family, linear in (("hgrn2_hybrid", "hgrn2"), ("tnl_hybrid", "tnl")):
    for size in configs.SIZES:
      row, pure = by_name[f"{family}_{size}"], by_name[f"{linear}_{size}"]
      assert row["layer_pattern"] == f"{linear}*3,llama,{linear}*4" and pure["layer_pattern"] == ""
      assert (row["num_layers"], row["d_model"], row["ffn_dim"]) == (
        pure["num_layers"],
        pure["d_model"],
        pure["ffn_dim"],
      )
      expected = flops.non_embedding_params(
        family,
        row["num_layers"],
        row["d_model"],
        row["num_heads"],
        ffn_dim=row["ffn_dim"],
        layer_pattern=row["layer_pattern"],
      )
      assert row["non_embedding_params"] == expected
      # Softmax layers cost more per token than linear ones at 8K: between the pure linear and LLaMA rows.
      assert pure["pflops_per_step"] < row["pflops_per_step"] < by_name[f"llama_{size}"]["pflops_per_step"]


def test_ablation_runs_listed_with_coordinates(rows):
  aspect = [row for row in rows if row["ablation"] == "aspect"]
  context = [row for row in rows if row["ablation"] == "context"]
  assert len(aspect) == 16 and len(context) == 13 and len(rows) == 24 + 12 + 16 + 13
  for row in aspect:
    assert row["run_name"] == f"{row['arch']}_{row['d_model']}x{row['num_layers']}"
    assert row["file"] == f"gin/ablations/aspect/{row['run_name']}.gin"
    assert row["paper_non_embedding_params"] is None and row["seq_len"] * row["global_batch_size"] == 480 * 8192
  # Within one architecture the four aspect ratios keep the non-embedding parameters within 10% of each other.
  for arch in configs.ARCHS:
    params = [row["non_embedding_params"] for row in aspect if row["arch"] == arch]
    assert len(params) == 4 and max(params) <= 1.1 * min(params), (arch, params)
  # Context runs: one shape, the paper's global batches; PFLOPs/step are the Table-1 expression at that context.
  assert {(row["d_model"], row["num_layers"]) for row in context} == {(1536, 32)}
  assert {(row["seq_len"], row["global_batch_size"]) for row in context} == {
    (2048, 1920),
    (4096, 960),
    (8192, 480),
    (16384, 240),
  }
  by_name = {row["run_name"]: row for row in rows}
  assert by_name["tnl_2k"]["pflops_per_step"] == pytest.approx(by_name["tnl_1b"]["pflops_per_step"])  # linear in n
  assert by_name["llama_16k"]["pflops_per_step"] > 1.4 * by_name["llama_1b"]["pflops_per_step"]  # the n² term
  assert by_name["tnl_16k"]["non_embedding_params"] == by_name["tnl_1b"]["non_embedding_params"]


def test_param_count_of_a_tiny_model_by_hand():
  config = configs.get_config(
    "tnl", "70m", num_layers=2, d_model=64, num_heads=2, head_dim=32, ffn_dim=96, vocab_size=512
  )
  per_layer = 3 * 64 * 64 + 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96  # qkv, out, low-rank gate, SGLU
  assert summary.count_non_embedding_params(config) == 2 * per_layer


def test_cli_json_and_table(capsys):
  summary.main(["--format=json"])
  rows = json.loads(capsys.readouterr().out)
  assert len(rows) == 24 + 12 + 16 + 13
  assert {
    "file",
    "run_name",
    "ablation",
    "arch",
    "layer_pattern",
    "d_model",
    "num_layers",
    "seq_len",
    "global_batch_size",
    "non_embedding_params",
    "pflops_per_step",
  } <= set(rows[0])
  summary.main([])
  table = capsys.readouterr().out
  assert "cosformer2_7b" in table and "PFLOPs/step" in table
  assert any(line.split()[:2] == ["llama_3072x8", "aspect"] for line in table.splitlines())
  with pytest.raises(SystemExit):
    summary.main(["--format=csv"])
