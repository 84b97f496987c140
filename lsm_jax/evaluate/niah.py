"""Needle in a haystack (arXiv 2406.16690 §3.4, Appendices B.1, C.2): prompts, the 35 × 35 grid, scores, heatmap.

Modes:
- "easy": the question *and* its answer (a QA pair) are inserted into the haystack;
- "standard": only the answer sentence is inserted; the model must understand the question to find it.
Every prompt ends with "\n\nQuestion: <question>\nAnswer:" and is answered greedily.

Cell score: 1 + 9 × recall of the answer's normalised words in the generated text (the paper judges 1–10
with an unstated rule); a cell succeeds when its score reaches `success_threshold` (7: two thirds of the
answer's words).

Scores over the success grid S[depth, length] (depths linspace(0, 100, 35)%, lengths linspace(1000, 16000, 35)):
- acc@L: mean over depths at one length; acc≤L: mean of acc@L' over grid lengths L' ≤ L; avg = acc≤max.
- weighted average: Σ w_d[i] w_c[j] S[i, j] with geometric weights w_i = w_0 α^i (i = 0 first depth/shortest
  length, so deeper and longer weigh more) and w_0 = (α − 1)/(αⁿ − 1), which makes each weight vector sum to 1.
  The paper reports neither w_0 nor α; DEFAULT_ALPHA = 1.01 for both axes reproduces the gap between Table 11's
  avg and weighted avg for LLaMA-0.41B (56.4 vs 52.3) when a model passes the first ~20 lengths.
- NIAH score: Σ_j w_c[j] p_j r_j, where for length column j, r_j is the longest run of successes over depths
  divided by the number of depths and p_j the consistency penalty: 0 with no success, 1 when every depth
  succeeds, else 2^((1 − n)/2) with n the number of contiguous success/failure segments.
All reported as percentages.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from lsm_jax.evaluate import scorers

MODES = ("easy", "standard")
DEFAULT_ALPHA = 1.01
DEFAULT_SUCCESS_THRESHOLD = 7.0
# gkamradt's needle, the de-facto standard of NIAH.
DEFAULT_QUESTION = "What is the best thing to do in San Francisco?"
DEFAULT_ANSWER = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
# The words a correct answer must reproduce (the question's own words are not evidence of retrieval).
DEFAULT_ANSWER_KEY = "eat a sandwich and sit in Dolores Park on a sunny day"


def default_context_lengths(num: int = 35, start: int = 1000, stop: int = 16000) -> list[int]:
  return [int(round(length)) for length in np.linspace(start, stop, num)]


def default_depth_percents(num: int = 35) -> list[float]:
  return [float(depth) for depth in np.linspace(0.0, 100.0, num)]


@dataclasses.dataclass(frozen=True)
class NIAHConfig:
  mode: str = "easy"
  context_lengths: tuple[int, ...] = tuple(default_context_lengths())
  depth_percents: tuple[float, ...] = tuple(default_depth_percents())
  question: str = DEFAULT_QUESTION
  answer: str = DEFAULT_ANSWER
  answer_key: str = DEFAULT_ANSWER_KEY
  max_new_tokens: int = 32
  success_threshold: float = DEFAULT_SUCCESS_THRESHOLD
  alpha_depth: float = DEFAULT_ALPHA
  alpha_length: float = DEFAULT_ALPHA

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"NIAH mode must be one of {MODES}, got {self.mode!r}")
    if not self.context_lengths or any(length <= 0 for length in self.context_lengths):
      raise ValueError(f"context_lengths must be positive token counts, got {self.context_lengths}")
    if list(self.context_lengths) != sorted(self.context_lengths):
      raise ValueError(f"context_lengths must be ascending, got {self.context_lengths}")
    if not self.depth_percents or any(not 0 <= depth <= 100 for depth in self.depth_percents):
      raise ValueError(f"depth_percents must lie in [0, 100], got {self.depth_percents}")
    if not normalized_words(self.answer_key):
      raise ValueError(f"answer_key must contain words, got {self.answer_key!r}")
    if not 1 <= self.success_threshold <= 10:
      raise ValueError(f"success_threshold must lie in [1, 10], got {self.success_threshold}")
    for name in ("alpha_depth", "alpha_length"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

  @property
  def needle(self) -> str:
    return f" {self.question} {self.answer} " if self.mode == "easy" else f" {self.answer} "

  @property
  def prompt_suffix(self) -> str:
    return f"\n\nQuestion: {self.question}\nAnswer:"


def normalized_words(text: str) -> list[str]:
  return scorers.normalize_answer(text).split()


def cell_score(generation: str, answer_key: str) -> float:
  """1 + 9 × the fraction of the answer key's normalised words present in the generation (1..10)."""
  key_words = normalized_words(answer_key)
  generated = set(normalized_words(generation))
  return 1.0 + 9.0 * sum(word in generated for word in key_words) / len(key_words)


