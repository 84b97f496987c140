"""Hugging Face configuration of lsm_jax's linear models (TNL, HGRN2, cosFormer2) and hybrid stacks; shipped inside
every export that needs remote code.

Plain transformers code (no lsm_jax import): the exporter copies this file next to config.json, which names it in
`auto_map`, so `AutoConfig.from_pretrained(dir, trust_remote_code=True)` finds it.
"""

try:  # transformers 5 names it PreTrainedConfig (PretrainedConfig is its deprecated alias), 4.x only PretrainedConfig
  from transformers import PreTrainedConfig as PretrainedConfig
except ImportError:
  from transformers import PretrainedConfig

LINEAR_ARCHS = ("tnl", "hgrn2", "cosformer2")
# Token mixers a layer can have (lsm_jax.layer_pattern.MIXERS); "llama" is softmax attention with RoPE.
MIXERS = ("llama", *LINEAR_ARCHS)


class LsmConfig(PretrainedConfig):
  """Shapes of an lsm_jax model (lsm_jax.models.ModelConfig under Hugging Face field names).

  arch: the architecture whose norms and channel mixer every layer has (RMSNorm with a gain and SwiGLU for
  "llama", SRMSNorm and SGLU for the linear ones) and, without `layer_mixers`, whose token mixer every layer has.
  layer_mixers: the token mixer of every layer of a hybrid stack, one of MIXERS per layer (the expanded layer
  pattern: ["hgrn2", "hgrn2", "hgrn2", "llama"] for "hgrn2*3,llama" over four layers).
  """

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
    rope_theta: float = 10000.0,
    layer_mixers: list[str] | None = None,
    initializer_range: float = 0.02,
    use_cache: bool = True,
    tie_word_embeddings: bool = True,
    **kwargs,
  ):
    if arch not in MIXERS:
      raise ValueError(f"LsmConfig.arch must be one of {MIXERS}; got {arch!r}")
    if layer_mixers is not None:
      layer_mixers = list(layer_mixers)
      unknown = sorted({mixer for mixer in layer_mixers if mixer not in MIXERS})
      if unknown or len(layer_mixers) != num_hidden_layers:
        raise ValueError(
          f"LsmConfig.layer_mixers must name one mixer of {MIXERS} for each of the {num_hidden_layers} layers; "
          f"got {layer_mixers!r}"
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
    self.rope_theta = rope_theta
    self.layer_mixers = layer_mixers
    self.initializer_range = initializer_range
    self.use_cache = use_cache
    super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
