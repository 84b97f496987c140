"""The local lm-eval task files: preprocessing by hand, and the SCROLLS/CSR/perplexity pipelines through lm-eval
with a scripted LM whose answers make every metric hand-computable."""

import json
import math

import datasets
import pytest
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from lsm_jax.evaluate import lm_eval_cli, scorers
from lsm_jax.evaluate.tasks import lsm_tasks

QUALITY_INPUT = "Who saved the town?\n\n (A) Tom  Smith (B) Ann (C) Bob (D) Eve\n\nOnce upon a time Tom saved the town."
WIKITEXT_PAGE = " = Title = \n The quick @-@ brown fox , jumps ( far ) . \n"


def test_quality_and_contract_nli_documents():
  rows = [{"id": "u1", "pid": "p", "input": QUALITY_INPUT, "output": "Tom Smith"}]
  (doc,) = lsm_tasks.quality_docs(datasets.Dataset.from_list(rows))
  assert doc["question"] == "Who saved the town?"
  assert doc["choices"] == ["Tom Smith", "Ann", "Bob", "Eve"] and doc["gold"] == 0
  assert doc["text"] == "Once upon a time Tom saved the town."
  rows = [{"id": "c1", "pid": "p", "input": "Hypothesis.\n\nContract text.", "output": "Contradiction"}]
  (doc,) = lsm_tasks.contract_nli_docs(datasets.Dataset.from_list(rows))
  assert doc["gold"] == 2 and doc["text"] == "Contract text."


def test_scrolls_duplicate_ids_become_one_document_with_all_references():
  rows = [
    {"id": "a", "pid": "a0", "input": "Q?\n\nT.", "output": "x"},
    {"id": "a", "pid": "a1", "input": "Q?\n\nT.", "output": "y"},
    {"id": "b", "pid": "b0", "input": "R?\n\nU.", "output": "z"},
  ]
  docs = list(lsm_tasks.scrolls_query_docs(datasets.Dataset.from_list(rows)))
  assert [(doc["id"], doc["outputs"], doc["question"]) for doc in docs] == [("a", ["x", "y"], "Q?"), ("b", ["z"], "R?")]


def test_winogrande_partial_scoring_pieces():
  doc = {
    "sentence": "The trophy did not fit because the _ was too big.",
    "option1": "trophy",
    "option2": "case",
    "answer": "2",
  }
  assert lsm_tasks.winogrande_contexts(doc) == [
    "The trophy did not fit because the trophy",
    "The trophy did not fit because the case",
  ]
  assert lsm_tasks.winogrande_continuation(doc) == "was too big."
  assert lsm_tasks.winogrande_gold(doc) == 1


def test_wikitext_detokenizer_and_hellaswag_cleaning():
  assert lsm_tasks.wikitext_detokenize({"page": WIKITEXT_PAGE}) == " = Title =\nThe quick-brown fox, jumps (far).\n"
  (doc,) = lsm_tasks.hellaswag_process_docs(
    datasets.Dataset.from_list(
      [
        {
          "activity_label": "Cooking",
          "ctx_a": "A man cuts onions.",
          "ctx_b": "he",
          "label": "1",
          "endings": ["sings [title] loudly.", "puts them  in a pan."],
        }
      ]
    )
  )
  assert doc["query"] == "Cooking: A man cuts onions. He"
  assert doc["choices"] == ["sings. loudly.", "puts them in a pan."] and doc["gold"] == 1


def test_missing_data_names_the_expected_file(tmp_path, monkeypatch):
  monkeypatch.delenv(lsm_tasks.DATA_ENV_VAR, raising=False)
  with pytest.raises(ValueError, match="LSM_JAX_EVAL_DATA"):
    lsm_tasks.piqa_dataset()
  with pytest.raises(FileNotFoundError, match="piqa/validation.jsonl"):
    lsm_tasks.piqa_dataset(data_dir=str(tmp_path))


class ScriptedLM(LM):
  """Answers by rules on the prompt text, so each task's metric is known in advance."""

  ANSWERS = {
    "budgets": "The budget grew.",
    "Alice": "Alice met Bob",
    "transcript": "They decided to ship.",
    "SQuAD": "",
    "Tom saved": "Tom Smith",
  }

  def loglikelihood(self, requests):
    # Prefers continuations containing a "right" word, then shorter ones; per-character scores are what
    # SCROLLS' length-normalised EM compares.
    preferred = ("Tom", "Entailment", "yes", "Twist", "4", "star", "puts", "trophy", " mat")
    return [
      (-1.0 * len(cont) if any(word in cont for word in preferred) else -5.0 * len(cont), False)
      for _, cont in (request.args for request in requests)
    ]

  def loglikelihood_rolling(self, requests):
    return [-10.0 for _ in requests]

  def generate_until(self, requests):
    return [next(answer for key, answer in self.ANSWERS.items() if key in request.args[0]) for request in requests]


