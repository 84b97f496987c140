"""Tokenizers behind one interface: cl100k (the paper's), bytes (tests), SentencePiece and tokenizer.json by path.

Every tokenizer exposes `name`, `encode(text) -> list[int]`, `decode(ids) -> str`, `eos_id` and `vocab_size`.

Document separation: `encode` never emits EOS and treats special-token text such as "<|endoftext|>" inside a
document as ordinary text, so a document cannot forge a boundary. The dataset builder appends exactly one
`eos_id` after every document (`encode_document`); packed rows then mark documents with segment ids too.

`vocab_size` is the embedding-table size: the largest id + 1, rounded up to a multiple of 8
(cl100k: 100,277 → 100,280, as in the paper).
"""

from __future__ import annotations

import abc
import base64
import functools
import gzip
import hashlib
import importlib.util
import os
import re
import tempfile

CL100K_VOCAB_SIZE = 100_280
_CL100K_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
# The published cl100k_base definition (tiktoken_ext/openai_public.py): the sha256 tiktoken expects of the
# ranks file, the pre-tokenizer pattern and the special tokens.
_CL100K_RANKS_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_CL100K_PATTERN = (
  r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
  r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_CL100K_SPECIAL_TOKENS = {
  "<|endoftext|>": 100_257,
  "<|fim_prefix|>": 100_258,
  "<|fim_middle|>": 100_259,
  "<|fim_suffix|>": 100_260,
  "<|endofprompt|>": 100_276,
}
CL100K_BACKENDS = ("tiktoken", "bpe_openai", "tiktoken_bpe_openai_ranks")
TOKENIZER_NAMES = ("cl100k", "bytes")


def _round_up_to_multiple_of_8(size: int) -> int:
  return -(-size // 8) * 8


class Tokenizer(abc.ABC):
  """The common interface; `spec` is what `get_tokenizer` needs to rebuild it (stored in dataset metadata)."""

  name: str
  spec: str
  eos_id: int
  vocab_size: int

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without EOS; special-token text is encoded as ordinary text."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """Text of `ids`; invalid UTF-8 byte sequences become U+FFFD."""

  def encode_document(self, text: str) -> list[int]:
    """Ids of one document followed by its EOS separator."""
    ids = self.encode(text)
    ids.append(self.eos_id)
    return ids

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255, EOS = 256; vocab 264 (257 rounded up to a multiple of 8)."""

  name = spec = "bytes"
  eos_id = 256
  vocab_size = 264

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def _tiktoken_cache_file() -> str | None:
  """Path of tiktoken's cached cl100k file if it is on disk and intact (tiktoken's own cache rule), else None.

  A corrupt file would make tiktoken delete it and download a new one, so its hash is checked here first.
  """
  cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
  if cache_dir is None:
    cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
  if not cache_dir:
    return None
  path = os.path.join(cache_dir, hashlib.sha1(_CL100K_TIKTOKEN_URL.encode()).hexdigest())
  if not os.path.isfile(path):
    return None
  with open(path, "rb") as f:
    return path if hashlib.sha256(f.read()).hexdigest() == _CL100K_RANKS_SHA256 else None


def _bpe_openai_ranks_file() -> str | None:
  """The cl100k ranks file inside the installed bpe-openai package, found without importing it (its import
  parses every encoding it ships, seconds per process)."""
  spec = importlib.util.find_spec("bpe_openai")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "cl100k_base.tiktoken.gz")
  return path if os.path.isfile(path) else None


def _tiktoken_with_bpe_openai_ranks():
  import tiktoken

  with gzip.open(_bpe_openai_ranks_file(), "rb") as f:
    raw = f.read()
  if hashlib.sha256(raw).hexdigest() != _CL100K_RANKS_SHA256:
    raise ValueError(f"{_bpe_openai_ranks_file()} is not the published cl100k_base ranks file (sha256 differs)")
  ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in raw.splitlines() if line)}
  return tiktoken.Encoding(
    "cl100k_base", pat_str=_CL100K_PATTERN, mergeable_ranks=ranks, special_tokens=_CL100K_SPECIAL_TOKENS
  )


# Places where cl100k's pre-tokenizer always starts a new piece: a letter right after a newline, and a space
# between two letters (letter runs are possessive and a space only ever prefixes the next word).
_PRETOKEN_BOUNDARY = re.compile(r"(?<=\n)(?=[^\W\d_])|(?<=[^\W\d_])(?= [^\W\d_])")
# bpe-openai refuses inputs of 1,000,000 characters or 200,000 tokens; longer texts are encoded in pieces.
_MAX_CHARS_PER_CALL = 100_000


def split_at_pretoken_boundaries(text: str, max_chars: int = _MAX_CHARS_PER_CALL) -> list[str]:
  """`text` cut into pieces of at most `max_chars`, only where cl100k's pre-tokenizer splits anyway.

  Encoding the pieces separately then gives exactly the ids of encoding `text` at once. A window of
  max_chars / 2 characters without any such boundary (e.g. one huge word) is cut at its end; only there can
  the ids differ from tiktoken's, by the one pre-token that straddles the cut.
  """
  pieces, start = [], 0
  while len(text) - start > max_chars:
    window_start = start + max_chars // 2
    boundaries = [match.start() for match in _PRETOKEN_BOUNDARY.finditer(text, window_start, start + max_chars)]
    cut = boundaries[-1] if boundaries and boundaries[-1] > start else start + max_chars
    pieces.append(text[start:cut])
    start = cut
  pieces.append(text[start:])
  return pieces


