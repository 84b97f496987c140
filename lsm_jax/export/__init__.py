"""Sharing models: Hugging Face export of milestones and import of Hugging Face LLaMA checkpoints.

  hf            export_hf (milestone -> transformers directory), import_llama (transformers LLaMA -> run directory)
  hf_tokenizer  tokenizer.json for cl100k and the byte tokenizer
  tensors       lsm_jax parameter paths -> PyTorch tensor names
  modeling_lsm.py, configuration_lsm.py   the PyTorch TNL / HGRN2 / cosFormer2 / hybrid stacks shipped inside exports
CLI: `python -m lsm_jax.export` (see __main__.py and docs/export.md).
"""

from lsm_jax.export.hf import ExportVerificationError, export_hf, import_llama
from lsm_jax.export.tensors import torch_state_dict

__all__ = ["ExportVerificationError", "export_hf", "import_llama", "torch_state_dict"]
