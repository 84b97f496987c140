"""The package as a user installs it: a wheel built from this checkout, installed elsewhere, trains a smoke model
from a directory that holds no gin/ of its own (the configs resolve from the installed package)."""

import configparser
import glob
import json
import os
import re
import subprocess
import sys

import pytest
from packaging.version import Version

from lsm_jax import train

REPO_ROOT = train.REPO_ROOT


def _run(command, **kwargs):
  result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
  assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
  return result


@pytest.mark.slow  # builds a wheel, installs it into a directory, then one CLI training process
def test_training_from_an_installed_wheel_outside_the_checkout(tmp_path):
  wheel_dir, site, elsewhere = tmp_path / "wheel", tmp_path / "site", tmp_path / "elsewhere"
  elsewhere.mkdir()
  _run(
    [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", REPO_ROOT, "-w", str(wheel_dir)]
  )
  (wheel,) = glob.glob(str(wheel_dir / "lsm_jax-*.whl"))
  _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), wheel])
  environment = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  environment["PYTHONPATH"] = str(site)  # ahead of the editable install of this checkout

  located = _run(
    [sys.executable, "-c", "import lsm_jax.train as t; print(t.__file__); print(t.CONFIG_ROOT)"],
    cwd=elsewhere,
    env=environment,
  ).stdout.split()
  assert located[0].startswith(str(site)) and located[1] == str(site / "lsm_jax")

  model_dir = tmp_path / "run"
  _run(
    [
      sys.executable,
      "-m",
      "lsm_jax.train",
      "--gin_file=gin/smoke/hgrn2.gin",
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.TRAIN_STEPS=2",
      "--gin_bindings=trainer.train.sample_tokens = 0",
    ],
    cwd=elsewhere,
    env=environment,
  )
  with open(model_dir / "metrics.jsonl", encoding="utf-8") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps[-1] == 2


def _versions(text, operator):
  """{normalized name: version} of the `name<operator>version` lines of a requirements text."""
  pattern = rf"^([\w.-]+){re.escape(operator)}([\d.]+)"
  return {re.sub(r"[-_.]+", "-", name).lower(): Version(version) for name, version in re.findall(pattern, text, re.M)}


def test_the_minimum_versions_file_pins_exactly_the_floors_of_setup_cfg():
  """requirements/minimum.txt, the versions the suite is checked at, must move with every floor of setup.cfg."""
  config = configparser.ConfigParser()
  config.read(os.path.join(REPO_ROOT, "setup.cfg"))
  extras = config["options.extras_require"]
  floors = _versions(config["options"]["install_requires"] + extras["eval"] + extras["test"], ">=")
  with open(os.path.join(REPO_ROOT, "requirements", "minimum.txt"), encoding="utf-8") as f:
    pins = _versions(f.read(), "==")
  assert pins.pop("jaxlib") == pins["jax"]
  assert pins == floors
