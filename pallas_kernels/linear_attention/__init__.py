"""Decay-scan linear attention: one API, several backends (see README.md in this folder)."""

from pallas_kernels.linear_attention.api import BACKENDS, linear_attention, linear_attention_qkv, linear_attention_step

__all__ = ["BACKENDS", "linear_attention", "linear_attention_qkv", "linear_attention_step"]
