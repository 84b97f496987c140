"""The four architectures of the study (LLaMA, TNL, HGRN2, cosFormer2) at the paper's 24 sizes."""

from lsm_jax.models import configs
from lsm_jax.models.configs import ARCHS, SIZES, ModelConfig, get_config
from lsm_jax.models.model import LanguageModel, build_model

__all__ = ["ARCHS", "SIZES", "LanguageModel", "ModelConfig", "build_model", "configs", "get_config"]
