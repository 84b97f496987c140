"""PyTorch implementation of lsm_jax's linear models (TNL, HGRN2, cosFormer2) for Hugging Face transformers.

Shipped inside every export of a linear model (config.json `auto_map` names it), so it imports only torch,
transformers and, when installed, fla; it never imports lsm_jax. It computes the forward of lsm_jax.models exactly
(arXiv 2406.16690 §2.2, Eqs. 9-18, with lsm_jax's resolution of the paper's open choices):

  x = Embed(tokens); [cosFormer2: x = x + TPE(x)]
  per layer: x = x + TokenMixer(SRMSNorm(x)); x = x + down(gate(n) ⊙ up(n)), n = SRMSNorm(x)   (SGLU, no activation)
  logits = SRMSNorm(x) @ Embedᵀ                                                                   (tied head)

  TNL         q = SiLU(x W_q), k = SiLU(x W_k), v = x W_v; λ_h = exp(-s_h (1 - l/(L-1) + 1e-5)), s_h ALiBi slopes
  cosFormer2  TNL's projections with LRPE: q̃ = [q cos θt, q sin θt] (θ_c = 10000^(-2c/D) on half the channels,
              0 on the rest), the same for k, and no decay
  both        y = (SRMSNorm(concat_h o) ⊙ sigmoid(x W_gdown W_gup)) W_o
  HGRN2       v, q, f = x W_v, x W_q, x W_f; q = SiLU(q); λ = lb_l + (1 - lb_l) σ(f); k = 1 - λ;
              y = SRMSNorm(concat_h o) W_o; lb = exclusive cumsum over layers of softmax(lower_bound_logits)
  every mixer S_t = diag(λ_t) S_{t-1} + k_tᵀ v_t, o_t = q_t S_t (per head; no scaling, no denominator)

Two paths compute the recurrence: a chunked parallel form for prompts (fla's `chunk_gla` Triton kernel on CUDA when
fla is installed, plain torch otherwise) and a one-token recurrent step for generation, which carries per layer the
state S [B, H, D, D] (and cosFormer2's TPE state [B, D]) in an `LsmState` cache. Left padding (attention_mask 0)
is skipped: padded tokens add nothing to any state and positions count real tokens only.
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
  """Generation cache: per-layer recurrent states, cosFormer2's TPE state and each row's next position."""

  layers: list
  next_position: torch.Tensor  # [B] int64: real (unpadded) tokens seen per row
  tpe: torch.Tensor | None = None
  seen_tokens: int = 0

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
  """TNL (with decay) and cosFormer2 (LRPE, no decay): q/k/v projections, low-rank output gate, output norm."""

  def __init__(self, config: LsmConfig, layer_idx: int):
    super().__init__()
    d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
    self.config, self.layer_idx = config, layer_idx
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
    if config.arch == "cosformer2":
      return like.new_zeros(config.num_attention_heads)
    slopes = torch.tensor(alibi_slopes(config.num_attention_heads), dtype=torch.float32, device=like.device)
    depth = torch.tensor(self.layer_idx / max(config.num_hidden_layers - 1, 1), dtype=torch.float32)
    return -slopes * (1.0 - depth + 1e-5)

  def _lrpe(self, x, positions):
    half = x.shape[-1] // 2
    rotating = self.config.lrpe_theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) * 2.0 / x.shape[-1])
    frequencies = torch.cat([rotating, rotating.new_zeros(x.shape[-1] - half)])
    angles = positions.float()[:, :, None, None] * frequencies
    return torch.cat([x.float() * angles.cos(), x.float() * angles.sin()], dim=-1)

  def forward(self, x, *, mask, positions, lower_bound, state):
    del lower_bound
    batch, length, _ = x.shape
    heads = self.config.num_attention_heads
    q = F.silu(self.q_proj(x)).view(batch, length, heads, -1)
    k = F.silu(self.k_proj(x)).view(batch, length, heads, -1)
    v = self.v_proj(x).view(batch, length, heads, -1)
    if self.config.arch == "cosformer2":
      q, k = self._lrpe(q, positions), self._lrpe(k, positions)
    k = k * mask[:, :, None, None]
    log_decay = (mask[:, :, None, None] * self._log_decay(x)[:, None]).expand(*k.shape)
    attended, state = _attend(q, k, v, log_decay, state)
    normed = simple_rms_norm(attended.reshape(batch, length, -1), self.config.rms_norm_eps).to(x.dtype)
    gate = torch.sigmoid(self.output_gate.up_proj(self.output_gate.down_proj(x)))
    return self.o_proj(normed * gate), state


class HGRN2Mixer(nn.Module):
  """HGRN2: forget gate with a per-layer lower bound, k = 1 - λ, output norm, no output gate."""

  def __init__(self, config: LsmConfig, layer_idx: int):
    super().__init__()
    d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
    self.config, self.layer_idx = config, layer_idx
    self.v_proj = nn.Linear(d, heads * head_dim, bias=False)
    self.q_proj = nn.Linear(d, heads * head_dim, bias=False)
    self.f_proj = nn.Linear(d, heads * head_dim, bias=False)
    self.o_proj = nn.Linear(heads * head_dim, d, bias=False)

  def forward(self, x, *, mask, positions, lower_bound, state):
    del positions
    batch, length, _ = x.shape
    shape = (batch, length, self.config.num_attention_heads, -1)
    v = self.v_proj(x).view(shape)
    q = F.silu(self.q_proj(x)).view(shape)
    log_sigmoid = F.logsigmoid(self.f_proj(x).float()).view(shape)
    if self.layer_idx == 0:  # lower bound 0: λ = σ(f) exactly
      log_decay = log_sigmoid
    else:
      bound = lower_bound.view(shape[2], -1)
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


class ChannelMixer(nn.Module):
  """SGLU: down(gate(x) ⊙ up(x)), no activation."""

  def __init__(self, config: LsmConfig):
    super().__init__()
    self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

  def forward(self, x):
    return self.down_proj(self.gate_proj(x) * self.up_proj(x))


class LsmBlock(nn.Module):
  def __init__(self, config: LsmConfig, layer_idx: int):
    super().__init__()
    self.eps = config.rms_norm_eps
    mixer = HGRN2Mixer if config.arch == "hgrn2" else LinearAttentionMixer
    self.token_mixer = mixer(config, layer_idx)
    self.channel_mixer = ChannelMixer(config)

  def forward(self, x, **mixer_inputs):
    mixed, state = self.token_mixer(simple_rms_norm(x, self.eps), **mixer_inputs)
    x = x + mixed
    return x + self.channel_mixer(simple_rms_norm(x, self.eps)), state


class LsmPreTrainedModel(PreTrainedModel):
  config_class = LsmConfig
  base_model_prefix = "lsm"
  _no_split_modules = ["LsmBlock"]
  supports_gradient_checkpointing = False

  def _init_weights(self, module):
    """lsm_jax's initialization: normal(0, initializer_range) for linears and the embedding, zero lower-bound
    logits."""
    std = self.config.initializer_range
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, LsmForCausalLM) and module.lower_bound_logits is not None:
      nn.init.zeros_(module.lower_bound_logits)


class LsmForCausalLM(LsmPreTrainedModel, GenerationMixin):
  """TNL, HGRN2 or cosFormer2 (config.arch) with the tied vocabulary head."""

  def __init__(self, config: LsmConfig):
    super().__init__(config)
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    self.tpe = (
      ToeplitzPositionalEncoding(config.hidden_size, config.head_dim, config.tpe_max_timescale)
      if config.arch == "cosformer2"
      else None
    )
    self.lower_bound_logits = (
      nn.Parameter(torch.zeros(config.num_hidden_layers, config.hidden_size)) if config.arch == "hgrn2" else None
    )
    self.layers = nn.ModuleList([LsmBlock(config, index) for index in range(config.num_hidden_layers)])
    self.post_init()

  def get_input_embeddings(self):
    return self.embed_tokens

  def set_input_embeddings(self, value):
    self.embed_tokens = value

  def _lower_bounds(self):
    """[L, d] HGRN2 lower bounds: exclusive cumsum over layers of the softmax of the learned logits."""
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
        lower_bound=lower_bounds[index] if lower_bounds is not None else None,
        state=state.layers[index] if state is not None else None,
      )
      layer_states.append(layer_state)
    hidden = simple_rms_norm(x, self.config.rms_norm_eps)
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
      )
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: new_state})

  def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
    """The prompt on the first call, then only the newest token with the carried LsmState."""
    state = kwargs.get("cache")
    state = state if isinstance(state, LsmState) else kwargs.get("past_key_values")
    if isinstance(state, LsmState):
      input_ids = input_ids[:, state.seen_tokens :]
    else:
      state = None
    return {"input_ids": input_ids, "attention_mask": attention_mask, CACHE_FIELD: state, "use_cache": True}