def geometric_weights(num: int, alpha: float) -> np.ndarray:
  """w_i = w_0 α^i, i = 0..num−1, with w_0 chosen so the weights sum to 1 (uniform when α = 1)."""
  if num <= 0 or alpha <= 0:
    raise ValueError(f"geometric weights need num > 0 and alpha > 0, got num={num}, alpha={alpha}")
  powers = alpha ** np.arange(num, dtype=np.float64)
  return powers / powers.sum()


def consistency_penalty(column: Sequence[bool]) -> float:
  """0 with no success, 1 with all successes, else 2^((1 − n)/2), n = contiguous success/failure segments."""
  column = np.asarray(column, dtype=bool)
  if not column.any():
    return 0.0
  if column.all():
    return 1.0
  num_segments = 1 + int(np.count_nonzero(column[1:] != column[:-1]))
  return 2.0 ** ((1 - num_segments) / 2)


def longest_success_run(column: Sequence[bool]) -> int:
  longest = current = 0
  for success in column:
    current = current + 1 if success else 0
    longest = max(longest, current)
  return longest


def _check_grid(success: np.ndarray, context_lengths: Sequence[int]) -> np.ndarray:
  success = np.asarray(success, dtype=bool)
  if success.ndim != 2 or success.shape[1] != len(context_lengths):
    raise ValueError(
      f"success grid must be [depths, lengths] with {len(context_lengths)} lengths, got shape {success.shape}"
    )
  return success


def accuracy_at(success, context_lengths: Sequence[int], length: float) -> float:
  """acc@L in %: mean over depths of the grid length nearest to `length`."""
  success = _check_grid(success, context_lengths)
  column = int(np.argmin(np.abs(np.asarray(context_lengths, dtype=np.float64) - length)))
  return 100.0 * float(success[:, column].mean())


def accuracy_up_to(success, context_lengths: Sequence[int], length: float) -> float:
  """acc≤L in %: mean of acc@L' over the grid lengths L' ≤ `length`."""
  success = _check_grid(success, context_lengths)
  columns = np.asarray(context_lengths) <= length
  if not columns.any():
    raise ValueError(f"no grid length is ≤ {length}; the shortest is {min(context_lengths)}")
  return 100.0 * float(success[:, columns].mean())


def weighted_average_accuracy(
  success, context_lengths: Sequence[int], alpha_depth: float = DEFAULT_ALPHA, alpha_length: float = DEFAULT_ALPHA
) -> float:
  success = _check_grid(success, context_lengths)
  weights = np.outer(
    geometric_weights(success.shape[0], alpha_depth), geometric_weights(success.shape[1], alpha_length)
  )
  return 100.0 * float((weights * success).sum())


def niah_score(success, context_lengths: Sequence[int], alpha_length: float = DEFAULT_ALPHA) -> float:
  success = _check_grid(success, context_lengths)
  num_depths = success.shape[0]
  column_scores = [
    consistency_penalty(success[:, j]) * longest_success_run(success[:, j]) / num_depths
    for j in range(success.shape[1])
  ]
  return 100.0 * float(np.dot(geometric_weights(success.shape[1], alpha_length), column_scores))


def summarize(success, config: NIAHConfig) -> dict[str, float]:
  """The Table 11 columns: acc@{2,4,8,16}k, acc≤{4,8}k, avg, weighted_avg, niah_score (those the grid covers)."""
  lengths = config.context_lengths
  summary = {}
  for thousands in (2, 4, 8, 16):
    if min(lengths) <= thousands * 1000 <= max(lengths):
      summary[f"acc@{thousands}k"] = accuracy_at(success, lengths, thousands * 1000)
  for thousands in (4, 8):
    if min(lengths) <= thousands * 1000 <= max(lengths):
      summary[f"acc<={thousands}k"] = accuracy_up_to(success, lengths, thousands * 1000)
  summary["avg"] = accuracy_up_to(success, lengths, max(lengths))
  summary["weighted_avg"] = weighted_average_accuracy(success, lengths, config.alpha_depth, config.alpha_length)
  summary["niah_score"] = niah_score(success, lengths, config.alpha_length)
  return summary