def _write(root, name, split, rows):
  (root / name).mkdir()
  (root / name / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_data")
  _write(
    root,
    "gov_report",
    "validation",
    [{"id": "g", "pid": "g0", "input": "Text about budgets.", "output": "The budget grew."}],
  )
  _write(
    root,
    "summ_screen_fd",
    "validation",
    [{"id": "s", "pid": "s0", "input": "Alice meets Bob.", "output": "Alice meets Bob."}],
  )
  _write(
    root,
    "qmsum",
    "validation",
    [{"id": "q", "pid": "q0", "input": "Decision?\n\nThe transcript.", "output": "They decided to ship."}],
  )
  _write(
    root, "qasper", "validation", [{"id": "a", "pid": "a0", "input": "Which?\n\nWe use SQuAD.", "output": "SQuAD"}]
  )
  _write(
    root, "narrative_qa", "validation", [{"id": "n", "pid": "n0", "input": "Who?\n\nTom saved it.", "output": "Tom"}]
  )
  _write(root, "quality", "validation", [{"id": "u", "pid": "u0", "input": QUALITY_INPUT, "output": "Tom Smith"}])
  _write(root, "contract_nli", "validation", [{"id": "c", "pid": "c0", "input": "H.\n\nC.", "output": "Contradiction"}])
  _write(
    root,
    "boolq",
    "validation",
    [{"question": "is it", "passage": "P.", "label": 1}, {"question": "is it not", "passage": "P.", "label": 0}],
  )
  _write(root, "piqa", "validation", [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat it.", "label": 0}])
  _write(
    root,
    "hellaswag",
    "validation",
    [
      {
        "activity_label": "Cooking",
        "ctx_a": "A man cuts onions.",
        "ctx_b": "he",
        "endings": ["puts them in a pan.", "flies.", "sings.", "x"],
        "label": "1",
      }
    ],
  )
  _write(
    root,
    "winogrande",
    "validation",
    [{"sentence": "The trophy did not fit as the _ was big.", "option1": "trophy", "option2": "case", "answer": "1"}],
  )
  arc = [{"question": "2+2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"}]
  _write(root, "arc_easy", "test", arc)
  _write(root, "arc_challenge", "test", arc)
  _write(
    root,
    "openbookqa",
    "test",
    [{"question_stem": "The sun is a", "answerKey": "A", "choices": {"text": ["star", "moon"], "label": ["A", "B"]}}],
  )
  _write(root, "lambada", "test", [{"text": "The cat sat on the mat"}])
  _write(root, "wikitext", "test", [{"page": WIKITEXT_PAGE}])
  tasks = ["lsm_scrolls", "lsm_csr", "lsm_lambada", "lsm_wikitext"]
  manager = TaskManager(include_path=lm_eval_cli.TASKS_DIR, include_defaults=False, metadata={"data_dir": str(root)})
  return simple_evaluate(model=ScriptedLM(), tasks=tasks, task_manager=manager, bootstrap_iters=0)["results"]


def test_scrolls_metrics_through_lm_eval(results):
  def value(task, metric):
    return results[f"lsm_scrolls_{task}"][f"{metric},none"]

  assert [value("gov_report", kind) for kind in scorers.ROUGE_TYPES] == pytest.approx([100.0] * 3)
  # "Alice met Bob" vs "Alice meets Bob." (stemmed: meet): R1 = RL = 2/3, no shared bigram.
  assert [value("summ_screen_fd", kind) for kind in scorers.ROUGE_TYPES] == pytest.approx([200 / 3, 0.0, 200 / 3])
  assert value("qasper", "f1") == 0.0  # empty answer -> "Unanswerable"
  assert value("narrative_qa", "f1") == pytest.approx(200 / 3)  # "Tom Smith" vs "Tom"
  assert value("quality", "em") == 100.0 and value("contract_nli", "em") == 0.0
  scores = {
    task: {metric: value(task, metric) for metric in metrics} for task, metrics in scorers.SCROLLS_METRICS.items()
  }
  assert scorers.scrolls_average(scores) == pytest.approx((3 * 100 + 3 * 100 + 400 / 3 + 200 / 3 + 100) / 13)


def test_csr_and_perplexity_tasks_through_lm_eval(results):
  # The scripted preferences pick: boolq "yes" (1 of 2 right), piqa sol1 (right), hellaswag "puts" (gold is 1:
  # wrong), winogrande "trophy" context (right), arc "4" (right), openbookqa "star" (right).
  accuracy = {task: results[f"lsm_{task}"][f"{metric},none"] for task, metric in scorers.CSR_METRICS.items()}
  assert accuracy == {
    "boolq": 0.5,
    "piqa": 1.0,
    "hellaswag": 0.0,
    "winogrande": 1.0,
    "arc_easy": 1.0,
    "arc_challenge": 1.0,
    "openbookqa": 1.0,
  }
  # LAMBADA: the target " mat" is preferred, scored -1 per character: perplexity exp(4).
  assert results["lsm_lambada"]["perplexity,none"] == pytest.approx(math.exp(4.0))
  # WikiText word perplexity: exp(10 / 16): the raw page splits on whitespace into its 14 tokens plus the empty
  # pieces before the leading and after the trailing whitespace (lm-eval's word count).
  assert results["lsm_wikitext"]["word_perplexity,none"] == pytest.approx(math.exp(10.0 / 16))
