"""lm-evaluation-harness (0.4.x) adapter: `lm_eval --model lsm_jax --model_args checkpoint=RUN_DIR[,step=N]`.

lm-eval resolves `--model` names from its own registry; `@register_model("lsm_jax")` below fills it when this
module is imported. lm-eval 0.4.13 reads no plugin entry points, so the stock `lm_eval` script never imports
it: use `lsm-jax-lm-eval` (= `python -m lsm_jax.evaluate.lm_eval_cli`, same arguments as `lm_eval`), which
does, and also adds this package's local task directory to the task path. The package also declares the
class under the `lm_eval.models` entry-point group, for lm-eval versions that discover model plugins that way.
From Python: `LsmJaxLM(checkpoint=RUN_DIR)` or `LsmJaxLM.from_engine(engine)`, then
`lm_eval.simple_evaluate(model=lm, tasks=[...])`.

Inputs are truncated from the left to the run's training context (`seq_len` of run_metadata.json), as the
paper does; requests are batched with padded, bucketed shapes by `InferenceEngine`.
"""

from __future__ import annotations

# lm-eval fills its registry with its own models (hf, vllm, ...) only while the registry is empty, so they are
# registered (lazily, by name) before lsm_jax is added; otherwise importing this module would hide them.
import lm_eval.models  # noqa: F401
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lsm_jax.evaluate import engine as engine_lib

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


def _as_int(name: str, value, default: int | None) -> int | None:
  if value is None or value == "auto":
    return default
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"model_args {name} must be an integer, got {value!r}") from None


@register_model("lsm_jax")
class LsmJaxLM(LM):
  """lm-eval LM over one lsm_jax milestone checkpoint (greedy generation only)."""

  def __init__(
    self,
    checkpoint: str | None = None,
    step=None,
    batch_size=DEFAULT_BATCH_SIZE,
    max_gen_toks=DEFAULT_MAX_GEN_TOKS,
    max_length=None,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    engine: engine_lib.InferenceEngine | None = None,
    device=None,
    max_batch_size=None,
    progress: bool = True,
  ):
    # device / max_batch_size: lm-eval's CLI always passes them; JAX places arrays itself.
    del device, max_batch_size
    super().__init__()
    if (checkpoint is None) == (engine is None):
      raise ValueError("LsmJaxLM needs exactly one of model_args checkpoint=RUN_DIR or engine=InferenceEngine")
    self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks, DEFAULT_MAX_GEN_TOKS)
    if engine is None:
      overrides = {"dtype": compute_dtype} if compute_dtype else {}
      model, tokenizer, run_metadata, _ = engine_lib.load_model(
        checkpoint, _as_int("step", step, None), dtype=dtype, **overrides
      )
      engine = engine_lib.InferenceEngine(
        model,
        tokenizer,
        max_length=_as_int("max_length", max_length, run_metadata["seq_len"]),
        batch_size=_as_int("batch_size", batch_size, DEFAULT_BATCH_SIZE),
      )
    self.engine = engine
    # lm-eval calls the request methods without disable_tqdm; this switches their progress bars off instead.
    self.progress = progress

  @classmethod
  def from_engine(cls, engine: engine_lib.InferenceEngine, **kwargs) -> "LsmJaxLM":
    return cls(engine=engine, **kwargs)

  @property
  def tokenizer(self):
    return self.engine.tokenizer

  @property
  def max_length(self) -> int:
    return self.engine.max_length

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # Trailing context whitespace belongs to the continuation (it tokenizes with the next word), and the
    # continuation is the tail of the jointly encoded text: lm-eval's convention.
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
      return [self.eot_token_id], self.tokenizer.encode(continuation)
    whole = self.tokenizer.encode(context + continuation)
    context_ids = self.tokenizer.encode(context)
    return whole[: len(context_ids)], whole[len(context_ids) :]

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    pairs = [self._encode_pair(*request.args) for request in requests]
    with _progress_bar(len(pairs), "loglikelihood", disable_tqdm or not self.progress) as bar:
      results = self.engine.loglikelihoods(pairs, progress=bar.update)
    for request, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", request.args, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Σ log p over the whole text, in disjoint windows of the training context (each window sees up to
    max_length tokens of preceding text)."""
    windows, owners = [], []
    for index, request in enumerate(requests):
      (text,) = request.args
      token_windows = lm_eval_utils.get_rolling_token_windows(
        token_list=self.tokenizer.encode(text),
        prefix_token=self.eot_token_id,
        max_seq_len=self.max_length,
        context_len=1,
      )
      for window in map(lm_eval_utils.make_disjoint_window, token_windows):
        windows.append(window)
        owners.append(index)
    totals = [0.0] * len(requests)
    with _progress_bar(len(windows), "loglikelihood_rolling windows", disable_tqdm or not self.progress) as bar:
      scores = self.engine.loglikelihoods(windows, progress=bar.update)
    for owner, (log_likelihood, _) in zip(owners, scores):
      totals[owner] += log_likelihood
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy generation; stops at EOS, at any `until` string, or after `max_gen_toks` tokens."""
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
      _, gen_kwargs = request.args
      gen_kwargs = dict(gen_kwargs or {})
      until = gen_kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new_tokens = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
      if gen_kwargs.pop("do_sample", False) or float(gen_kwargs.pop("temperature", 0.0) or 0.0) > 0:
        raise ValueError("lsm_jax decodes greedily only; remove do_sample/temperature from the task's gen_kwargs")
      groups.setdefault((tuple(until), max_new_tokens), []).append(index)
    results: list[str | None] = [None] * len(requests)
    with _progress_bar(len(requests), "generate_until", disable_tqdm or not self.progress) as bar:
      for (until, max_new_tokens), indices in groups.items():
        prompts = [self.tokenizer.encode(requests[i].args[0]) for i in indices]
        for index, text in zip(indices, self.engine.generate(prompts, max_new_tokens, until, progress=bar.update)):
          results[index] = text
          self.cache_hook.add_partial("generate_until", requests[index].args, text)
    return results


def _progress_bar(total: int, description: str, disabled: bool):
  from tqdm import tqdm

  return tqdm(total=total, desc=f"lsm_jax {description}", unit="req", disable=disabled)
