"""Build hook: the wheel carries the top-level gin/ configs inside lsm_jax/ so an installed package finds them.

Metadata lives in setup.cfg. In a checkout (editable install included) lsm_jax.train resolves gin/ from the
repository root; from a wheel it resolves lsm_jax/gin/.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithGinConfigs(build_py):
  def run(self):
    super().run()
    if not getattr(self, "editable_mode", False):
      shutil.copytree("gin", os.path.join(self.build_lib, "lsm_jax", "gin"), dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithGinConfigs})