class Cl100kTokenizer(Tokenizer):
  """cl100k_base offline; never downloads. Backends ("auto": tiktoken if its file is cached, else bpe_openai):

    "tiktoken": tiktoken with its own cached encoding file (only if already on disk);
    "bpe_openai": bpe-openai's encoder and shipped ranks (about 2x tiktoken's speed here, but importing it
        parses every encoding it ships: seconds per process);
    "tiktoken_bpe_openai_ranks": tiktoken's encoder with the ranks file bpe-openai ships, checked against the
        sha256 tiktoken expects of the official file (so the ranks are byte-identical); starts in under a second.
  All produce identical ids (tests check known tiktoken ids and agreement). Texts longer than bpe-openai
  accepts in one call are encoded in pieces cut at pre-tokenizer boundaries, which keeps the ids identical.
  """

  name = spec = "cl100k"
  eos_id = 100_257  # <|endoftext|>
  vocab_size = CL100K_VOCAB_SIZE

  def __init__(self, backend: str = "auto"):
    if backend not in ("auto", *CL100K_BACKENDS):
      raise ValueError(f"cl100k backend {backend!r} is not one of {('auto', *CL100K_BACKENDS)}")
    has_tiktoken = importlib.util.find_spec("tiktoken") is not None
    if backend == "auto":
      backend = "tiktoken" if has_tiktoken and _tiktoken_cache_file() else "bpe_openai"
    if backend == "tiktoken":
      if not has_tiktoken or _tiktoken_cache_file() is None:
        raise ValueError(
          "tiktoken or its cl100k_base file is not available locally (no download is attempted); "
          f"use another backend: {CL100K_BACKENDS[1:]}"
        )
      import tiktoken

      self._encoding = tiktoken.get_encoding("cl100k_base")
    elif backend == "tiktoken_bpe_openai_ranks":
      if not has_tiktoken or _bpe_openai_ranks_file() is None:
        raise ValueError("backend 'tiktoken_bpe_openai_ranks' needs both tiktoken and bpe-openai installed")
      self._encoding = _tiktoken_with_bpe_openai_ranks()
    else:
      import bpe_openai

      self._encoding = bpe_openai.get_encoding("cl100k_base")
    self.backend = backend
    if self._encoding.eot_token != self.eos_id:
      raise ValueError(f"{backend} cl100k_base has <|endoftext|> = {self._encoding.eot_token}, expected {self.eos_id}")

  def encode(self, text: str) -> list[int]:
    if self.backend != "bpe_openai" or len(text) <= _MAX_CHARS_PER_CALL:
      return list(self._encoding.encode_ordinary(text))
    return [i for piece in split_at_pretoken_boundaries(text) for i in self._encoding.encode_ordinary(piece)]

  def decode(self, ids) -> str:
    return self._encoding.decode([int(i) for i in ids if int(i) < self._encoding.n_vocab])


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model file; EOS is the model's eos id (refused if the model has none)."""

  def __init__(self, path: str):
    try:
      import sentencepiece
    except ImportError as error:
      raise ValueError(
        f"tokenizer {path!r} is a SentencePiece model but the `sentencepiece` package is not "
        "installed (pip install sentencepiece)"
      ) from error
    self._processor = sentencepiece.SentencePieceProcessor(model_file=path)
    self.name = f"sentencepiece:{os.path.basename(path)}"
    self.spec = os.path.abspath(path)
    self.eos_id = int(self._processor.eos_id())
    if self.eos_id < 0:
      raise ValueError(f"SentencePiece model {path!r} defines no EOS token; documents need one as separator")
    self.vocab_size = _round_up_to_multiple_of_8(self._processor.get_piece_size())

  def encode(self, text: str) -> list[int]:
    return list(self._processor.encode(text))

  def decode(self, ids) -> str:
    return self._processor.decode([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json`; EOS is `eos_token` (or the first of </s>, <|endoftext|>, <eos>)."""

  _EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")

  def __init__(self, path: str, eos_token: str | None = None):
    try:
      import tokenizers
    except ImportError as error:
      raise ValueError(
        f"tokenizer {path!r} is a tokenizer.json but the `tokenizers` package is not installed (pip install tokenizers)"
      ) from error
    self._tokenizer = tokenizers.Tokenizer.from_file(path)
    self.name = f"hf:{os.path.basename(os.path.dirname(os.path.abspath(path))) or path}"
    self.spec = os.path.abspath(path)
    candidates = (eos_token,) if eos_token else self._EOS_CANDIDATES
    eos_ids = [self._tokenizer.token_to_id(token) for token in candidates]
    eos_ids = [i for i in eos_ids if i is not None]
    if not eos_ids:
      raise ValueError(f"tokenizer.json {path!r} has none of the EOS tokens {candidates}")
    self.eos_id = int(eos_ids[0])
    self.vocab_size = _round_up_to_multiple_of_8(self._tokenizer.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str) -> list[int]:
    return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

  def decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


@functools.lru_cache(maxsize=8)
def get_tokenizer(name_or_path: str) -> Tokenizer:
  """ "cl100k", "bytes", a SentencePiece model (*.model) or a Hugging Face tokenizer.json path."""
  if name_or_path in ("cl100k", "cl100k_base"):
    return Cl100kTokenizer()
  if name_or_path == "bytes":
    return ByteTokenizer()
  if os.path.isdir(name_or_path) and os.path.isfile(os.path.join(name_or_path, "tokenizer.json")):
    name_or_path = os.path.join(name_or_path, "tokenizer.json")
  if os.path.isfile(name_or_path):
    if name_or_path.endswith(".json"):
      return HuggingFaceTokenizer(name_or_path)
    return SentencePieceTokenizer(name_or_path)
  raise ValueError(
    f"tokenizer {name_or_path!r} is not one of {TOKENIZER_NAMES} nor an existing SentencePiece "
    "model file or Hugging Face tokenizer.json path"
  )
