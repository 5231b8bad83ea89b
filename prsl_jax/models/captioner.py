"""ViT + GPT-2 image captioner in flax.linen, numerically matching transformers'
PyTorch VisionEncoderDecoderModel (ViTModel encoder, GPT2LMHeadModel decoder
with cross-attention), e.g. nlpconnect/vit-gpt2-image-captioning.

  encoder: NHWC images in [0, 1] -> (x - mean) / std -> patch conv (with bias)
           -> [CLS; patches] + positions -> pre-LN layers -> layernorm
           (-> pooler, kept for exact export, unused by captioning)
  bridge:  enc_to_dec_proj (Linear) when the hidden sizes differ and the
           decoder has no cross_attention_hidden_size, as transformers does
  decoder: wte(ids) + wpe(positions) -> blocks [causal self-attention,
           cross-attention to the encoder states, MLP], pre-LN -> ln_f
           -> LM head (tied to wte, or its own lm_head)

Pixel normalisation lives inside the model so that attacks, budgets and data
pipelines all work on [0, 1] pixels at the model's resolution.

`Captioner` is the static part of a model: its config, hashable and equal by
value, so two checkpoints of one architecture share every compiled function.
Params are a plain pytree passed as an argument, never stored in it. Top-level
param keys: 'encoder', 'decoder' and, when the widths differ,
'enc_to_dec_proj'. `key_map` lists every HF state-dict name.

`dtype` is the compute dtype; params are always float32, attention softmax is
float32 and logits are returned in float32.

Generation (greedy, beam search) with a key/value cache: prsl_jax.models.generation.
"""

import dataclasses
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from prsl_jax.models import generation
from prsl_jax.models import layers

# ViTImageProcessor's defaults (and nlpconnect/vit-gpt2-image-captioning's).
VIT_MEAN = (0.5, 0.5, 0.5)
VIT_STD = (0.5, 0.5, 0.5)
# transformers' GenerationConfig.max_length default.
HF_DEFAULT_MAX_LENGTH = 20



