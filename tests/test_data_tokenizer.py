"""Tokenizers: cl100k ids equal tiktoken's published ids; the bpe-openai and tiktoken backends agree."""

import gzip
import hashlib
import os

import pytest

from lsm_jax.data import tokenizer as tokenizer_lib

# Ids published in tiktoken's own tests (tests/test_encoding.py) and OpenAI's cookbook.
KNOWN_CL100K_IDS = {
  "hello world": [15339, 1917],
  "rer": [38149],
  "'rer": [2351, 81],
  "today\n ": [31213, 198, 220],
  "today\n \n": [31213, 27907],
  "today\n  \n": [31213, 14211],
  " \x850": [220, 126, 227, 15],
  "👍": [9468, 239, 235],
  "tiktoken is great!": [83, 1609, 5963, 374, 2294, 0],
}
# tiktoken's download URL and the sha256 it expects of that file (tiktoken_ext/openai_public.py).
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
SAMPLE_TEXTS = [
  "请考试我的软件！12345",
  "Ünïcödé   tabs\t\tand\n\n\nnewlines   ",
  "  leading and trailing  ",
  "x" * 300,
  "def f(x):\n    return x ** 2  # comment\n",
  "Привет, мир! 🌍🚀",
  "<|endoftext|> in text",
]


@pytest.fixture(scope="module")
def bpe_openai_cl100k():
  return tokenizer_lib.Cl100kTokenizer(backend="bpe_openai")


@pytest.fixture(scope="module")
def shipped_ranks_cl100k():
  pytest.importorskip("tiktoken")
  return tokenizer_lib.Cl100kTokenizer(backend="tiktoken_bpe_openai_ranks")


@pytest.mark.parametrize("text", sorted(KNOWN_CL100K_IDS))
def test_cl100k_backends_match_known_tiktoken_ids(bpe_openai_cl100k, shipped_ranks_cl100k, text):
  for cl100k in (bpe_openai_cl100k, shipped_ranks_cl100k):
    assert cl100k.encode(text) == KNOWN_CL100K_IDS[text], cl100k.backend
    assert cl100k.decode(KNOWN_CL100K_IDS[text]) == text


def test_cl100k_definition_matches_tiktokens_published_one():
  pytest.importorskip("tiktoken")
  import inspect

  import tiktoken_ext.openai_public

  published = inspect.getsource(tiktoken_ext.openai_public.cl100k_base)
  assert tokenizer_lib._CL100K_PATTERN in published and CL100K_SHA256 in published
  for token, token_id in tokenizer_lib._CL100K_SPECIAL_TOKENS.items():
    constant = {
      "<|endoftext|>": "ENDOFTEXT",
      "<|fim_prefix|>": "FIM_PREFIX",
      "<|fim_middle|>": "FIM_MIDDLE",
      "<|fim_suffix|>": "FIM_SUFFIX",
      "<|endofprompt|>": "ENDOFPROMPT",
    }[token]
    assert getattr(tiktoken_ext.openai_public, constant) == token and f"{constant}: {token_id}" in published


def test_cl100k_roundtrip_eos_and_vocab(bpe_openai_cl100k):
  for text in SAMPLE_TEXTS:
    assert bpe_openai_cl100k.decode(bpe_openai_cl100k.encode(text)) == text
  assert bpe_openai_cl100k.vocab_size == 100_280 and bpe_openai_cl100k.eos_id == 100_257
  # Special-token text inside a document is ordinary text: documents cannot forge a separator.
  assert bpe_openai_cl100k.eos_id not in bpe_openai_cl100k.encode("a <|endoftext|> b")
  assert bpe_openai_cl100k.encode_document("hello world") == [15339, 1917, 100_257]


