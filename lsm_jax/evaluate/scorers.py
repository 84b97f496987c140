"""Metrics of the paper's evaluation (arXiv 2406.16690 §3.4): SCROLLS ROUGE/F1/EM and the table means.

Conventions follow the SCROLLS evaluator that lm-evaluation-harness wraps:
- F1 and EM use SQuAD answer normalisation (lower case, drop punctuation and the articles a/an/the, squeeze
  whitespace); an example scores the best match over its references; results are percentages.
- ROUGE-1/2/L are `rouge_score` F-measures with the Porter stemmer, best over references, averaged over
  examples, as percentages.
- QuALITY and ContractNLI "EM" are scored as lm-eval does: 100 × whether the choice with the highest
  length-normalised log-likelihood is the gold one (see `lsm_jax/evaluate/tasks/scrolls_utils.py`).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

# The seven commonsense tasks of Table 4, with the metric the paper reports for each.
CSR_METRICS = {
  "boolq": "acc",
  "piqa": "acc",
  "hellaswag": "acc_norm",
  "winogrande": "acc",
  "arc_easy": "acc",
  "arc_challenge": "acc_norm",
  "openbookqa": "acc_norm",
}

# The seven SCROLLS tasks of Table 8 and their metrics: 3 × 3 ROUGE + 4 = 13 numbers.
SCROLLS_METRICS = {
  "gov_report": ("rouge1", "rouge2", "rougeL"),
  "summ_screen_fd": ("rouge1", "rouge2", "rougeL"),
  "qmsum": ("rouge1", "rouge2", "rougeL"),
  "qasper": ("f1",),
  "narrative_qa": ("f1",),
  "quality": ("em",),
  "contract_nli": ("em",),
}
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def _check_references(references: Sequence[str]) -> None:
  if isinstance(references, str) or not references:
    raise ValueError(f"references must be a non-empty list of strings, got {references!r}")


def token_f1(prediction: str, references: Sequence[str]) -> float:
  """Best token-level F1 (0..1) of `prediction` against any of `references`, after normalisation."""
  _check_references(references)

  def f1(reference: str) -> float:
    predicted_tokens = normalize_answer(prediction).split()
    reference_tokens = normalize_answer(reference).split()
    common = collections.Counter(predicted_tokens) & collections.Counter(reference_tokens)
    overlap = sum(common.values())
    if not predicted_tokens or not reference_tokens:
      # Both empty counts as a match (SQuAD convention); one empty is a miss.
      return float(predicted_tokens == reference_tokens)
    if overlap == 0:
      return 0.0
    precision = overlap / len(predicted_tokens)
    recall = overlap / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)

  return max(f1(reference) for reference in references)


def exact_match(prediction: str, references: Sequence[str]) -> float:
  """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
  _check_references(references)
  normalized = normalize_answer(prediction)
  return float(any(normalized == normalize_answer(reference) for reference in references))


def _rouge_scorer():
  from rouge_score import rouge_scorer  # the `eval` extra; imported lazily so NIAH/means need no extra

  return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(prediction: str, references: Sequence[str], scorer=None) -> dict[str, float]:
  """ROUGE-1/2/L F-measures (0..1), each the best over `references`."""
  _check_references(references)
  scorer = scorer or _rouge_scorer()
  per_reference = [scorer.score(reference, prediction) for reference in references]
  return {kind: max(scores[kind].fmeasure for scores in per_reference) for kind in ROUGE_TYPES}


def corpus_rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
  """Mean over examples of `rouge`, as percentages."""
  _check_pairs(predictions, references)
  scorer = _rouge_scorer()
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for prediction, refs in zip(predictions, references):
    for kind, value in rouge(prediction, refs, scorer).items():
      totals[kind] += value
  return {kind: 100.0 * total / len(predictions) for kind, total in totals.items()}


def corpus_f1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Mean token F1 over examples, as a percentage."""
  _check_pairs(predictions, references)
  return 100.0 * sum(token_f1(p, r) for p, r in zip(predictions, references)) / len(predictions)


def corpus_exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Mean exact match over examples, as a percentage."""
  _check_pairs(predictions, references)
  return 100.0 * sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(predictions)


def _check_pairs(predictions, references) -> None:
  if len(predictions) != len(references) or not predictions:
    raise ValueError(
      f"need one reference list per prediction and at least one example, got "
      f"{len(predictions)} predictions and {len(references)} reference lists"
    )


def csr_average(scores: Mapping[str, float]) -> float:
  """Plain mean of the seven CSR numbers (the paper's "CSR avg"); `scores` maps each task of CSR_METRICS."""
  missing = sorted(set(CSR_METRICS) - set(scores))
  unknown = sorted(set(scores) - set(CSR_METRICS))
  if missing or unknown:
    raise ValueError(f"CSR average needs exactly the tasks {sorted(CSR_METRICS)}; missing {missing}, unknown {unknown}")
  return sum(float(scores[task]) for task in CSR_METRICS) / len(CSR_METRICS)


def scrolls_average(scores: Mapping[str, Mapping[str, float] | None]) -> float:
  """Plain mean of the SCROLLS numbers that exist: up to 13 (3 ROUGE × 3 summarisation tasks + 4).

  `scores` maps task -> {metric: value}; a task absent or None (failed, '−' in Table 8) is left out, as the
  paper does. A present task must carry every one of its metrics.
  """
  unknown = sorted(set(scores) - set(SCROLLS_METRICS))
  if unknown:
    raise ValueError(f"unknown SCROLLS task(s) {unknown}; valid: {sorted(SCROLLS_METRICS)}")
  values = []
  for task, metrics in SCROLLS_METRICS.items():
    task_scores = scores.get(task)
    if task_scores is None:
      continue
    missing = [metric for metric in metrics if metric not in task_scores]
    if missing:
      raise ValueError(f"SCROLLS task {task!r} lacks metric(s) {missing}; it needs {list(metrics)}")
    values.extend(float(task_scores[metric]) for metric in metrics)
  if not values:
    raise ValueError("SCROLLS average needs at least one task's scores")
  return sum(values) / len(values)
