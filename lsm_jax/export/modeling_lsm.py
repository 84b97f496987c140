"""PyTorch implementation of lsm_jax's linear models (TNL, HGRN2, cosFormer2) and hybrid stacks for transformers.

Shipped inside every export of a linear model or a hybrid (config.json `auto_map` names it), so it imports only
torch, transformers and, when installed, fla; it never imports lsm_jax. It computes the forward of lsm_jax.models
exactly (arXiv 2406.16690 §2.2, Eqs. 9-18, with lsm_jax's resolution of the paper's open choices):

  x = Embed(tokens); [any cosFormer2 layer: x = x + TPE(x)]
  per layer: x = x + TokenMixer(Norm(x)); x = x + down(act(gate(n)) ⊙ up(n)), n = Norm(x)
  logits = Norm(x) @ Embedᵀ                                                                       (tied head)

Norm and act are those of `config.arch` in every layer: SRMSNorm and the identity (SGLU) for the linear
architectures, RMSNorm with a gain and SiLU (SwiGLU) for LLaMA. Each layer's token mixer is `config.layer_mixers[l]`
(a hybrid stack) or the architecture's own. A mixer's per-layer constants count its own layers only: TNL's depth
runs over the TNL layers, HGRN2's lower bounds over the HGRN2 layers.

  TNL         q = SiLU(x W_q), k = SiLU(x W_k), v = x W_v; λ_h = exp(-s_h (1 - l/(L-1) + 1e-5)), s_h ALiBi slopes
  cosFormer2  TNL's projections with LRPE: q̃ = [q cos θt, q sin θt] (θ_c = 10000^(-2c/D) on half the channels,
              0 on the rest), the same for k, and no decay
  both        y = (SRMSNorm(concat_h o) ⊙ sigmoid(x W_gdown W_gup)) W_o
  HGRN2       v, q, f = x W_v, x W_q, x W_f; q = SiLU(q); λ = lb_l + (1 - lb_l) σ(f); k = 1 - λ;
              y = SRMSNorm(concat_h o) W_o; lb = exclusive cumsum over layers of softmax(lower_bound_logits)
  linear mixers S_t = diag(λ_t) S_{t-1} + k_tᵀ v_t, o_t = q_t S_t (per head; no scaling, no denominator)
  LLaMA       q, k = RoPE(x W_q), RoPE(x W_k), v = x W_v; y = concat_h softmax(q kᵀ / √D + causal mask) v W_o

Two paths compute the recurrence: a chunked parallel form for prompts (fla's `chunk_gla` Triton kernel on CUDA when
fla is installed, plain torch otherwise) and a one-token recurrent step for generation, which carries per linear layer
the state S [B, H, D, D] (and cosFormer2's TPE state [B, D]) in an `LsmState` cache; a softmax layer's cache holds its
keys and values. Left padding (attention_mask 0) is skipped: padded tokens add nothing to any state, no query attends
to them and positions count real tokens only.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lsm import LsmConfig

try:  # fla's fused chunked kernel (optional; CUDA only)
  from fla.ops.gla import chunk_gla as _fla_chunk_gla
except ImportError:
  _fla_chunk_gla = None

CHUNK_SIZE = 64
SOFTMAX_MIXER = "llama"  # the layer_mixers name of softmax attention (LLaMA's token mixer)
# transformers 5.x renamed the cache argument and output field from past_key_values to cache.
CACHE_FIELD = (
  "cache" if "cache" in {field.name for field in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
)


def simple_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
  """SRMSNorm: x / sqrt(mean(x²) + eps) over the last axis, in fp32, without a gain."""
  x32 = x.float()
  return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def alibi_slopes(num_heads: int) -> list[float]:
  """ALiBi head slopes 2^(-8(h+1)/H); for H not a power of two, those of the nearest lower power c followed by
  every other slope of 2c."""

  def power_of_two(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  if math.log2(num_heads).is_integer():
    return power_of_two(num_heads)
  closest = 2 ** math.floor(math.log2(num_heads))
  return power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]


def _fla_usable(*tensors: torch.Tensor) -> bool:
  return _fla_chunk_gla is not None and all(t.is_cuda for t in tensors)


def _fla_linear_attention(q, k, v, log_decay, initial_state):
  """fla's chunk_gla on [B, T, H, D] inputs (q, k in v's dtype, log-decays and states fp32) with scale 1 (our
  attention is unscaled). fla versions that still have `head_first` default it to True: it is set to False."""
  keywords = {"head_first": False} if "head_first" in inspect.signature(_fla_chunk_gla).parameters else {}
  out, state = _fla_chunk_gla(
    q=q.to(v.dtype),
    k=k.to(v.dtype),
    v=v,
    g=log_decay.float(),
    scale=1.0,
    initial_state=None if initial_state is None else initial_state.float(),
    output_final_state=True,
    **keywords,
  )
  return out.float(), state.float()


def chunked_linear_attention(q, k, v, log_decay, initial_state=None, chunk_size: int = CHUNK_SIZE):
  """o_t = q_t S_t with S_t = diag(exp(log_decay_t)) S_{t-1} + k_tᵀ v_t, in chunks, fp32.

  q, k, log_decay [B, T, H, Dk]; v [B, T, H, Dv]; initial_state [B, H, Dk, Dv] or None.
  Returns (o [B, T, H, Dv] fp32, final state [B, H, Dk, Dv] fp32). Within a chunk every decay factor is
  exp(b_t - b_s) with b the cumulative log-decay and s <= t, so no factor exceeds one.
  """
  if _fla_usable(q, k, v):
    return _fla_linear_attention(q, k, v, log_decay, initial_state)
  q, k, v, log_decay = (t.float().transpose(1, 2) for t in (q, k, v, log_decay))  # [B, H, T, D]
  batch, heads, length, dim_k = q.shape
  state = q.new_zeros(batch, heads, dim_k, v.shape[-1]) if initial_state is None else initial_state.float()
  outputs = []
  for start in range(0, length, chunk_size):
    chunk = slice(start, start + chunk_size)
    q_c, k_c, v_c = q[:, :, chunk], k[:, :, chunk], v[:, :, chunk]
    cumulative = log_decay[:, :, chunk].cumsum(2)  # b_t, inclusive
    size = q_c.shape[2]
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    pair_decay = (
      (cumulative[:, :, :, None, :] - cumulative[:, :, None, :, :])
      .masked_fill(~causal[:, :, None], float("-inf"))
      .exp()
    )  # [B, H, t, s, Dk]
    scores = torch.einsum("bhtk,bhsk,bhtsk->bhts", q_c, k_c, pair_decay)
    outputs.append((q_c * cumulative.exp()) @ state + scores @ v_c)
    last = cumulative[:, :, -1:]
    state = last.transpose(2, 3).exp() * state + (k_c * (last - cumulative).exp()).transpose(2, 3) @ v_c
  return torch.cat(outputs, dim=2).transpose(1, 2), state


def linear_attention_step(q, k, v, log_decay, state):
  """One token: q, k, log_decay [B, H, Dk], v [B, H, Dv], state [B, H, Dk, Dv] -> (o [B, H, Dv], state), fp32."""
  state = log_decay.float().exp()[..., None] * state + k.float()[..., :, None] * v.float()[..., None, :]
  return torch.einsum("bhk,bhkv->bhv", q.float(), state), state


@dataclasses.dataclass
class LsmState:
  """Generation cache: per layer the recurrent state (linear) or the (keys, values) [B, T, H, D] (softmax),
  cosFormer2's TPE state, each row's next position and, with softmax layers, which cached tokens are real."""

  layers: list
  next_position: torch.Tensor  # [B] int64: real (unpadded) tokens seen per row
  tpe: torch.Tensor | None = None
  seen_tokens: int = 0
  key_mask: torch.Tensor | None = None  # [B, seen_tokens] bool: False marks padding

  def get_seq_length(self, layer_idx: int = 0) -> int:
    del layer_idx
    return self.seen_tokens


class ToeplitzPositionalEncoding(nn.Module):
  """cosFormer2's TPE: h_t = λ ⊙ h_{t-1} + x_t W, y_t = x_t + h_t Wᵀ, λ_c = exp(-1/τ_c), τ log-spaced in
  [1, tpe_max_timescale]; `up_proj.weight` is Wᵀ [e, d] (the down projection is tied to it)."""

  def __init__(self, hidden_size: int, dim: int, max_timescale: float):
    super().__init__()
    self.up_proj = nn.Linear(hidden_size, dim, bias=False)
    self.dim, self.max_timescale = dim, max_timescale

  def log_decay(self, device) -> torch.Tensor:
    timescales = torch.exp(
      torch.linspace(0.0, math.log(self.max_timescale), self.dim, dtype=torch.float32, device=device)
    )
    return -1.0 / timescales

  def forward(self, x, mask, state):
    """x [B, T, d], mask [B, T] (1 real, 0 padding), state [B, e] or None -> (y, final state [B, e])."""
    weight = self.up_proj.weight.float()
    inputs = F.linear(x.float(), weight) * mask[..., None]  # [B, T, e]
    log_decay = mask[..., None] * self.log_decay(x.device)  # padding keeps the state as it is
    state = inputs.new_zeros(x.shape[0], self.dim) if state is None else state
    outputs = []
    for start in range(0, x.shape[1], CHUNK_SIZE):
      u, cumulative = inputs[:, start : start + CHUNK_SIZE], log_decay[:, start : start + CHUNK_SIZE].cumsum(1)
      size = u.shape[1]
      causal = torch.ones(size, size, dtype=torch.bool, device=x.device).tril()
      pair_decay = (
        (cumulative[:, :, None] - cumulative[:, None, :]).masked_fill(~causal[:, :, None], float("-inf")).exp()
      )  # [B, t, s, e]
      hidden = cumulative.exp() * state[:, None] + torch.einsum("btse,bse->bte", pair_decay, u)
      outputs.append(hidden)
      state = hidden[:, -1]
    hidden = torch.cat(outputs, dim=1)
    return x + (hidden @ weight).to(x.dtype), state


class LinearAttentionMixer(nn.Module):
  """TNL (with decay) and cosFormer2 (LRPE, no decay): q/k/v projections, low-rank output gate, output norm.
  `rank` is the layer's index among the `count` layers of its mixer (TNL's decay depth runs over them)."""

  def __init__(self, config: LsmConfig, mixer: str, rank: int, count: int):
    super().__init__()
    d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
    self.config, self.mixer, self.rank, self.count = config, mixer, rank, count
    self.q_proj = nn.Linear(d, heads * head_dim, bias=False)
    self.k_proj = nn.Linear(d, heads * head_dim, bias=False)
    self.v_proj = nn.Linear(d, heads * head_dim, bias=False)
    self.o_proj = nn.Linear(heads * head_dim, d, bias=False)
    self.output_gate = nn.Module()
    self.output_gate.down_proj = nn.Linear(d, head_dim, bias=False)
    self.output_gate.up_proj = nn.Linear(head_dim, d, bias=False)

  def _log_decay(self, like: torch.Tensor) -> torch.Tensor:
    """[H] per-head log-decays of this layer (zeros for cosFormer2)."""
    config = self.config
    if self.mixer == "cosformer2":
      return like.new_zeros(config.num_attention_heads)
    slopes = torch.tensor(alibi_slopes(config.num_attention_heads), dtype=torch.float32, device=like.device)
    depth = torch.tensor(self.rank / max(self.count - 1, 1), dtype=torch.float32)
    return -slopes * (1.0 - depth + 1e-5)

  def _lrpe(self, x, positions):
    half = x.shape[-1] // 2
    rotating = self.config.lrpe_theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) * 2.0 / x.shape[-1])
    frequencies = torch.cat([rotating, rotating.new_zeros(x.shape[-1] - half)])
    angles = positions.float()[:, :, None, None] * frequencies
    return torch.cat([x.float() * angles.cos(), x.float() * angles.sin()], dim=-1)

  def forward(self, x, *, mask, positions, lower_bounds, key_mask, state):
    del lower_bounds, key_mask
    batch, length, _ = x.shape
    heads = self.config.num_attention_heads
    q = F.silu(self.q_proj(x)).view(batch, length, heads, -1)
    k = F.silu(self.k_proj(x)).view(batch, length, heads, -1)
    v = self.v_proj(x).view(batch, length, heads, -1)
    if self.mixer == "cosformer2":
      q, k = self._lrpe(q, positions), self._lrpe(k, positions)
    k = k * mask[:, :, None, None]
    log_decay = (mask[:, :, None, None] * self._log_decay(x)[:, None]).expand(*k.shape)
    attended, state = _attend(q, k, v, log_decay, state)
    normed = simple_rms_norm(attended.reshape(batch, length, -1), self.config.rms_norm_eps).to(x.dtype)
    gate = torch.sigmoid(self.output_gate.up_proj(self.output_gate.down_proj(x)))
    return self.o_proj(normed * gate), state


class HGRN2Mixer(nn.Module):
  """HGRN2: forget gate with a per-layer lower bound (row `rank` of the HGRN2 layers' bounds), k = 1 - λ, output
  norm, no output gate."""

  def __init__(self, config: LsmConfig, mixer: str, rank: int, count: int):
    super().__init__()
    del mixer, count
    d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
    self.config, self.rank = config, rank
    self.v_proj = nn.Linear(d, heads * head_dim, bias=False)
    self.q_proj = nn.Linear(d, heads * head_dim, bias=False)
    self.f_proj = nn.Linear(d, heads * head_dim, bias=False)
    self.o_proj = nn.Linear(heads * head_dim, d, bias=False)

  def forward(self, x, *, mask, positions, lower_bounds, key_mask, state):
    del positions, key_mask
    batch, length, _ = x.shape
    shape = (batch, length, self.config.num_attention_heads, -1)
    v = self.v_proj(x).view(shape)
    q = F.silu(self.q_proj(x)).view(shape)
    log_sigmoid = F.logsigmoid(self.f_proj(x).float()).view(shape)
    if self.rank == 0:  # lower bound 0: λ = σ(f) exactly
      log_decay = log_sigmoid
    else:
      bound = lower_bounds[self.rank].view(shape[2], -1)
      log_decay = torch.logaddexp(bound.log(), torch.log1p(-bound) + log_sigmoid)
    log_decay = log_decay * mask[:, :, None, None]
    k = (-torch.expm1(log_decay)).to(v.dtype)  # zero where masked
    attended, state = _attend(q, k, v, log_decay, state)
    normed = simple_rms_norm(attended.reshape(batch, length, -1), self.config.rms_norm_eps).to(x.dtype)
    return self.o_proj(normed), state


def _attend(q, k, v, log_decay, state):
  """Recurrent step for one token with a cached state, the chunked form otherwise; o in fp32."""
  if q.shape[1] == 1 and state is not None:
    out, state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], state)
    return out[:, None], state
  return chunked_linear_attention(q, k, v, log_decay, state)


def rotary_embedding(x, positions, theta: float):
  """RoPE on x [B, T, H, D] at positions [B, T]: rotates the (first half, second half) channel pairs by angles
  position · theta^(-2j/D), in fp32."""
  half = x.shape[-1] // 2
  frequencies = theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) * 2.0 / x.shape[-1])
  angles = positions.float()[:, :, None, None] * frequencies
  cos, sin = angles.cos(), angles.sin()
  x1, x2 = x.float().chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class SoftmaxAttentionMixer(nn.Module):
  """LLaMA's attention in a hybrid stack: RoPE on q and k, causal softmax attention over the real tokens (scale
  1/√D), no output norm or gate. Its cache is the keys (after RoPE) and values of every token seen."""

  def __init__(self, config: LsmConfig, mixer: str, rank: int, count: int):
    super().__init__()
    del mixer, rank, count
    d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
    self.config = config
    self.q_proj = nn.Linear(d, heads * head_dim, bias=False)
    self.k_proj = nn.Linear(d, heads * head_dim, bias=False)
    self.v_proj = nn.Linear(d, heads * head_dim, bias=False)
    self.o_proj = nn.Linear(heads * head_dim, d, bias=False)

  def forward(self, x, *, mask, positions, lower_bounds, key_mask, state):
    """key_mask [B, past + T] bool: the real tokens among the cached and the new ones."""
    del mask, lower_bounds
    batch, length, _ = x.shape
    shape = (batch, length, self.config.num_attention_heads, -1)
    q = rotary_embedding(self.q_proj(x).view(shape), positions, self.config.rope_theta)
    k = rotary_embedding(self.k_proj(x).view(shape), positions, self.config.rope_theta)
    v = self.v_proj(x).view(shape)
    if state is not None:
      k, v = torch.cat([state[0], k], dim=1), torch.cat([state[1], v], dim=1)
    query_index = torch.arange(k.shape[1] - length, k.shape[1], device=x.device)[:, None]
    key_index = torch.arange(k.shape[1], device=x.device)[None]
    # A padded query also sees itself, so that its (unused) output stays finite: NaN there would reach the real
    # tokens through the next linear layer's masked products (0 · NaN).
    visible = ((key_index <= query_index) & key_mask[:, None, :]) | (key_index == query_index)
    attended = F.scaled_dot_product_attention(
      q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible[:, None]
    )
    return self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1)), (k, v)


_TOKEN_MIXERS = {
  SOFTMAX_MIXER: SoftmaxAttentionMixer,
  "tnl": LinearAttentionMixer,
  "hgrn2": HGRN2Mixer,
  "cosformer2": LinearAttentionMixer,
}


class RMSNorm(nn.Module):
  """SRMSNorm, times a learned gain `weight` where the architecture has one (LLaMA)."""

  def __init__(self, hidden_size: int, eps: float, gain: bool):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(hidden_size)) if gain else None

  def forward(self, x):
    normed = simple_rms_norm(x, self.eps)
    return normed if self.weight is None else normed * self.weight.to(x.dtype)


class ChannelMixer(nn.Module):
  """GLU: down(act(gate(x)) ⊙ up(x)), act = SiLU (SwiGLU, LLaMA) or the identity (SGLU, the linear models)."""

  def __init__(self, config: LsmConfig):
    super().__init__()
    self.swish = config.arch == SOFTMAX_MIXER
    self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

  def forward(self, x):
    gate = self.gate_proj(x)
    return self.down_proj((F.silu(gate) if self.swish else gate) * self.up_proj(x))


def layer_mixers(config: LsmConfig) -> list[str]:
  """The token mixer of every layer: config.layer_mixers, or the architecture's own in every layer."""
  return list(config.layer_mixers or [config.arch] * config.num_hidden_layers)


