"""Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json) for the tokenizers lsm_jax trains with.

  cl100k   byte-level BPE built from the cl100k_base ranks available offline (bpe-openai's shipped file or
           tiktoken's cached one, both checked against the published sha256): the ranks are the vocabulary
           (ids 0..100255), the merges are recovered from them, the pre-tokenizer is cl100k's regex; the special
           tokens keep their ids (<|endoftext|> = 100257 is EOS) and the unassigned ids up to the embedding size
           100,280 become <|reserved_special_token_N|>.
  bytes    ids 0..255 are the UTF-8 bytes (byte-level alphabet, no merges), 256 = <|endoftext|> (EOS), 257..263
           reserved: the smoke models' 264-id vocabulary.
  a tokenizer.json path is copied as it is.

tokenizer_config.json sets `split_special_tokens`: like lsm_jax's `encode`, transformers then encodes special-token
text inside a document (e.g. "<|endoftext|>") as ordinary text, so both give the same ids for every text; EOS is
added by id (`eos_token_id`), never parsed from text.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil

from lsm_jax.data import tokenizer as tokenizer_lib

EOS_TOKEN = "<|endoftext|>"
# cl100k's pre-tokenizer regex for the tokenizers library (Oniguruma): there `{1,3}+` repeats the interval instead of
# making it possessive, so the digit run is written `{1,3}`, the same match here (nothing follows it to backtrack).
CL100K_SPLIT_PATTERN = tokenizer_lib._CL100K_PATTERN.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")


def byte_level_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  table, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      table[byte] = chr(byte)
    else:
      table[byte] = chr(256 + extra)
      extra += 1
  return table


def cl100k_ranks() -> dict[bytes, int]:
  """cl100k_base's mergeable ranks from a local file (never downloaded), checked against the published sha256."""
  candidates = []
  path = tokenizer_lib._bpe_openai_ranks_file()
  if path:
    with gzip.open(path, "rb") as handle:
      candidates.append(handle.read())
  path = tokenizer_lib._tiktoken_cache_file()  # returned only when its sha256 is the published one
  if path:
    with open(path, "rb") as handle:
      candidates.append(handle.read())
  for raw in candidates:
    if hashlib.sha256(raw).hexdigest() == tokenizer_lib._CL100K_RANKS_SHA256:
      return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in raw.splitlines() if line)}
  raise ValueError(
    "no local cl100k_base ranks file with the published sha256: install bpe-openai (it ships the "
    "file) or place tiktoken's cl100k_base file in its cache; nothing is downloaded"
  )


def _merge_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
  """The pieces byte-level BPE reaches for `token` using only merges ranked below max_rank (tiktoken's rule:
  always merge the adjacent pair of lowest rank)."""
  parts = [bytes([byte]) for byte in token]
  while True:
    best_index, best_rank = None, None
    for index in range(len(parts) - 1):
      rank = ranks.get(parts[index] + parts[index + 1])
      if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
        best_index, best_rank = index, rank
    if best_index is None:
      return parts
    parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]


def _bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Byte-level vocabulary and merges equivalent to tiktoken's ranks: every multi-byte token is the merge of the
  two pieces BPE holds just before reaching it, in rank order."""
  alphabet = byte_level_alphabet()
  as_text = lambda token: "".join(alphabet[byte] for byte in token)  # noqa: E731
  vocab, merges = {}, []
  for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
    vocab[as_text(token)] = rank
    if len(token) > 1:
      parts = _merge_parts(ranks, token, rank)
      if len(parts) != 2:
        raise ValueError(f"cl100k token {token!r} (rank {rank}) is not one merge of lower-ranked tokens")
      merges.append((as_text(parts[0]), as_text(parts[1])))
  return vocab, merges


def _byte_level_tokenizer(
  vocab: dict[str, int], merges: list, special_tokens: dict[str, int], size: int, split_pattern: str | None
):
  """A tokenizers.Tokenizer: byte-level BPE (whole pre-tokens in the vocabulary are taken as they are, like
  tiktoken), `special_tokens` at their ids and reserved tokens on every other id below `size`."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers

  specials = dict(special_tokens)
  taken = set(vocab.values()) | set(specials.values())
  specials.update({f"<|reserved_special_token_{index}|>": index for index in range(size) if index not in taken})
  model = models.BPE(vocab={**vocab, **specials}, merges=merges, ignore_merges=True)
  tokenizer = tokenizers.Tokenizer(model)
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tokenizer.pre_tokenizer = (
    byte_level
    if split_pattern is None
    else pre_tokenizers.Sequence(
      [pre_tokenizers.Split(tokenizers.Regex(split_pattern), behavior="isolated", invert=False), byte_level]
    )
  )
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens(
    [
      tokenizers.AddedToken(name, special=True, normalized=False)
      for name, _ in sorted(specials.items(), key=lambda item: item[1])
    ]
  )
  return tokenizer


def build_tokenizer(spec: str):
  """(tokenizers.Tokenizer, EOS token) for "cl100k" or "bytes"."""
  if spec in ("cl100k", "cl100k_base"):
    vocab, merges = _bpe_vocab_and_merges(cl100k_ranks())
    return _byte_level_tokenizer(
      vocab, merges, tokenizer_lib._CL100K_SPECIAL_TOKENS, tokenizer_lib.CL100K_VOCAB_SIZE, CL100K_SPLIT_PATTERN
    ), EOS_TOKEN
  if spec == "bytes":
    byte_tokenizer = tokenizer_lib.ByteTokenizer()
    vocab = {character: byte for byte, character in byte_level_alphabet().items()}
    return _byte_level_tokenizer(
      vocab, [], {EOS_TOKEN: byte_tokenizer.eos_id}, byte_tokenizer.vocab_size, None
    ), EOS_TOKEN
  raise ValueError(f"no Hugging Face tokenizer can be built for {spec!r}; buildable: cl100k, bytes")


def write_tokenizer_files(spec: str, out_dir: str, *, model_max_length: int) -> dict | None:
  """Writes out_dir/tokenizer.json and tokenizer_config.json for a run's tokenizer spec; returns
  {"eos_token", "eos_token_id"}, or None for a SentencePiece model (no tokenizer.json can represent it here)."""
  os.makedirs(out_dir, exist_ok=True)
  if spec in ("cl100k", "cl100k_base", "bytes"):
    tokenizer, eos_token = build_tokenizer(spec)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  elif spec.endswith(".json") and os.path.isfile(spec):
    shutil.copyfile(spec, os.path.join(out_dir, "tokenizer.json"))
    ours = tokenizer_lib.HuggingFaceTokenizer(spec)
    eos_token = ours._tokenizer.id_to_token(ours.eos_id)
  else:
    return None
  eos_id = tokenizer_lib.get_tokenizer(spec).eos_id
  config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "eos_token": eos_token,
    "pad_token": eos_token,
    "bos_token": None,
    "unk_token": None,
    "add_bos_token": False,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "split_special_tokens": True,
    "model_max_length": model_max_length,
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as handle:
    json.dump(config, handle, indent=2)
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as handle:
    json.dump({"eos_token": eos_token, "pad_token": eos_token}, handle, indent=2)
  return {"eos_token": eos_token, "eos_token_id": eos_id}
