"""NIAH: grid, prompts, hand-computed scores (weighted average, consistency penalty), runner and heatmap."""

import numpy as np
import pytest

from lsm_jax.data import tokenizer as tokenizer_lib
from lsm_jax.evaluate import niah


def test_default_grid_is_the_papers():
  lengths = niah.default_context_lengths()
  depths = niah.default_depth_percents()
  assert len(lengths) == len(depths) == 35
  assert lengths[:3] == [1000, 1441, 1882] and lengths[-1] == 16000
  assert depths[0] == 0.0 and depths[1] == pytest.approx(100 / 34) and depths[-1] == 100.0


def test_consistency_penalty_hand_computed():
  assert niah.consistency_penalty([True, True, True]) == 1.0
  assert niah.consistency_penalty([False, False]) == 0.0
  assert niah.consistency_penalty([True, False, True]) == pytest.approx(0.5)  # n = 3
  assert niah.consistency_penalty([True, True, False, False]) == pytest.approx(2**-0.5)  # n = 2
  assert niah.longest_success_run([True, False, True, True, False]) == 2


def test_geometric_weights_sum_to_one_and_grow():
  weights = niah.geometric_weights(3, 2.0)
  np.testing.assert_allclose(weights, [1 / 7, 2 / 7, 4 / 7])


def test_weighted_average_hand_computed():
  lengths = [1000, 2000]
  # alpha = 2 on both axes: weights [1/3, 2/3] x [1/3, 2/3].
  assert niah.weighted_average_accuracy([[1, 0], [0, 0]], lengths, 2.0, 2.0) == pytest.approx(100 / 9)
  assert niah.weighted_average_accuracy([[0, 0], [0, 1]], lengths, 2.0, 2.0) == pytest.approx(400 / 9)
  grid = np.random.default_rng(0).random((5, 2)) > 0.5
  assert niah.weighted_average_accuracy(grid, lengths, 1.0, 1.0) == pytest.approx(100 * grid.mean())


def test_niah_score_hand_computed():
  # Column 0 all successes: p = 1, run 4/4. Column 1 [1,0,1,1]: n = 3 -> p = 1/2, run 2/4.
  grid = np.array([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=bool)
  assert niah.niah_score(grid, [1000, 2000], alpha_length=1.0) == pytest.approx(100 * (0.5 * 1 + 0.5 * 0.25))


def test_accuracy_at_and_up_to():
  lengths = [1000, 2000, 4000, 8000]
  grid = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=bool)
  assert niah.accuracy_at(grid, lengths, 2100) == 50.0  # nearest grid length 2000
  assert niah.accuracy_up_to(grid, lengths, 4000) == pytest.approx(100 * 4 / 6)
  with pytest.raises(ValueError, match="no grid length"):
    niah.accuracy_up_to(grid, lengths, 500)


def test_cell_score_counts_answer_words():
  # Key words (articles dropped): eat sandwich and sit in dolores park on sunny day; 5 of 10 present.
  assert niah.cell_score("eat a sandwich in Dolores Park", niah.DEFAULT_ANSWER_KEY) == pytest.approx(5.5)
  assert niah.cell_score(niah.DEFAULT_ANSWER, niah.DEFAULT_ANSWER_KEY) == 10.0


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="mode"):
    niah.NIAHConfig(mode="hard")
  with pytest.raises(ValueError, match="ascending"):
    niah.NIAHConfig(context_lengths=(2000, 1000))


HAYSTACK = "Grass grows in spring. The river runs to the sea. Birds sing at dawn. " * 3


@pytest.mark.parametrize("mode", niah.MODES)
def test_build_prompt_length_and_needle_placement(mode):
  tokenizer = tokenizer_lib.get_tokenizer("bytes")
  config = niah.NIAHConfig(mode=mode)
  prompt = tokenizer.decode(niah.build_prompt(tokenizer, tokenizer.encode(HAYSTACK), 600, 50.0, config))
  assert len(prompt.encode()) == 600
  assert prompt.endswith(config.prompt_suffix)
  assert prompt.count(config.question) == (2 if mode == "easy" else 1)
  # The needle starts after a full stop, at or before the requested depth of the filler.
  start = prompt.index(config.needle)
  filler = 600 - len(config.needle) - len(config.prompt_suffix)
  assert prompt[start - 1] == "." and start <= filler // 2
  assert niah.build_prompt(tokenizer, tokenizer.encode(HAYSTACK), 600, 100.0, config)[
    -len(tokenizer.encode(config.needle + config.prompt_suffix)) :
  ] == tokenizer.encode(config.needle + config.prompt_suffix)


def test_run_niah_with_a_length_limited_oracle_and_heatmap(tmp_path):
  tokenizer = tokenizer_lib.get_tokenizer("bytes")
  config = niah.NIAHConfig(context_lengths=(400, 700, 1000), depth_percents=(0.0, 50.0, 100.0))

  def generate(prompts, max_new_tokens):
    # Retrieves perfectly up to 800 tokens, answers nonsense beyond.
    return [niah.DEFAULT_ANSWER if len(p) <= 800 else "I do not know" for p in prompts]

  result = niah.run_niah(generate, tokenizer, HAYSTACK, config, batch_size=4)
  np.testing.assert_array_equal(result.success, [[True, True, False]] * 3)
  summary = result.summary()
  assert summary["avg"] == pytest.approx(200 / 3)
  assert summary["niah_score"] == pytest.approx(100 * niah.geometric_weights(3, niah.DEFAULT_ALPHA)[:2].sum())
  paths = result.save(str(tmp_path))
  with open(paths["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_summary_on_the_default_grid():
  # A model that retrieves at the first 20 lengths (1000..9382 tokens) and never beyond.
  grid = np.zeros((35, 35), dtype=bool)
  grid[:, :20] = True
  summary = niah.summarize(grid, niah.NIAHConfig())
  assert summary["acc@8k"] == summary["acc<=8k"] == 100.0 and summary["acc@16k"] == 0.0
  assert summary["avg"] == pytest.approx(100 * 20 / 35)
  # Length weights 1.01^j / sum: the first 20 columns carry (1.01^20 - 1) / (1.01^35 - 1) of the weight; every
  # successful column is consistent (p = 1, full run), so the NIAH score equals the weighted average here.
  expected = 100 * (1.01**20 - 1) / (1.01**35 - 1)
  assert summary["weighted_avg"] == pytest.approx(expected) and summary["niah_score"] == pytest.approx(expected)
