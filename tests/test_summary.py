"""Table 7 reproduced: parameter counts of the built models and PFLOPs/step, for all 24 configurations."""
import json

import pytest

from lsm_jax import summary
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
PAPER = {(arch, size): (float(params), float(pflops))
         for arch, size, params, pflops in (entry.split() for entry in TABLE_7.replace("\n", "|").split("|")
                                            if entry.strip())}


@pytest.fixture(scope="module")
def rows():
  return summary.summary_rows()


def test_all_24_configurations_listed(rows):
  assert len(PAPER) == 24
  assert [(row["arch"], row["size"]) for row in rows] == [(a, s) for a in configs.ARCHS for s in configs.SIZES]


def test_non_embedding_params_match_table_7(rows):
  for row in rows:
    paper_params = PAPER[(row["arch"], row["size"])][0] * 1e6
    tolerance = max(0.01 * paper_params, 0.3e6)
    assert abs(row["non_embedding_params"] - paper_params) <= tolerance, row
    assert row["paper_non_embedding_params"] == round(paper_params)


def test_pflops_per_step_match_table_7(rows):
  for row in rows:
    paper_pflops = PAPER[(row["arch"], row["size"])][1]
    # Table 7 prints one decimal: within 1% or half a printed unit.
    assert abs(row["pflops_per_step"] - paper_pflops) <= max(0.01 * paper_pflops, 0.05), row


def test_param_count_of_a_tiny_model_by_hand():
  config = configs.get_config("tnl", "70m", num_layers=2, d_model=64, num_heads=2, head_dim=32, ffn_dim=96,
                              vocab_size=512)
  per_layer = 3 * 64 * 64 + 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96  # qkv, out, low-rank gate, SGLU
  assert summary.count_non_embedding_params(config) == 2 * per_layer


def test_cli_json_and_table(capsys):
  summary.main(["--format=json"])
  rows = json.loads(capsys.readouterr().out)
  assert len(rows) == 24 and {"arch", "size", "non_embedding_params", "pflops_per_step"} <= set(rows[0])
  summary.main([])
  table = capsys.readouterr().out
  assert "cosformer2 7b" in table and "PFLOPs/step" in table
  with pytest.raises(SystemExit):
    summary.main(["--format=csv"])
