"""Local-data versions of the paper's lm-eval tasks: loaders, preprocessing and SCROLLS metrics.

The YAML files beside this module reference these functions with `!function lsm_tasks.<name>`. Every task
reads JSON lines from  $LSM_JAX_EVAL_DATA/<dataset>/<split>.jsonl  (or from the `data_dir` given with
lm_eval's `--metadata '{"data_dir": "..."}'`), one record per line with the fields of the Hugging Face dataset
that lm-eval's stock task uses, so `datasets.load_dataset(...)[split].to_json(path)` on a machine with hub
access produces them:

  dataset         split        fields                                           hub source
  boolq           validation   question, passage, label (1 = yes)               super_glue/boolq
  piqa            validation   goal, sol1, sol2, label                          piqa
  hellaswag       validation   activity_label, ctx_a, ctx_b, endings, label     hellaswag
  winogrande      validation   sentence (with "_"), option1, option2, answer    winogrande/winogrande_xl
  arc_easy        test         question, choices{text,label}, answerKey         allenai/ai2_arc ARC-Easy
  arc_challenge   test         question, choices{text,label}, answerKey         allenai/ai2_arc ARC-Challenge
  openbookqa      test         question_stem, choices{text,label}, answerKey    openbookqa/main
  lambada         test         text                                             EleutherAI/lambada_openai
  wikitext        test         page (one whole article)                         EleutherAI/wikitext_document_level
  gov_report, summ_screen_fd, qmsum, qasper, narrative_qa, quality, contract_nli
                  validation   id, pid, input, output (SCROLLS' own jsonl)      tau/scrolls <name>.zip

Differences from lm-eval's stock SCROLLS tasks: Qasper's yes/no questions are answered by greedy generation
like every other Qasper question (the paper decodes greedily throughout), and metrics come from
lsm_jax.evaluate.scorers instead of the hub-downloaded SCROLLS metric script.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from lsm_jax.evaluate import scorers

DATA_ENV_VAR = "LSM_JAX_EVAL_DATA"
CONTRACT_NLI_CHOICES = ("Not mentioned", "Entailment", "Contradiction")


def _data_dir(options: dict) -> str:
  data_dir = options.get("data_dir") or os.environ.get(DATA_ENV_VAR)
  if not data_dir:
    raise ValueError(
      f"local lm-eval tasks need their data: set ${DATA_ENV_VAR} (or --metadata "
      f"'{{\"data_dir\": DIR}}') to a directory holding <dataset>/<split>.jsonl files"
    )
  return data_dir


def _read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _dataset_loader(name: str, split: str):
  def load(**options):
    import datasets

    path = os.path.join(_data_dir(options), name, f"{split}.jsonl")
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"{path} not found: task data for {name!r} goes in <data_dir>/{name}/{split}.jsonl "
        f"(see lsm_jax/evaluate/tasks/lsm_tasks.py for the fields)"
      )
    return datasets.DatasetDict({split: datasets.Dataset.from_list(_read_jsonl(path))})

  load.__name__ = f"{name}_dataset"
  return load


boolq_dataset = _dataset_loader("boolq", "validation")
piqa_dataset = _dataset_loader("piqa", "validation")
hellaswag_dataset = _dataset_loader("hellaswag", "validation")
winogrande_dataset = _dataset_loader("winogrande", "validation")
arc_easy_dataset = _dataset_loader("arc_easy", "test")
arc_challenge_dataset = _dataset_loader("arc_challenge", "test")
openbookqa_dataset = _dataset_loader("openbookqa", "test")
lambada_dataset = _dataset_loader("lambada", "test")
wikitext_dataset = _dataset_loader("wikitext", "test")
gov_report_dataset = _dataset_loader("gov_report", "validation")
summ_screen_fd_dataset = _dataset_loader("summ_screen_fd", "validation")
qmsum_dataset = _dataset_loader("qmsum", "validation")
qasper_dataset = _dataset_loader("qasper", "validation")
narrative_qa_dataset = _dataset_loader("narrative_qa", "validation")
quality_dataset = _dataset_loader("quality", "validation")
contract_nli_dataset = _dataset_loader("contract_nli", "validation")


# --------------------------------------------------------------------------------------------- HellaSwag


def _clean_hellaswag(text: str) -> str:
  # WikiHow contexts carry "[title]"-style markup; it is removed before scoring.
  text = text.strip().replace(" [title]", ". ")
  return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_process_docs(dataset):
  def process(doc):
    context = f"{doc['ctx_a']} {doc['ctx_b'].capitalize()}"
    return {
      "query": _clean_hellaswag(f"{doc['activity_label']}: {context}"),
      "choices": [_clean_hellaswag(ending) for ending in doc["endings"]],
      "gold": int(doc["label"]),
    }

  return dataset.map(process)


# -------------------------------------------------------------------------------------------- WinoGrande
# Partial scoring: the options fill the blank in the *context*, and the shared rest of the sentence is the
# continuation scored under each context (lm-eval's multiple-input form: doc_to_text returns the gold index).


def winogrande_gold(doc) -> int:
  return {"1": 0, "2": 1}[str(doc["answer"])]


def winogrande_contexts(doc) -> list[str]:
  blank = doc["sentence"].index("_")
  return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def winogrande_continuation(doc) -> str:
  return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


# ---------------------------------------------------------------------------------------------- WikiText
# Raw WikiText is tokenized with spaces around punctuation and @-@ style joiners; the perplexity is measured
# on detokenized text, with words counted on the original page.
_WIKITEXT_REPLACEMENTS = (
  ("s '", "s'"),
  (" @-@ ", "-"),
  (" @,@ ", ","),
  (" @.@ ", "."),
  (" : ", ": "),
  (" ; ", "; "),
  (" . ", ". "),
  (" ! ", "! "),
  (" ? ", "? "),
  (" , ", ", "),
  ("= = = =", "===="),
  ("= = =", "==="),
  ("= =", "=="),
  (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
  (" \n", "\n"),
  ("\n ", "\n"),
  (" N ", " 1 "),
  (" 's", "'s"),
)
_WIKITEXT_BRACKETS = (
  r"\(\s*([^\)]*?)\s*\)",
  r"\[\s*([^\]]*?)\s*\]",
  r"{\s*([^}]*?)\s*}",
  r"\"\s*([^\"]*?)\s*\"",
  r"'\s*([^']*?)\s*'",
)
_WIKITEXT_BRACKET_FORMS = ("(\\1)", "[\\1]", "{\\1}", '"\\1"', "'\\1'")


def wikitext_detokenize(doc) -> str:
  text = doc["page"]
  text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
  for pattern, form in zip(_WIKITEXT_BRACKETS, _WIKITEXT_BRACKET_FORMS):
    text = re.sub(pattern, form, text)
  for old, new in _WIKITEXT_REPLACEMENTS:
    text = text.replace(old, new)
  return text


def wikitext_results(doc, results):
  (log_likelihood,) = results
  num_words = len(re.split(r"\s+", doc["page"]))
  num_bytes = len(doc["page"].encode("utf-8"))
  return {
    "word_perplexity": (log_likelihood, num_words),
    "byte_perplexity": (log_likelihood, num_bytes),
    "bits_per_byte": (log_likelihood, num_bytes),
  }


# ----------------------------------------------------------------------------------------------- SCROLLS


def _merge_duplicate_ids(dataset):
  """SCROLLS lists one row per reference answer; merge them into one doc with an `outputs` list."""
  import datasets

  merged: dict[str, dict] = {}
  for row in dataset:
    doc = merged.setdefault(row["id"], {key: value for key, value in row.items() if key != "output"} | {"outputs": []})
    doc["outputs"].append(row["output"])
  return datasets.Dataset.from_list(list(merged.values()))


def _split_query(doc) -> dict:
  # Query tasks prepend the question to the document, separated by the first blank line.
  split = doc["input"].find("\n\n")
  return {"question": doc["input"][:split], "text": doc["input"][split + 2 :]}


def scrolls_summary_docs(dataset):
  return _merge_duplicate_ids(dataset)


def scrolls_query_docs(dataset):
  return _merge_duplicate_ids(dataset).map(_split_query)


def _normalize_spaces(text: str) -> str:
  return " ".join(text.split())


def quality_docs(dataset):
  def process(doc):
    # After the question come the four options "(A) .. (D) ..", a blank line, then the story.
    end_of_options = doc["text"].find("\n\n", doc["text"].find("(D)"))
    options_text = doc["text"][:end_of_options]
    choices = [_normalize_spaces(option) for option in re.split(r" *\([A-D]\) *", options_text)[1:]]
    return {
      "text": doc["text"][end_of_options:].strip(),
      "choices": choices,
      "gold": choices.index(_normalize_spaces(doc["outputs"][0])),
    }

  return scrolls_query_docs(dataset).map(process)


def contract_nli_docs(dataset):
  def process(doc):
    return {"choices": list(CONTRACT_NLI_CHOICES), "gold": CONTRACT_NLI_CHOICES.index(doc["outputs"][0])}

  return scrolls_query_docs(dataset).map(process)


def summary_results(doc, results):
  (prediction,) = results
  return {kind: (prediction, doc["outputs"]) for kind in scorers.ROUGE_TYPES}


def qa_results(doc, results):
  (prediction,) = results
  return {"f1": (prediction, doc["outputs"])}


def qasper_results(doc, results):
  (prediction,) = results
  return {"f1": (prediction if prediction.strip() else "Unanswerable", doc["outputs"])}


def choice_em_results(doc, results):
  """EM of a multiple-choice SCROLLS task: 100 × (best length-normalised choice == gold), as lm-eval scores it."""
  log_likelihoods = np.array([log_likelihood for log_likelihood, _ in results])
  lengths = np.array([len(choice) for choice in doc["choices"]], dtype=np.float64)
  return {"em": 100.0 * float(np.argmax(log_likelihoods / lengths) == doc["gold"])}


def _unzip(items):
  predictions, references = zip(*items)
  return list(predictions), [list(refs) for refs in references]


def rouge1(items) -> float:
  return scorers.corpus_rouge(*_unzip(items))["rouge1"]


def rouge2(items) -> float:
  return scorers.corpus_rouge(*_unzip(items))["rouge2"]


def rougeL(items) -> float:  # noqa: N802  (the metric's name)
  return scorers.corpus_rouge(*_unzip(items))["rougeL"]


def f1(items) -> float:
  return scorers.corpus_f1(*_unzip(items))