class LsmBlock(nn.Module):
  """Pre-norm residual block with the token mixer `mixer`, the `rank`-th of the stack's `count` layers of it."""

  def __init__(self, config: LsmConfig, mixer: str, rank: int, count: int):
    super().__init__()
    gain = config.arch == SOFTMAX_MIXER
    self.token_mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, gain)
    self.token_mixer = _TOKEN_MIXERS[mixer](config, mixer, rank, count)
    self.channel_mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, gain)
    self.channel_mixer = ChannelMixer(config)

  def forward(self, x, **mixer_inputs):
    mixed, state = self.token_mixer(self.token_mixer_norm(x), **mixer_inputs)
    x = x + mixed
    return x + self.channel_mixer(self.channel_mixer_norm(x)), state


class LsmPreTrainedModel(PreTrainedModel):
  config_class = LsmConfig
  base_model_prefix = "lsm"
  _no_split_modules = ["LsmBlock"]
  supports_gradient_checkpointing = False

  def _init_weights(self, module):
    """lsm_jax's initialization: normal(0, initializer_range) for linears and the embedding, unit norm gains,
    zero lower-bound logits."""
    std = self.config.initializer_range
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, RMSNorm) and module.weight is not None:
      nn.init.ones_(module.weight)
    elif isinstance(module, LsmForCausalLM) and module.lower_bound_logits is not None:
      nn.init.zeros_(module.lower_bound_logits)


