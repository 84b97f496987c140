"""SCROLLS/CSR scorers against hand-computed cases and the paper's Table 4 and Table 8 rows."""

import pytest

from lsm_jax.evaluate import scorers


def test_normalize_answer_drops_case_punctuation_articles():
  assert scorers.normalize_answer("The  Cat, an apple!") == "cat apple"


def test_token_f1_hand_computed():
  # "cat sat on mat" vs "cat sat": overlap 2, precision 2/4, recall 2/2 -> F1 = 2/3.
  assert scorers.token_f1("The cat sat on the mat.", ["a cat sat"]) == pytest.approx(2 / 3)
  # The best reference counts.
  assert scorers.token_f1("The cat sat on the mat.", ["dog", "cat sat on mat"]) == pytest.approx(1.0)
  assert scorers.token_f1("dog", ["cat"]) == 0.0


def test_exact_match_hand_computed():
  assert scorers.exact_match("The Cat!", ["cat"]) == 1.0
  assert scorers.exact_match("cats", ["cat", "dog"]) == 0.0
  assert scorers.corpus_exact_match(["Entailment", "no"], [["entailment"], ["yes"]]) == pytest.approx(50.0)


def test_rouge_hand_computed():
  # With stemming killed/kills -> kill: unigrams identical; bigrams share only "the gunman" (1/3);
  # the longest common subsequence is "the gunman" (2 of 4 tokens).
  scores = scorers.rouge("police killed the gunman", ["the gunman kills police"])
  assert scores == pytest.approx({"rouge1": 1.0, "rouge2": 1 / 3, "rougeL": 0.5})
  # Best over references.
  assert scorers.rouge("police killed the gunman", ["the dog", "police killed the gunman"])["rouge2"] == 1.0


def test_corpus_rouge_and_f1_average_examples_as_percent():
  # Second example: "the cat" vs "the dog": R1 = 1/2, R2 = 0, RL = 1/2.
  corpus = scorers.corpus_rouge(["police killed the gunman", "the cat"], [["the gunman kills police"], ["the dog"]])
  assert corpus == pytest.approx({"rouge1": 75.0, "rouge2": 100 / 6, "rougeL": 50.0})
  assert scorers.corpus_f1(["The cat sat on the mat.", "dog"], [["a cat sat"], ["cat"]]) == pytest.approx(100 / 3)


def test_scorers_reject_bad_references():
  with pytest.raises(ValueError, match="references"):
    scorers.token_f1("a", "a")
  with pytest.raises(ValueError, match="one reference list per prediction"):
    scorers.corpus_f1(["a", "b"], [["a"]])


# Table 4 rows: the seven CSR numbers and the printed CSR avg.
TABLE4_CSR = [
  ((46.48, 58.87, 27.82, 48.46, 39.98, 21.42, 25.60), 38.38),  # LLaMA 0.07
  ((60.31, 66.65, 38.98, 51.70, 52.61, 25.17, 30.00), 46.49),  # TNL 0.41
  ((62.69, 76.50, 66.96, 61.40, 69.02, 36.86, 38.00), 58.78),  # HGRN2 7
  ((65.02, 76.33, 63.93, 59.19, 66.96, 36.43, 37.60), 57.92),  # cos2 7
]


@pytest.mark.parametrize("values,paper_average", TABLE4_CSR)
def test_csr_average_matches_table4(values, paper_average):
  scores = dict(zip(scorers.CSR_METRICS, values))
  assert round(scorers.csr_average(scores), 2) == paper_average


def test_csr_average_requires_the_seven_tasks():
  with pytest.raises(ValueError, match="missing \\['winogrande'\\]"):
    scorers.csr_average({task: 50.0 for task in scorers.CSR_METRICS if task != "winogrande"})


def _table8(gov, summ, qmsum, qasper, narrative, quality, contract):
  scores = {
    "summ_screen_fd": dict(zip(scorers.ROUGE_TYPES, summ)),
    "qmsum": dict(zip(scorers.ROUGE_TYPES, qmsum)),
    "qasper": {"f1": qasper},
    "narrative_qa": {"f1": narrative},
    "quality": {"em": quality},
    "contract_nli": {"em": contract},
  }
  if gov is not None:
    scores["gov_report"] = dict(zip(scorers.ROUGE_TYPES, gov))
  return scores


TABLE8 = [
  (_table8((17.4, 7.33, 11.43), (12.92, 1.75, 9.95), (14.59, 3.7, 11.8), 32.35, 22.31, 33.84, 10.03), 14.57),
  # TNL-3B failed GovReport ('−'): the mean of the remaining 10 numbers.
  (_table8(None, (9.65, 1.56, 7.17), (11.37, 2.97, 9.14), 21.20, 17.70, 28.95, 12.92), 12.26),
  (_table8((7.97, 3.51, 6.15), (12.25, 1.95, 9.38), (11.91, 2.7, 9.96), 16.94, 13.93, 27.76, 17.07), 10.88),
]


@pytest.mark.parametrize("scores,paper_average", TABLE8)
def test_scrolls_average_matches_table8(scores, paper_average):
  assert round(scorers.scrolls_average(scores), 2) == paper_average


def test_scrolls_average_rejects_incomplete_task_and_unknown_task():
  with pytest.raises(ValueError, match="lacks metric"):
    scorers.scrolls_average({"qmsum": {"rouge1": 1.0}})
  with pytest.raises(ValueError, match="unknown SCROLLS task"):
    scorers.scrolls_average({"squad": {"f1": 1.0}})
