"""Every .gin file in the repository parses strictly (skip_unknown=False), the way lsm_jax.train parses it.

Required macros a file leaves open (`%gin.REQUIRED` or referenced but defined by a file that includes it) are
bound to dummies, found from gin's own error message, so a misspelled configurable, parameter or include still
fails. Experiment files are also evaluated: the model they build must match their file name.
"""

import glob
import os
import re

import gin
import pytest

from lsm_jax import flops, train

REPO_ROOT = train.REPO_ROOT
GIN_FILES = sorted(
  os.path.relpath(path, REPO_ROOT) for path in glob.glob(os.path.join(REPO_ROOT, "gin", "**", "*.gin"), recursive=True)
)
DUMMY_MACROS = {
  "MODEL_DIR": "'/tmp/lsm_jax_gin_test'",
  "TRAIN_STEPS": "10",
  "DATA_DIR": "'embedded'",
  "SEQ_LEN": "128",
  "GLOBAL_BATCH_SIZE": "16",
  "MODEL_CONFIG": "None",
}
_MISSING_MACRO = re.compile(r"(\w+)/macro\.value set to `%gin\.REQUIRED`|No bindings specified for '(\w+)/gin\.macro'")


def _parse_with_dummies(path: str) -> list[str]:
  """Parses `path`, binding dummies for macros it leaves open; returns the names bound."""
  bound = []
  while True:
    gin.clear_config()
    try:
      train.parse_gin([path], [f"{name} = {DUMMY_MACROS[name]}" for name in bound])
      return bound
    except ValueError as error:
      match = _MISSING_MACRO.search(str(error))
      if not match:
        raise
      name = match.group(1) or match.group(2)
      if name not in DUMMY_MACROS or name in bound:
        raise
      bound.append(name)


def test_the_repository_has_the_expected_gin_files():
  assert len(GIN_FILES) >= 24 + 4 + 1
  for arch in flops.ARCHS:
    assert f"gin/smoke/{arch}.gin" in GIN_FILES
    for size in ("70m", "160m", "410m", "1b", "3b", "7b"):
      assert f"gin/{arch}_{size}.gin" in GIN_FILES


@pytest.mark.parametrize("path", GIN_FILES)
def test_gin_file_parses_strictly(path):
  bound = _parse_with_dummies(path)
  if os.path.dirname(path) == "gin" or path.startswith("gin/smoke/"):
    # Runnable files leave open only what the user must give on the command line.
    assert set(bound) <= {"MODEL_DIR", "DATA_DIR"}, f"{path} leaves {bound} unset"
  gin.clear_config()


@pytest.mark.parametrize("path", [p for p in GIN_FILES if re.fullmatch(r"gin/\w+_\w+\.gin", p)])
def test_experiment_file_builds_the_model_its_name_says(path):
  arch, size = os.path.basename(path)[: -len(".gin")].rsplit("_", 1)
  _parse_with_dummies(path)
  model_config = gin.query_parameter("MODEL_CONFIG/macro.value").scoped_configurable_fn()
  assert (model_config.arch, model_config.size) == (arch, size)
  assert gin.query_parameter("SEQ_LEN/macro.value") * gin.query_parameter("GLOBAL_BATCH_SIZE/macro.value") == (
    480 * 8192
  )
  optimizer = gin.query_parameter("trainer.train.optimizer").scoped_configurable_fn()
  assert (optimizer.learning_rate, optimizer.weight_decay, optimizer.schedule) == (3e-4, 0.1, "fixed")
  gin.clear_config()


def test_misspelled_binding_fails_naming_it():
  gin.clear_config()
  with pytest.raises(ValueError, match="train_stepz"):
    train.parse_gin(["gin/smoke/llama.gin"], ["MODEL_DIR = '/tmp/x'", "trainer.train.train_stepz = 3"])
  gin.clear_config()


def test_a_missing_gin_file_is_named_with_the_closest_existing_ones():
  gin.clear_config()
  with pytest.raises(FileNotFoundError, match=r"gin file 'gin/hgrn2_1B.gin' not found .*did you mean gin/hgrn2_1b.gin"):
    train.parse_gin(["gin/hgrn2_1B.gin"], ["MODEL_DIR = '/tmp/x'"])
  gin.clear_config()


def test_a_missing_include_and_a_syntax_error_in_a_file_name_the_file(tmp_path):
  missing_include = tmp_path / "missing_include.gin"
  missing_include.write_text("include 'gin/models/tnl/9b.gin'\n")
  bad_line = tmp_path / "bad_line.gin"
  bad_line.write_text("include 'gin/smoke/tnl.gin'\nTRAIN_STEPS = 3 +\n")
  gin.clear_config()
  with pytest.raises(FileNotFoundError, match=r"gin/models/tnl/9b\.gin"):
    train.parse_gin([str(missing_include)], [])
  gin.clear_config()
  with pytest.raises(ValueError, match=rf"{re.escape(str(bad_line))}, line 2: .*'TRAIN_STEPS = 3 \+'"):
    train.parse_gin([str(bad_line)], [])
  gin.clear_config()


@pytest.mark.parametrize("value", ["/runs/x", "my_run"])
def test_an_unquoted_string_binding_is_named_with_how_to_quote_it(value):
  gin.clear_config()
  hint = re.escape("--gin.MODEL_DIR=\"'/runs/x'\"")
  with pytest.raises(ValueError, match=rf"binding 'MODEL_DIR = {value}' does not parse as gin.*{hint}"):
    train.parse_gin(["gin/smoke/llama.gin"], [f"MODEL_DIR = {value}"])
  gin.clear_config()


def test_missing_required_macro_fails_naming_it():
  gin.clear_config()
  with pytest.raises(ValueError, match="MODEL_DIR/macro.value set to `%gin.REQUIRED`"):
    train.parse_gin(["gin/smoke/llama.gin"], [])
  gin.clear_config()