class LsmForCausalLM(LsmPreTrainedModel, GenerationMixin):
  """TNL, HGRN2 or cosFormer2 (config.arch), or a hybrid stack (config.layer_mixers), with the tied vocabulary
  head."""

  def __init__(self, config: LsmConfig):
    super().__init__(config)
    mixers = layer_mixers(config)
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    self.tpe = (
      ToeplitzPositionalEncoding(config.hidden_size, config.head_dim, config.tpe_max_timescale)
      if "cosformer2" in mixers
      else None
    )
    hgrn2_layers = mixers.count("hgrn2")
    self.lower_bound_logits = nn.Parameter(torch.zeros(hgrn2_layers, config.hidden_size)) if hgrn2_layers else None
    self.has_softmax_layers = SOFTMAX_MIXER in mixers
    self.layers = nn.ModuleList(
      [LsmBlock(config, mixer, mixers[:index].count(mixer), mixers.count(mixer)) for index, mixer in enumerate(mixers)]
    )
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.arch == SOFTMAX_MIXER)
    self.post_init()

  def get_input_embeddings(self):
    return self.embed_tokens

  def set_input_embeddings(self, value):
    self.embed_tokens = value

  def _lower_bounds(self):
    """[HGRN2 layers, d] lower bounds: exclusive cumsum over those layers of the softmax of the learned logits."""
    weights = torch.softmax(self.lower_bound_logits.float(), dim=0)
    return weights.cumsum(0) - weights

  def forward(
    self,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    cache: LsmState | None = None,
    past_key_values: LsmState | None = None,
    use_cache: bool | None = None,
    labels: torch.LongTensor | None = None,
    return_dict: bool | None = None,
    **kwargs,
  ):
    """input_ids [B, T] -> logits [B, T, V] fp32. attention_mask [B, T or past + T]: 0 marks (left) padding.
    A cache (an LsmState, under either name) continues from its states; anything else starts fresh."""
    del kwargs, return_dict
    state = cache if isinstance(cache, LsmState) else past_key_values
    state = state if isinstance(state, LsmState) else None
    batch, length = input_ids.shape
    mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, -length:]).to(torch.float32)
    start = state.next_position if state is not None else input_ids.new_zeros(batch)
    positions = (start[:, None] + mask.long().cumsum(1) - 1).clamp(min=0)
    key_mask = None
    if self.has_softmax_layers:
      key_mask = mask.bool() if state is None else torch.cat([state.key_mask, mask.bool()], dim=1)
    x = self.embed_tokens(input_ids)
    tpe_state = None
    if self.tpe is not None:
      x, tpe_state = self.tpe(x, mask, state.tpe if state is not None else None)
    lower_bounds = self._lower_bounds() if self.lower_bound_logits is not None else None
    layer_states = []
    for index, block in enumerate(self.layers):
      x, layer_state = block(
        x,
        mask=mask,
        positions=positions,
        lower_bounds=lower_bounds,
        key_mask=key_mask,
        state=state.layers[index] if state is not None else None,
      )
      layer_states.append(layer_state)
    hidden = self.norm(x)
    logits = F.linear(hidden, self.embed_tokens.weight).float()
    loss = None
    if labels is not None:
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    new_state = None
    if use_cache if use_cache is not None else self.config.use_cache:
      new_state = LsmState(
        layers=layer_states,
        next_position=start + mask.long().sum(1),
        tpe=tpe_state,
        seen_tokens=(state.seen_tokens if state is not None else 0) + length,
        key_mask=key_mask,
      )
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: new_state})

  def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
    """The prompt on the first call, then only the newest token with the carried LsmState; every token at every
    step with use_cache=False."""
    use_cache = kwargs.get("use_cache") is not False
    state = kwargs.get("cache")
    state = state if isinstance(state, LsmState) else kwargs.get("past_key_values")
    if use_cache and isinstance(state, LsmState):
      input_ids = input_ids[:, state.seen_tokens :]
    else:
      state = None
    return {"input_ids": input_ids, "attention_mask": attention_mask, CACHE_FIELD: state, "use_cache": use_cache}