def test_tiktoken_backends_agree_with_bpe_openai(tmp_path, monkeypatch, bpe_openai_cl100k, shipped_ranks_cl100k):
  """Seeds tiktoken's cache with the ranks bpe-openai ships (after checking tiktoken's expected hash)."""
  pytest.importorskip("tiktoken")
  import bpe_openai.data

  ranks_file = os.path.join(os.path.dirname(bpe_openai.data.__file__), "cl100k_base.tiktoken.gz")
  raw = gzip.open(ranks_file).read()
  assert hashlib.sha256(raw).hexdigest() == CL100K_SHA256
  (tmp_path / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(raw)
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
  tiktoken_cl100k = tokenizer_lib.Cl100kTokenizer(backend="tiktoken")
  assert tiktoken_cl100k.backend == "tiktoken"
  for text in [*KNOWN_CL100K_IDS, *SAMPLE_TEXTS]:
    assert tiktoken_cl100k.encode(text) == bpe_openai_cl100k.encode(text) == shipped_ranks_cl100k.encode(text)
  # Longer than bpe-openai accepts in one call (1,000,000 characters): encoded in pieces, same ids.
  from pydoc_data import topics

  long_text = "\n".join(topics.topics[name] for name in sorted(topics.topics)) * 3
  assert len(long_text) > 1_000_000
  expected = tiktoken_cl100k.encode(long_text)
  assert bpe_openai_cl100k.encode(long_text) == expected and shipped_ranks_cl100k.encode(long_text) == expected


def test_split_at_pretoken_boundaries():
  text = "alpha beta\ngamma " * 20 + "x" * 50
  pieces = tokenizer_lib.split_at_pretoken_boundaries(text, max_chars=40)
  assert "".join(pieces) == text and all(len(piece) <= 40 for piece in pieces)
  for left, right in zip(pieces, pieces[1:]):
    assert (
      right[0].isalpha() and left[-1] == "\n" or left[-1].isalpha() and right[0] == " " or len(left) == 40
    )  # the forced cut inside the run of x's


def test_tiktoken_backend_never_downloads(tmp_path, monkeypatch):
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
  with pytest.raises(ValueError, match="not available locally"):
    tokenizer_lib.Cl100kTokenizer(backend="tiktoken")
  # A corrupt cached file (which tiktoken would replace by downloading) counts as missing.
  (tmp_path / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(b"truncated")
  with pytest.raises(ValueError, match="not available locally"):
    tokenizer_lib.Cl100kTokenizer(backend="tiktoken")
  assert tokenizer_lib.Cl100kTokenizer().backend == "bpe_openai"


def test_byte_tokenizer():
  byte_tokenizer = tokenizer_lib.get_tokenizer("bytes")
  assert byte_tokenizer.encode("aé") == [97, 0xC3, 0xA9]
  assert byte_tokenizer.encode_document("a") == [97, 256]
  assert byte_tokenizer.decode([97, 0xC3, 0xA9, 256]) == "aé"
  assert byte_tokenizer.vocab_size == 264 and byte_tokenizer.vocab_size % 8 == 0


def test_bad_tokenizer_names(tmp_path):
  with pytest.raises(ValueError, match="not one of"):
    tokenizer_lib.get_tokenizer("gpt5")
  model_path = tmp_path / "spm.model"
  model_path.write_bytes(b"\x00")
  try:
    import sentencepiece  # noqa: F401
  except ImportError:
    with pytest.raises(ValueError, match="sentencepiece"):
      tokenizer_lib.get_tokenizer(str(model_path))
  json_path = tmp_path / "tokenizer.json"
  json_path.write_text("{}")
  try:
    import tokenizers  # noqa: F401
  except ImportError:
    with pytest.raises(ValueError, match="tokenizers"):
      tokenizer_lib.get_tokenizer(str(json_path))


def test_hugging_face_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}
  model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  model.save(str(tmp_path / "tokenizer.json"))
  hf = tokenizer_lib.get_tokenizer(str(tmp_path))
  assert hf.encode("hello world") == [2, 3] and hf.encode_document("world") == [3, 1]
  assert hf.eos_id == 1 and hf.vocab_size == 8
