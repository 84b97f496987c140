"""Hugging Face configuration of lsm_jax's linear models (TNL, HGRN2, cosFormer2); shipped inside every export.

Plain transformers code (no lsm_jax import): the exporter copies this file next to config.json, which names it in
`auto_map`, so `AutoConfig.from_pretrained(dir, trust_remote_code=True)` finds it.
"""

try:  # transformers 5 names it PreTrainedConfig (PretrainedConfig is its deprecated alias), 4.x only PretrainedConfig
  from transformers import PreTrainedConfig as PretrainedConfig
except ImportError:
  from transformers import PretrainedConfig

LINEAR_ARCHS = ("tnl", "hgrn2", "cosformer2")


class LsmConfig(PretrainedConfig):
  """Shapes of an lsm_jax linear model (lsm_jax.models.ModelConfig under Hugging Face field names)."""

  model_type = "lsm_jax"

  def __init__(
    self,
    arch: str = "tnl",
    vocab_size: int = 100280,
    hidden_size: int = 512,
    num_hidden_layers: int = 6,
    num_attention_heads: int = 4,
    head_dim: int = 128,
    intermediate_size: int = 1536,
    rms_norm_eps: float = 1e-6,
    lrpe_theta: float = 10000.0,
    tpe_max_timescale: float = 8192.0,
    initializer_range: float = 0.02,
    use_cache: bool = True,
    tie_word_embeddings: bool = True,
    **kwargs,
  ):
    if arch not in LINEAR_ARCHS:
      raise ValueError(
        f"LsmConfig.arch must be one of {LINEAR_ARCHS} (LLaMA exports as LlamaForCausalLM); got {arch!r}"
      )
    if num_attention_heads * head_dim != hidden_size:
      raise ValueError(
        f"LsmConfig needs num_attention_heads * head_dim == hidden_size; got {num_attention_heads} "
        f"* {head_dim} != {hidden_size}"
      )
    if not tie_word_embeddings:
      raise ValueError("lsm_jax models tie the output head to the embedding; tie_word_embeddings must be true")
    self.arch = arch
    self.vocab_size = vocab_size
    self.hidden_size = hidden_size
    self.num_hidden_layers = num_hidden_layers
    self.num_attention_heads = num_attention_heads
    self.head_dim = head_dim
    self.intermediate_size = intermediate_size
    self.rms_norm_eps = rms_norm_eps
    self.lrpe_theta = lrpe_theta
    self.tpe_max_timescale = tpe_max_timescale
    self.initializer_range = initializer_range
    self.use_cache = use_cache
    super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