@dataclasses.dataclass(frozen=True)
class ViTEncoderConfig:
  """transformers' ViTConfig fields that change the computation."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  qkv_bias: bool = True
  # ViTModel's pooler (dense + pooler_act on the CLS state). Captioning does not
  # use it; it is kept so a checkpoint that has it exports unchanged.
  add_pooling_layer: bool = True
  pooler_output_size: Optional[int] = None  # None: hidden_size
  pooler_act: str = "tanh"
  # Pixel statistics on [0, 1] pixels (preprocessor_config.json).
  image_mean: tuple[float, ...] = VIT_MEAN
  image_std: tuple[float, ...] = VIT_STD

  @property
  def num_patches(self):
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class GPT2DecoderConfig:
  """transformers' GPT2Config fields that change the computation (the decoder
  always has cross-attention: add_cross_attention=True, is_decoder=True)."""
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: Optional[int] = None  # None: 4 * n_embd
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  scale_attn_weights: bool = True  # scores / sqrt(head_dim)
  scale_attn_by_inverse_layer_idx: bool = False  # scores / (layer_idx + 1)
  # transformers: QK^T in float32 (eager attention only). Here softmax is
  # always float32; this also makes QK^T float32 under a lower compute dtype.
  reorder_and_upcast_attn: bool = False
  tie_word_embeddings: bool = True  # logits = h @ wte^T (no lm_head param)
  # Must equal the encoder's hidden_size when set (transformers checks it);
  # then there is no enc_to_dec_proj, so GPT-2 needs equal widths.
  cross_attention_hidden_size: Optional[int] = None
  # The decoder config's own ids, kept for export (generation uses
  # CaptionerConfig's).
  bos_token_id: Optional[int] = 50256
  eos_token_id: Optional[int] = 50256
  pad_token_id: Optional[int] = None

  @property
  def head_dim(self):
    return self.n_embd // self.n_head

  @property
  def inner_dim(self):
    return self.n_inner if self.n_inner is not None else 4 * self.n_embd


@dataclasses.dataclass(frozen=True)
class CaptionerConfig:
  """Static description of a captioner (hashable, safe as a jit static).

  Token ids are those transformers' generate uses: the top-level config's,
  else the decoder's (GenerationConfig.from_model_config); pad falls back to
  eos as generate does.
  """
  encoder: ViTEncoderConfig
  decoder: GPT2DecoderConfig
  decoder_start_token_id: int
  eos_token_id: Optional[int]  # None: generation always runs to max_length
  pad_token_id: Optional[int]
  # Default generation length in tokens, decoder_start included: a legacy
  # config.json's max_length, else min(20 (transformers' default), n_positions).
  max_length: int = HF_DEFAULT_MAX_LENGTH
  dtype: Any = jnp.float32  # compute dtype; params stay float32
  remat: bool = False  # nn.remat each encoder layer and decoder block

  @property
  def has_enc_to_dec_proj(self):
    # As VisionEncoderDecoderModel.__init__ decides.
    return (self.encoder.hidden_size != self.decoder.n_embd
            and self.decoder.cross_attention_hidden_size is None)


def _first(*values):
  for v in values:
    if v is not None:
      return v
  return None


def config_from_hf(hf_config, *, image_mean=None, image_std=None,
                   dtype=jnp.float32, remat=False):
  """Our CaptionerConfig from a transformers VisionEncoderDecoderConfig (or its
  config.json dict).

  Args:
    hf_config: transformers.VisionEncoderDecoderConfig with a 'vit' encoder
      and a 'gpt2' decoder, or a dict as in config.json.
    image_mean, image_std: per-channel pixel statistics on [0, 1] pixels
      (preprocessor_config.json); None means ViTImageProcessor's 0.5 / 0.5.
    dtype: compute dtype (params stay float32).
    remat: rematerialise encoder layers and decoder blocks in the backward pass.
  """
  d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  if d.get("model_type") not in (None, "vision-encoder-decoder"):
    raise ValueError(f"hf_config.model_type={d.get('model_type')!r}; expected "
                     "'vision-encoder-decoder'")
  e, g = d.get("encoder") or {}, d.get("decoder") or {}
  if e.get("model_type") != "vit":
    raise ValueError(f"encoder.model_type={e.get('model_type')!r} is not supported; "
                     "expected 'vit' (ViTModel)")
  if g.get("model_type") != "gpt2":
    raise ValueError(f"decoder.model_type={g.get('model_type')!r} is not supported; "
                     "expected 'gpt2' (GPT2LMHeadModel)")
  if not g.get("add_cross_attention", False):
    raise ValueError("decoder.add_cross_attention is false: a GPT-2 without "
                     "cross-attention cannot caption (transformers would fail too)")
  for name, act in (("encoder.hidden_act", layers.pick(e, "hidden_act", "gelu")),
                    ("encoder.pooler_act", layers.pick(e, "pooler_act", "tanh")),
                    ("decoder.activation_function",
                     layers.pick(g, "activation_function", "gelu_new"))):
    if act not in layers.ACTIVATIONS:
      raise ValueError(f"{name}={act!r} is not supported; expected one of "
                       f"{sorted(layers.ACTIVATIONS)}")
  image_size = layers.square_side("encoder.image_size", layers.pick(e, "image_size", 224))
  patch_size = layers.square_side("encoder.patch_size", layers.pick(e, "patch_size", 16))
  num_channels = layers.pick(e, "num_channels", 3)
  mean, std = layers.pixel_stats(image_mean, image_std, num_channels, VIT_MEAN, VIT_STD)
  encoder = ViTEncoderConfig(
      hidden_size=layers.pick(e, "hidden_size", 768),
      intermediate_size=layers.pick(e, "intermediate_size", 3072),
      num_hidden_layers=layers.pick(e, "num_hidden_layers", 12),
      num_attention_heads=layers.pick(e, "num_attention_heads", 12),
      image_size=image_size, patch_size=patch_size, num_channels=num_channels,
      hidden_act=layers.pick(e, "hidden_act", "gelu"),
      layer_norm_eps=float(layers.pick(e, "layer_norm_eps", 1e-12)),
      qkv_bias=bool(layers.pick(e, "qkv_bias", True)),
      pooler_output_size=e.get("pooler_output_size"),
      pooler_act=layers.pick(e, "pooler_act", "tanh"),
      image_mean=mean, image_std=std)
  decoder = GPT2DecoderConfig(
      vocab_size=layers.pick(g, "vocab_size", 50257),
      n_positions=layers.pick(g, "n_positions", 1024),
      n_embd=layers.pick(g, "n_embd", 768),
      n_layer=layers.pick(g, "n_layer", 12),
      n_head=layers.pick(g, "n_head", 12),
      n_inner=g.get("n_inner"),
      activation_function=layers.pick(g, "activation_function", "gelu_new"),
      layer_norm_epsilon=float(layers.pick(g, "layer_norm_epsilon", 1e-5)),
      scale_attn_weights=bool(layers.pick(g, "scale_attn_weights", True)),
      scale_attn_by_inverse_layer_idx=bool(layers.pick(g, "scale_attn_by_inverse_layer_idx", False)),
      reorder_and_upcast_attn=bool(layers.pick(g, "reorder_and_upcast_attn", False)),
      tie_word_embeddings=bool(layers.pick(g, "tie_word_embeddings", True)),
      cross_attention_hidden_size=g.get("cross_attention_hidden_size"),
      bos_token_id=layers.one_id("decoder.bos_token_id", g.get("bos_token_id")),
      eos_token_id=layers.one_id("decoder.eos_token_id", g.get("eos_token_id")),
      pad_token_id=layers.one_id("decoder.pad_token_id", g.get("pad_token_id")))
  for name, width, heads in (("encoder", encoder.hidden_size, encoder.num_attention_heads),
                             ("decoder", decoder.n_embd, decoder.n_head)):
    if width % heads:
      raise ValueError(f"{name} width {width} is not a multiple of its {heads} heads")
  cross = decoder.cross_attention_hidden_size
  if cross is not None and (cross != encoder.hidden_size or cross != decoder.n_embd):
    raise ValueError(
        f"decoder.cross_attention_hidden_size={cross} must equal encoder.hidden_size="
        f"{encoder.hidden_size} (transformers) and decoder.n_embd={decoder.n_embd} "
        "(GPT-2's cross-attention reads n_embd-wide states)")
  # GenerationConfig.from_model_config: top-level ids, else the decoder's;
  # _get_decoder_start_token_id falls back to bos; generate pads with eos when
  # there is no pad id.
  eos = layers.one_id("eos_token_id", _first(d.get("eos_token_id"), decoder.eos_token_id))
  start = layers.one_id("decoder_start_token_id", _first(
      d.get("decoder_start_token_id"), g.get("decoder_start_token_id"),
      d.get("bos_token_id"), decoder.bos_token_id))
  if start is None:
    raise ValueError("config has no decoder_start_token_id (nor bos_token_id): "
                     "generation cannot start")
  pad = layers.one_id("pad_token_id", _first(d.get("pad_token_id"), decoder.pad_token_id, eos))
  max_length = _first(d.get("max_length"), g.get("max_length"),
                      min(HF_DEFAULT_MAX_LENGTH, decoder.n_positions))
  return CaptionerConfig(
      encoder=encoder, decoder=decoder, decoder_start_token_id=start,
      eos_token_id=eos, pad_token_id=pad, max_length=int(max_length),
      dtype=jnp.dtype(dtype), remat=bool(remat))


def shift_tokens_right(labels, pad_token_id, decoder_start_token_id):
  """Teacher-forcing inputs from labels, as transformers' VisionEncoderDecoder
  shift_tokens_right: (B, T) int -> (B, T) int32 = [start, labels[:, :-1]],
  with -100 (ignored label) replaced by pad_token_id.

  The logits of Captioner.logits(params, images, shift_tokens_right(labels,
  ...)) at position t then predict labels[:, t] (what transformers' loss
  compares them with).
  """
  labels = jnp.asarray(labels, jnp.int32)
  start = jnp.full(labels.shape[:1] + (1,), decoder_start_token_id, jnp.int32)
  shifted = jnp.concatenate([start, labels[:, :-1]], axis=1)
  return jnp.where(shifted == -100, pad_token_id, shifted)


# ----------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------


# --- ViT encoder -------------------------------------------------------------


class ViTPatchEmbedding(nn.Module):
  """Non-overlapping p x p patches -> D features (HF's stride-p Conv2d, with bias).

  Patchify + one matmul instead of nn.Conv: the same param layout
  ('kernel', (p, p, C, D)) and result up to float rounding, but XLA:CPU runs the
  input gradient of a strided conv several times slower, and attacks
  differentiate w.r.t. the pixels at every step (see clip.PatchEmbedding).
  """
  features: int
  patch_size: int
  dtype: Any

  @nn.compact
  def __call__(self, pixels):
    """pixels: (B, H, W, C) -> (B, (H/p) * (W/p), D), patches row-major."""
    b, height, width, c = pixels.shape
    p = self.patch_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (p, p, c, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    h, w = height // p, width // p
    x = pixels[:, :h * p, :w * p]  # VALID: a remainder is dropped, as the conv does
    x = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * c)
    y = jnp.dot(x.astype(self.dtype), kernel.reshape(p * p * c, self.features).astype(self.dtype))
    return y + bias.astype(self.dtype)


class ViTAttention(nn.Module):
  """Bidirectional self-attention; HF (legacy) names query/key/value/output."""
  cfg: ViTEncoderConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    d, n = c.hidden_size, c.num_attention_heads
    q = layers.split_heads(layers.dense(d, self.dtype, "query", c.qkv_bias)(x), n)
    k = layers.split_heads(layers.dense(d, self.dtype, "key", c.qkv_bias)(x), n)
    v = layers.split_heads(layers.dense(d, self.dtype, "value", c.qkv_bias)(x), n)
    y = layers.attend(q, k, v, None, (d // n) ** -0.5)
    return layers.dense(d, self.dtype, "output")(y)


class ViTLayer(nn.Module):
  """Pre-LN block: x + attn(LN(x)); x + fc2(act(fc1(LN(x))))."""
  cfg: ViTEncoderConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    h = layers.layer_norm(c.layer_norm_eps, self.dtype, "layernorm_before")(x)
    x = x + ViTAttention(c, self.dtype, name="attention")(h)
    h = layers.layer_norm(c.layer_norm_eps, self.dtype, "layernorm_after")(x)
    h = layers.ACTIVATIONS[c.hidden_act](layers.dense(c.intermediate_size, self.dtype, "fc1")(h))
    return x + layers.dense(c.hidden_size, self.dtype, "fc2")(h)


class ViTEncoder(nn.Module):
  """HF ViTModel: (B, H, W, C) in [0, 1] -> last_hidden_state (B, 1 + P, D)."""
  cfg: ViTEncoderConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, with_pooler=False):
    """Returns (states (B, 1 + P, D), pooled (B, D_pool) or None).

    pooled (ViTPooler: act(dense(states[:, 0]))) only when with_pooler and the
    config has the pooler; captioning never asks for it.
    """
    c = self.cfg
    x = layers.normalize_images(images, c.image_size, c.num_channels, c.image_mean,
                                c.image_std, self.dtype)
    x = ViTPatchEmbedding(c.hidden_size, c.patch_size, self.dtype,
                          name="patch_embeddings")(x)
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param("cls_token", init, (1, 1, c.hidden_size), jnp.float32)
    pos = self.param("position_embeddings", init, (1, c.num_patches + 1, c.hidden_size),
                     jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, c.hidden_size)),
                         x], axis=1)
    x = x + pos.astype(x.dtype)
    layer_cls = nn.remat(ViTLayer) if self.remat else ViTLayer
    for i in range(c.num_hidden_layers):
      x = layer_cls(c, self.dtype, name=f"layers_{i}")(x)
    x = layers.layer_norm(c.layer_norm_eps, self.dtype, "layernorm")(x)
    pooled = None
    if with_pooler and c.add_pooling_layer:
      width = c.pooler_output_size or c.hidden_size
      pooled = layers.ACTIVATIONS[c.pooler_act](layers.dense(width, self.dtype, "pooler")(x[:, 0]))
    return x, pooled


# --- GPT-2 decoder -----------------------------------------------------------

# GPT-2's Conv1D layers: y = x @ W + b with W stored (in, out), init normal(0.02).
_GPT2_INIT = nn.initializers.normal(0.02)


class GPT2SelfAttention(nn.Module):
  """Causal self-attention (HF GPT2Attention): c_attn (D -> 3D), c_proj."""
  cfg: GPT2DecoderConfig
  scale: float
  dtype: Any

  @nn.compact
  def __call__(self, x, mask, cache=None, index=None):
    """x: (B, T, D); mask: bool broadcastable to (B, H, T, T_keys).

    cache: None (keys are x's own T positions), or (k, v) each
    (B, T_max, H, Dh): x's keys/values are written at positions
    index..index+T-1 and attention runs over all T_max slots (the mask hides
    the unwritten ones). Returns (y (B, T, D), new cache or None).
    """
    c = self.cfg
    qkv = layers.dense(3 * c.n_embd, self.dtype, "c_attn", init=_GPT2_INIT)(x)
    q, k, v = (layers.split_heads(t, c.n_head) for t in jnp.split(qkv, 3, axis=-1))
    if cache is not None:
      ck, cv = cache
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
      cache = (k, v)
    y = layers.attend(q, k, v, mask, self.scale, c.reorder_and_upcast_attn)
    return layers.dense(c.n_embd, self.dtype, "c_proj", init=_GPT2_INIT)(y), cache


class GPT2CrossAttention(nn.Module):
  """Cross-attention (HF GPT2Attention(is_cross_attention=True)): q_attn on the
  decoder states, c_attn (D -> 2D) on the encoder states, c_proj."""
  cfg: GPT2DecoderConfig
  scale: float
  dtype: Any

  def setup(self):
    c = self.cfg
    self.c_attn = layers.dense(2 * c.n_embd, self.dtype, None, init=_GPT2_INIT)
    self.q_attn = layers.dense(c.n_embd, self.dtype, None, init=_GPT2_INIT)
    self.c_proj = layers.dense(c.n_embd, self.dtype, None, init=_GPT2_INIT)

  def kv(self, states):
    """states: (B, S, D) -> keys, values, each (B, S, H, Dh)."""
    k, v = jnp.split(self.c_attn(states.astype(self.dtype)), 2, axis=-1)
    return layers.split_heads(k, self.cfg.n_head), layers.split_heads(v, self.cfg.n_head)

  def __call__(self, x, k, v):
    """x: (B, T, D); k, v: (B, S, H, Dh) from kv(). No mask: every encoder
    state is attended (VisionEncoderDecoderModel passes none)."""
    q = layers.split_heads(self.q_attn(x), self.cfg.n_head)
    y = layers.attend(q, k, v, None, self.scale, self.cfg.reorder_and_upcast_attn)
    return self.c_proj(y)


class GPT2MLP(nn.Module):
  cfg: GPT2DecoderConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    h = layers.dense(c.inner_dim, self.dtype, "c_fc", init=_GPT2_INIT)(x)
    h = layers.ACTIVATIONS[c.activation_function](h)
    return layers.dense(c.n_embd, self.dtype, "c_proj", init=_GPT2_INIT)(h)


class GPT2Block(nn.Module):
  """x + attn(ln_1 x); x + crossattention(ln_cross_attn x); x + mlp(ln_2 x)."""
  cfg: GPT2DecoderConfig
  layer_idx: int
  dtype: Any

  def setup(self):
    c = self.cfg
    scale = c.head_dim ** -0.5 if c.scale_attn_weights else 1.0
    if c.scale_attn_by_inverse_layer_idx:
      scale /= float(self.layer_idx + 1)
    eps = c.layer_norm_epsilon
    self.ln_1 = layers.layer_norm(eps, self.dtype, None)
    self.attn = GPT2SelfAttention(c, scale, self.dtype)
    self.ln_cross_attn = layers.layer_norm(eps, self.dtype, None)
    self.crossattention = GPT2CrossAttention(c, scale, self.dtype)
    self.ln_2 = layers.layer_norm(eps, self.dtype, None)
    self.mlp = GPT2MLP(c, self.dtype)

  def cross_kv(self, states):
    return self.crossattention.kv(states)

  def __call__(self, x, mask, cross_k, cross_v, cache=None, index=None):
    h, cache = self.attn(self.ln_1(x), mask, cache, index)
    x = x + h
    x = x + self.crossattention(self.ln_cross_attn(x), cross_k, cross_v)
    return x + self.mlp(self.ln_2(x)), cache


class GPT2Decoder(nn.Module):
  """HF GPT2LMHeadModel with cross-attention, on precomputed cross keys/values."""
  cfg: GPT2DecoderConfig
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.cfg
    self.wte = nn.Embed(c.vocab_size, c.n_embd, dtype=self.dtype,
                        param_dtype=jnp.float32, embedding_init=_GPT2_INIT)
    self.wpe = nn.Embed(c.n_positions, c.n_embd, dtype=self.dtype,
                        param_dtype=jnp.float32, embedding_init=nn.initializers.normal(0.01))
    block = nn.remat(GPT2Block) if self.remat else GPT2Block
    self.h = [block(c, i, self.dtype) for i in range(c.n_layer)]
    self.ln_f = layers.layer_norm(c.layer_norm_epsilon, self.dtype, None)
    if not c.tie_word_embeddings:
      self.lm_head = layers.dense(c.vocab_size, self.dtype, None, use_bias=False, init=_GPT2_INIT)

  def cross_kv(self, states):
    """states: (B, S, D) -> (k, v), each (L, B, S, H, Dh), one per block."""
    kvs = [blk.cross_kv(states) for blk in self.h]
    return jnp.stack([k for k, _ in kvs]), jnp.stack([v for _, v in kvs])

  def __call__(self, input_ids, positions, mask, cross_k, cross_v, cache=None, index=None):
    """input_ids, positions: (B, T) int; mask: bool broadcastable to
    (B, H, T, T_keys); cross_k, cross_v: (L, B, S, H, Dh); cache: None or
    (k, v) each (L, B, T_max, H, Dh), written at index..index+T-1.

    Returns (logits (B, T, V) float32, new cache or None).
    """
    x = self.wte(input_ids) + self.wpe(positions)
    new_k, new_v = [], []
    for i, blk in enumerate(self.h):
      layer_cache = None if cache is None else (cache[0][i], cache[1][i])
      x, layer_cache = blk(x, mask, cross_k[i], cross_v[i], layer_cache, index)
      if layer_cache is not None:
        new_k.append(layer_cache[0])
        new_v.append(layer_cache[1])
    x = self.ln_f(x)
    logits = self.wte.attend(x) if self.cfg.tie_word_embeddings else self.lm_head(x)
    new_cache = (jnp.stack(new_k), jnp.stack(new_v)) if cache is not None else None
    return logits.astype(jnp.float32), new_cache


class CaptionerModule(nn.Module):
  """VisionEncoderDecoderModel(ViTModel, GPT2LMHeadModel). Params: encoder,
  decoder and (widths differ) enc_to_dec_proj."""
  config: CaptionerConfig

  def setup(self):
    c = self.config
    self.encoder = ViTEncoder(c.encoder, c.dtype, c.remat)
    if c.has_enc_to_dec_proj:
      self.enc_to_dec_proj = layers.dense(c.decoder.n_embd, c.dtype, None)
    self.decoder = GPT2Decoder(c.decoder, c.dtype, c.remat)

  def encode(self, images):
    """images: (B, H, W, C) in [0, 1] -> states the decoder attends to,
    (B, 1 + P, n_embd) in the compute dtype (after enc_to_dec_proj if any)."""
    x, _ = self.encoder(images)
    return self.enc_to_dec_proj(x) if self.config.has_enc_to_dec_proj else x

  def cross_kv(self, states):
    return self.decoder.cross_kv(states)

  def decode(self, input_ids, cross_k, cross_v, attention_mask=None):
    """Teacher-forced logits (B, T, V) float32 for input_ids (B, T) at
    positions 0..T-1; attention_mask (B, T), 0 = padding key."""
    t = input_ids.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if attention_mask is not None:
      mask = mask & (attention_mask[:, None, None, :] > 0)
    positions = jnp.broadcast_to(jnp.arange(t), input_ids.shape)
    return self.decoder(input_ids, positions, mask, cross_k, cross_v)[0]

  def decode_step(self, token_ids, cache):
    """One cached step: token_ids (N,) at position cache['index'] -> (logits
    (N, V) float32, cache with this token's keys/values and index + 1)."""
    index = cache["index"]
    t_max = cache["self_k"].shape[2]
    mask = (jnp.arange(t_max) <= index)[None, None, None, :]
    positions = jnp.broadcast_to(index, token_ids.shape)[:, None]
    logits, (k, v) = self.decoder(token_ids[:, None], positions, mask, cache["cross_k"],
                                  cache["cross_v"], (cache["self_k"], cache["self_v"]), index)
    return logits[:, 0], dict(cache, self_k=k, self_v=v, index=index + 1)

  def __call__(self, images, input_ids, attention_mask=None):
    """Logits (B, T, V) float32, as VisionEncoderDecoderModel(pixel_values,
    decoder_input_ids, decoder_attention_mask).logits."""
    return self.decode(input_ids, *self.cross_kv(self.encode(images)), attention_mask)

  def init_all(self, images, input_ids):
    """Touches every parameter (the pooler included) for init."""
    self.encoder(images, with_pooler=True)
    return self(images, input_ids)


# ----------------------------------------------------------------------------
# The static model: config only, hashable and equal by value.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Captioner:
  """A ViT + GPT-2 captioner architecture: pure functions of the params given.

  Hashable and equal by value (its config), so it is a safe jit static
  argument: two checkpoints of the same config compile once.

  Shapes: B batch, H = W = image_size, C channels, S = 1 + num_patches encoder
  states, D decoder width (n_embd), T decoder tokens, V vocab_size, L decoder
  layers, NH heads, Dh head width.
  """
  config: CaptionerConfig
  kind = "vision-encoder-decoder"  # config.json's model_type
  task = "captioning"  # what evaluate.py measures it with (prsl_jax.tasks)
  # Top-level param keys per tower: the bridge from encoder to decoder width,
  # when present, trains with the vision tower.
  towers = {"vision": ("encoder", "enc_to_dec_proj"), "text": ("decoder",),
            "both": ("encoder", "enc_to_dec_proj", "decoder")}

  @property
  def module(self) -> CaptionerModule:
    return CaptionerModule(self.config)

  def init(self, key):
    """Random float32 params (for training from scratch)."""
    e = self.config.encoder
    images = jnp.zeros((1, e.image_size, e.image_size, e.num_channels), jnp.float32)
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = self.module.init(key, images, ids, method=CaptionerModule.init_all)
    return nn.unbox(variables)["params"]

  def param_shapes(self):
    """Nested dict of jax.ShapeDtypeStruct: the params' structure, no FLOPs."""
    return jax.eval_shape(self.init, jax.random.key(0))

  def encode(self, params, images):
    """images: (B, H, W, C) float in [0, 1] -> (B, S, D) float32, the states the
    decoder cross-attends to (ViT last_hidden_state, then enc_to_dec_proj when
    the widths differ)."""
    states = self.module.apply({"params": params}, images, method=CaptionerModule.encode)
    return states.astype(jnp.float32)

  def decode(self, params, encoder_states, decoder_input_ids, decoder_attention_mask=None):
    """Teacher-forced logits (B, T, V) float32 from encode()'s states (B, S, D).

    decoder_input_ids: (B, T) int, starting with decoder_start_token_id (as
    transformers' shift_tokens_right builds them from labels); position t's
    logits predict token t + 1. decoder_attention_mask: (B, T), 0 = padding.
    """
    self._check_ids(decoder_input_ids, decoder_attention_mask)

    def f(module, states, ids, mask):
      return module.decode(ids, *module.cross_kv(states), mask)
    return self.module.apply({"params": params}, encoder_states, decoder_input_ids,
                             decoder_attention_mask, method=f)

  def logits(self, params, images, decoder_input_ids, decoder_attention_mask=None):
    """Teacher-forced logits (B, T, V) float32: transformers'
    VisionEncoderDecoderModel(pixel_values, decoder_input_ids,
    decoder_attention_mask).logits, with images (B, H, W, C) in [0, 1]."""
    self._check_ids(decoder_input_ids, decoder_attention_mask)
    return self.module.apply({"params": params}, images, decoder_input_ids,
                             decoder_attention_mask)

  def caption_logits(self, params, images, decoder_input_ids, decoder_attention_mask=None):
    """The captioning task's token logits (B, T, V) float32: logits(). Position
    t predicts decoder_input_ids[:, t + 1] (tasks/captioning.py)."""
    return self.logits(params, images, decoder_input_ids, decoder_attention_mask)

  def caption(self, params, images, max_length=None):
    """The captioning task's greedy captions (B, max_length) int32:
    generation.greedy (decoder_start, tokens, EOS, then pad)."""
    return generation.greedy(self, params, images, max_length=max_length)

  def init_cache(self, params, encoder_states, max_length):
    """Decoding cache for N = encoder_states.shape[0] sequences.

    Cross-attention keys/values are computed here, once. Returns a dict:
      self_k, self_v:   (L, N, max_length, NH, Dh) compute dtype, zeros
      cross_k, cross_v: (L, N, S, NH, Dh)
      index:            int32 scalar, the next position to write (0)
    Rows of every array are sequences, so beam search reorders a cache with
    jnp.take(x, rows, axis=1).
    """
    c = self.config
    if not 1 <= max_length <= c.decoder.n_positions:
      raise ValueError(f"max_length={max_length} must be in [1, n_positions="
                       f"{c.decoder.n_positions}] (one cache slot per position)")
    cross_k, cross_v = self.module.apply({"params": params}, encoder_states,
                                         method=CaptionerModule.cross_kv)
    d = c.decoder
    shape = (d.n_layer, encoder_states.shape[0], max_length, d.n_head, d.head_dim)
    zeros = jnp.zeros(shape, c.dtype)
    return dict(self_k=zeros, self_v=zeros, cross_k=cross_k, cross_v=cross_v,
                index=jnp.zeros((), jnp.int32))

  def decode_step(self, params, cache, token_ids):
    """Feeds token_ids (N,) int at position cache['index'].

    Returns (logits (N, V) float32 for the next token, the updated cache).
    Equal to decode()'s logits at that position for the same prefix. Writing
    past the cache's max_length is not checked (dynamic_update_slice clamps).
    """
    return self.module.apply({"params": params}, token_ids, cache,
                             method=CaptionerModule.decode_step)

  def _check_ids(self, ids, mask):
    n = self.config.decoder.n_positions
    if ids.ndim != 2 or ids.shape[1] > n:
      raise ValueError(f"decoder_input_ids must have shape (B, T) with T <= n_positions="
                       f"{n}, got {ids.shape}")
    if mask is not None and mask.shape != ids.shape:
      raise ValueError(f"decoder_attention_mask shape {mask.shape} must equal "
                       f"decoder_input_ids shape {ids.shape}")

  @property
  def image_size(self):
    return self.config.encoder.image_size

  @property
  def max_positions(self):
    """Decoder positions: the longest sequence generation may reach (tokens)."""
    return self.config.decoder.n_positions

  @property
  def max_length(self):
    """Default generation length (tokens, decoder_start included)."""
    return self.config.max_length

  @property
  def vocab_size(self):
    return self.config.decoder.vocab_size

  @property
  def decoder_start_token_id(self):
    return self.config.decoder_start_token_id

  @property
  def bos_token_id(self):
    """The id generation starts from (decoder_start_token_id)."""
    return self.config.decoder_start_token_id

  @property
  def eos_token_id(self):
    return self.config.eos_token_id

  @property
  def pad_token_id(self):
    return self.config.pad_token_id


# ----------------------------------------------------------------------------
# HuggingFace VisionEncoderDecoderModel: config and explicit key map.
# HF state-dict name -> (flax param path, layout kind); kinds:
#   "linear" torch nn.Linear (out, in) <-> flax kernel (in, out);
#   "conv"   torch (O, I, kh, kw) <-> flax (kh, kw, I, O);
#   "copy"   same layout: GPT-2's Conv1D weights are stored (in, out) already,
#            embeddings, LayerNorm, biases, cls/position embeddings.
# Names are those transformers' save_pretrained writes (ViT's legacy
# encoder.encoder.layer.{i}.attention.attention.query spelling, which both
# transformers 4 and 5 read); adapt_state_dict maps other spellings onto them.
# ----------------------------------------------------------------------------


def _conv1d(hf, fx):
  return [(f"{hf}.weight", fx + ("kernel",), "copy"), (f"{hf}.bias", fx + ("bias",), "copy")]


def key_map(config):
  """[(hf_name, flax_path, kind)] for every parameter of a CaptionerModule(config)."""
  e, g = config.encoder, config.decoder
  enc, dec = ("encoder",), ("decoder",)
  out = [
      ("encoder.embeddings.cls_token", enc + ("cls_token",), "copy"),
      ("encoder.embeddings.position_embeddings", enc + ("position_embeddings",), "copy"),
      ("encoder.embeddings.patch_embeddings.projection.weight",
       enc + ("patch_embeddings", "kernel"), "conv"),
      ("encoder.embeddings.patch_embeddings.projection.bias",
       enc + ("patch_embeddings", "bias"), "copy"),
  ]
  for i in range(e.num_hidden_layers):
    h, f = f"encoder.encoder.layer.{i}", enc + (f"layers_{i}",)
    for name in ("query", "key", "value"):
      out += layers.linear_keys(f"{h}.attention.attention.{name}", f + ("attention", name),
                                e.qkv_bias)
    out += layers.linear_keys(f"{h}.attention.output.dense", f + ("attention", "output"))
    out += layers.layer_norm_keys(f"{h}.layernorm_before", f + ("layernorm_before",))
    out += layers.layer_norm_keys(f"{h}.layernorm_after", f + ("layernorm_after",))
    out += layers.linear_keys(f"{h}.intermediate.dense", f + ("fc1",))
    out += layers.linear_keys(f"{h}.output.dense", f + ("fc2",))
  out += layers.layer_norm_keys("encoder.layernorm", enc + ("layernorm",))
  if e.add_pooling_layer:
    out += layers.linear_keys("encoder.pooler.dense", enc + ("pooler",))
  if config.has_enc_to_dec_proj:
    out += layers.linear_keys("enc_to_dec_proj", ("enc_to_dec_proj",))
  out += [("decoder.transformer.wte.weight", dec + ("wte", "embedding"), "copy"),
          ("decoder.transformer.wpe.weight", dec + ("wpe", "embedding"), "copy")]
  for i in range(g.n_layer):
    h, f = f"decoder.transformer.h.{i}", dec + (f"h_{i}",)
    out += layers.layer_norm_keys(f"{h}.ln_1", f + ("ln_1",))
    out += _conv1d(f"{h}.attn.c_attn", f + ("attn", "c_attn"))
    out += _conv1d(f"{h}.attn.c_proj", f + ("attn", "c_proj"))
    out += layers.layer_norm_keys(f"{h}.ln_cross_attn", f + ("ln_cross_attn",))
    for name in ("c_attn", "q_attn", "c_proj"):
      out += _conv1d(f"{h}.crossattention.{name}", f + ("crossattention", name))
    out += layers.layer_norm_keys(f"{h}.ln_2", f + ("ln_2",))
    out += _conv1d(f"{h}.mlp.c_fc", f + ("mlp", "c_fc"))
    out += _conv1d(f"{h}.mlp.c_proj", f + ("mlp", "c_proj"))
  out += layers.layer_norm_keys("decoder.transformer.ln_f", dec + ("ln_f",))
  if not g.tie_word_embeddings:
    out += [("decoder.lm_head.weight", dec + ("lm_head", "kernel"), "linear")]
  return out


# GPT-2's causal-mask buffers in older checkpoints (not parameters).
_GPT2_BUFFER = re.compile(
    r"^decoder\.transformer\.h\.\d+\.(attn|crossattention)\.(bias|masked_bias)$")
# transformers 5's in-memory ViT names -> the on-disk names key_map uses.
_VIT_NEW_TO_OLD = (
    ("attention.q_proj.", "attention.attention.query."),
    ("attention.k_proj.", "attention.attention.key."),
    ("attention.v_proj.", "attention.attention.value."),
    ("attention.o_proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
    ("", ""),  # layernorm_before/after keep their names
)
_VIT_RENAMES = tuple(
    (re.compile(r"^encoder\.layers\.(\d+)\." + re.escape(new)), r"encoder.encoder.layer.\1." + old)
    for new, old in _VIT_NEW_TO_OLD)


def adapt_state_dict(state_dict, model):
  """A checkpoint's {name: array} and the model -> the same in key_map's terms.

  What transformers does on load, made explicit (convert.load_pretrained calls
  this before matching names):
    * GPT-2's attn.bias / attn.masked_bias mask buffers are dropped;
    * transformers 5's in-memory ViT names (encoder.layers.{i}.attention.q_proj,
      mlp.fc1, ...) are renamed to the on-disk ones;
    * decoder.lm_head.weight is dropped when the decoder ties it to wte
      (transformers ties it, ignoring the stored copy);
    * a checkpoint without encoder.pooler.* gives a model without the pooler
      (it is unused by captioning; transformers would initialise it randomly).

  Returns:
    (state_dict, model).
  """
  state = {}
  for name, x in state_dict.items():
    if _GPT2_BUFFER.match(name):
      continue
    for pattern, repl in _VIT_RENAMES:
      new = pattern.sub(repl, name)
      if new != name:
        name = new
        break
    state[name] = x
  if model.config.decoder.tie_word_embeddings:
    state.pop("decoder.lm_head.weight", None)
  has_pooler = any(k.startswith("encoder.pooler.") for k in state)
  if has_pooler != model.config.encoder.add_pooling_layer:
    enc = dataclasses.replace(model.config.encoder, add_pooling_layer=has_pooler)
    model = dataclasses.replace(model, config=dataclasses.replace(model.config, encoder=enc))
  return state, model


def config_to_hf(config):
  """Our CaptionerConfig -> transformers.VisionEncoderDecoderConfig (config.json).

  max_length is a generation setting; transformers 5 refuses it in config.json,
  so it is not written (a reloaded model gets min(20, n_positions) back unless
  the caller passes max_length to generation).
  """
  import transformers  # pylint: disable=g-import-not-at-top
  e, g = config.encoder, config.decoder
  encoder = transformers.ViTConfig(
      hidden_size=e.hidden_size, intermediate_size=e.intermediate_size,
      num_hidden_layers=e.num_hidden_layers, num_attention_heads=e.num_attention_heads,
      image_size=e.image_size, patch_size=e.patch_size, num_channels=e.num_channels,
      hidden_act=e.hidden_act, layer_norm_eps=e.layer_norm_eps, qkv_bias=e.qkv_bias,
      pooler_output_size=e.pooler_output_size, pooler_act=e.pooler_act,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  decoder = transformers.GPT2Config(
      vocab_size=g.vocab_size, n_positions=g.n_positions, n_embd=g.n_embd,
      n_layer=g.n_layer, n_head=g.n_head, n_inner=g.n_inner,
      activation_function=g.activation_function, layer_norm_epsilon=g.layer_norm_epsilon,
      scale_attn_weights=g.scale_attn_weights,
      scale_attn_by_inverse_layer_idx=g.scale_attn_by_inverse_layer_idx,
      reorder_and_upcast_attn=g.reorder_and_upcast_attn,
      tie_word_embeddings=g.tie_word_embeddings,
      cross_attention_hidden_size=g.cross_attention_hidden_size,
      bos_token_id=g.bos_token_id, eos_token_id=g.eos_token_id, pad_token_id=g.pad_token_id,
      add_cross_attention=True, is_decoder=True)
  hf = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
  hf.decoder_start_token_id = config.decoder_start_token_id
  hf.eos_token_id = config.eos_token_id
  hf.pad_token_id = config.pad_token_id
  hf.architectures = ["VisionEncoderDecoderModel"]
  return hf


def preprocessor_config(config):
  """preprocessor_config.json: the fields of transformers' ViTImageProcessor."""
  e = config.encoder
  return {
      "image_processor_type": "ViTImageProcessor",
      "do_resize": True, "size": {"height": e.image_size, "width": e.image_size},
      "resample": 2,  # bilinear
      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": list(e.image_mean), "image_std": list(e.image_std),
  }


def load_tokenizer(folder):
  """The folder's tokenizer (GPT2TokenizerFast for GPT-2 decoders)."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoTokenizer.from_pretrained(folder)


def from_hf(hf_config, *, image_mean=None, image_std=None, dtype=jnp.float32, remat=False):
  """The static Captioner for a VisionEncoderDecoderConfig or config.json dict."""
  return Captioner(config_from_hf(hf_config, image_mean=image_mean, image_std=image_std,
                                 dtype=dtype, remat=remat))


def vocab_size(model):
  return model.config.decoder.vocab_size


MODEL = Captioner  # the static model class of this kind (models/__init__.py)