def _haystack_tokens(haystack_ids: Sequence[int], count: int) -> list[int]:
  """The first `count` haystack tokens, cycling through the text when it is shorter."""
  if not haystack_ids:
    raise ValueError("the haystack text encodes to no tokens")
  repeats = -(-count // len(haystack_ids))
  return (list(haystack_ids) * repeats)[:count]


def _sentence_boundary(tokenizer, haystack: list[int], position: int) -> int:
  """Move `position` back to just after a token containing '.', so the needle does not split a sentence."""
  while position > 0 and "." not in tokenizer.decode([haystack[position - 1]]):
    position -= 1
  return position


def build_prompt(
  tokenizer, haystack_ids: Sequence[int], context_length: int, depth_percent: float, config: NIAHConfig
) -> list[int]:
  """Token ids of one prompt of exactly `context_length` tokens (haystack filler + needle + question)."""
  needle = tokenizer.encode(config.needle)
  suffix = tokenizer.encode(config.prompt_suffix)
  filler_length = context_length - len(needle) - len(suffix)
  if filler_length < 0:
    raise ValueError(
      f"context length {context_length} is shorter than the needle and question ({len(needle) + len(suffix)} tokens)"
    )
  haystack = _haystack_tokens(haystack_ids, filler_length)
  insert_at = (
    filler_length
    if depth_percent >= 100
    else _sentence_boundary(tokenizer, haystack, int(filler_length * depth_percent / 100))
  )
  return haystack[:insert_at] + needle + haystack[insert_at:] + suffix


@dataclasses.dataclass
class NIAHResult:
  config: NIAHConfig
  scores: np.ndarray  # [depths, lengths] cell scores 1..10
  generations: list[list[str]]

  @property
  def success(self) -> np.ndarray:
    return self.scores >= self.config.success_threshold

  def summary(self) -> dict[str, float]:
    return summarize(self.success, self.config)

  def save(self, directory: str) -> dict[str, str]:
    """Writes niah_<mode>.json (grid, generations, summary) and niah_<mode>.png; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    json_path = os.path.join(directory, f"niah_{self.config.mode}.json")
    with open(json_path, "w") as f:
      json.dump(
        {
          "config": dataclasses.asdict(self.config),
          "scores": self.scores.tolist(),
          "generations": self.generations,
          "summary": self.summary(),
        },
        f,
      )
    png_path = os.path.join(directory, f"niah_{self.config.mode}.png")
    plot_heatmap(self.scores, self.config, png_path)
    return {"json": json_path, "png": png_path}


def run_niah(
  generate: Callable[[list[list[int]], int], list[str]],
  tokenizer,
  haystack_text: str,
  config: NIAHConfig = NIAHConfig(),
  batch_size: int = 8,
) -> NIAHResult:
  """Runs the grid. `generate(prompts_token_ids, max_new_tokens) -> texts` answers greedily."""
  haystack_ids = tokenizer.encode(haystack_text)
  cells = [(i, j) for j in range(len(config.context_lengths)) for i in range(len(config.depth_percents))]
  scores = np.zeros((len(config.depth_percents), len(config.context_lengths)))
  generations = [[""] * len(config.context_lengths) for _ in config.depth_percents]
  # Cells are ordered by length so a batch shares (nearly) one padded shape.
  for start in range(0, len(cells), batch_size):
    batch = cells[start : start + batch_size]
    prompts = [
      build_prompt(tokenizer, haystack_ids, config.context_lengths[j], config.depth_percents[i], config)
      for i, j in batch
    ]
    for (i, j), text in zip(batch, generate(prompts, config.max_new_tokens)):
      generations[i][j] = text
      scores[i, j] = cell_score(text, config.answer_key)
  return NIAHResult(config=config, scores=scores, generations=generations)


def plot_heatmap(scores, config: NIAHConfig, path: str) -> None:
  """Depth (rows) × context length (columns) heatmap of the 1–10 cell scores, red (1) to green (10)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  scores = np.asarray(scores, dtype=np.float64)
  figure, axis = plt.subplots(figsize=(max(6, 0.4 * scores.shape[1]), max(4, 0.25 * scores.shape[0])))
  image = axis.imshow(scores, cmap="RdYlGn", vmin=1, vmax=10, aspect="auto")
  axis.set_xticks(
    range(len(config.context_lengths)), [str(length) for length in config.context_lengths], rotation=90, fontsize=7
  )
  axis.set_yticks(range(len(config.depth_percents)), [f"{depth:.0f}" for depth in config.depth_percents], fontsize=7)
  axis.set_xlabel("context length (tokens)")
  axis.set_ylabel("needle depth (%)")
  summary = summarize(scores >= config.success_threshold, config)
  axis.set_title(f"NIAH ({config.mode}): weighted avg {summary['weighted_avg']:.1f}, score {summary['niah_score']:.1f}")
  figure.colorbar(image, ax=axis, label="score (1-10)")
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
