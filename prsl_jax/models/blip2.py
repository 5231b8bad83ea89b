"""BLIP-2 with an OPT language model in flax.linen, numerically matching
transformers' PyTorch Blip2ForConditionalGeneration (model_type 'blip-2',
e.g. Salesforce/blip2-opt-2.7b).

  vision:    NHWC images in [0, 1] -> (x - mean) / std -> patch conv (with
             bias) -> [CLS; patches] + positions -> pre-LN layers (fused qkv
             without bias, plus separate q and v biases: EVA's layout; the k
             bias is zero) -> post_layernorm: image states (B, S, Dv)
  Q-Former:  query_tokens (1, Q, Dq) -> LayerNorm -> BERT-style post-LN layers:
             self-attention over the queries, cross-attention to the image
             states in every `cross_attention_frequency`-th layer (layer 0
             included), the query feed-forward -> (B, Q, Dq)
  projection: language_projection (Dq -> D) -> image embeddings (B, Q, D)
  OPT:       embed_tokens(input_ids) with every `image_token_id` placeholder
             replaced by the image embeddings (transformers 5's masked_scatter)
             -> project_in when word_embed_proj_dim != hidden_size -> + learned
             positions (cumsum of the attention mask - 1, plus OPT's offset 2)
             -> causal layers, pre-LN or post-LN per do_layer_norm_before ->
             final_layer_norm (pre-LN only) -> project_out -> LM head (tied to
             embed_tokens or its own lm_head)

The input_ids of a caption are [image_token_id] * Q + [bos] (+ the prompt,
e.g. "Question: what digit is this? Answer:"; `prompt_ids` builds them), as
Blip2Processor writes them.

Pixel normalisation lives inside the model so that attacks, budgets and data
pipelines all work on [0, 1] pixels at the model's resolution.

`Blip2` is the static part of a model: its config, hashable and equal by value,
so two checkpoints of one architecture share every compiled function. Params
are a plain float32 pytree passed as an argument. Top-level param keys:
'vision_model', 'query_tokens', 'qformer', 'language_projection',
'language_model' (its 'lm_head' only when untied). `key_map` lists every HF
state-dict name.

`dtype` is the compute dtype of the vision model, the projection and OPT; the
query tokens and the Q-Former always compute in float32 (transformers keeps
them in float32 too); attention softmax is float32 and logits are float32.

Generation (greedy, beam search) with a key/value cache:
prsl_jax.models.blip2_generation.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prsl_jax import losses
from prsl_jax.models import blip2_generation
from prsl_jax.models import captioner
from prsl_jax.models import generation
from prsl_jax.models import layers

# Blip2Processor's (BlipImageProcessor's) defaults: OpenAI CLIP's statistics.
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# OPTLearnedPositionalEmbedding's offset: row position + 2 holds position.
OPT_POSITION_OFFSET = 2
IGNORE_INDEX = losses.IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """transformers' Blip2VisionConfig fields that change the computation."""
  hidden_size: int = 1408
  intermediate_size: int = 6144
  num_hidden_layers: int = 39
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True  # separate q and v biases (no k bias)
  # Pixel statistics on [0, 1] pixels (preprocessor_config.json).
  image_mean: tuple[float, ...] = BLIP_MEAN
  image_std: tuple[float, ...] = BLIP_STD

  @property
  def num_patches(self):
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """transformers' Blip2QFormerConfig fields that change the computation."""
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  cross_attention_frequency: int = 2
  encoder_hidden_size: int = 1408  # the vision hidden_size
  # Written back on export (config.json's qformer_config).
  vocab_size: int = 30522
  max_position_embeddings: int = 512

  def has_cross_attention(self, layer):
    return layer % self.cross_attention_frequency == 0


@dataclasses.dataclass(frozen=True)
class OPTConfig:
  """transformers' OPTConfig fields that change the computation."""
  vocab_size: int = 50272
  hidden_size: int = 2560
  num_hidden_layers: int = 32
  ffn_dim: int = 10240
  num_attention_heads: int = 32
  max_position_embeddings: int = 2048
  do_layer_norm_before: bool = True
  remove_final_layer_norm: bool = False  # config.json's _remove_final_layer_norm
  word_embed_proj_dim: Optional[int] = None  # None: hidden_size
  activation_function: str = "relu"
  enable_bias: bool = True
  tie_word_embeddings: bool = True
  bos_token_id: Optional[int] = 2
  eos_token_id: Optional[int] = 2
  pad_token_id: Optional[int] = 1

  @property
  def embed_dim(self):
    """Width of embed_tokens and of the LM head's input (word_embed_proj_dim)."""
    return self.word_embed_proj_dim or self.hidden_size

  @property
  def has_projections(self):
    return self.embed_dim != self.hidden_size

  @property
  def has_final_layer_norm(self):
    return self.do_layer_norm_before and not self.remove_final_layer_norm

  @property
  def head_dim(self):
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Blip2Config:
  """Static description of a BLIP-2 OPT model (hashable, safe as a jit static).

  Generation ids are the language model's (transformers' generate runs the
  OPT model's generate): it starts from bos_token_id, stops at eos_token_id
  and pads with pad_token_id (eos when there is none).
  """
  vision: VisionConfig
  qformer: QFormerConfig
  text: OPTConfig
  num_query_tokens: int = 32
  image_token_id: int = 50265
  dtype: Any = jnp.float32  # compute dtype; params stay float32
  remat: bool = False  # nn.remat each vision layer and OPT layer
  # Written back on export (config.json).
  image_text_hidden_size: int = 256


def config_from_hf(hf_config, *, image_mean=None, image_std=None,
                   dtype=jnp.float32, remat=False):
  """Our Blip2Config from a transformers Blip2Config (or its config.json dict).

  Args:
    hf_config: transformers.Blip2Config with an 'opt' text_config, or a dict
      as in config.json.
    image_mean, image_std: per-channel pixel statistics on [0, 1] pixels
      (preprocessor_config.json); None means BlipImageProcessor's (CLIP's).
    dtype: compute dtype (params stay float32; the Q-Former computes in
      float32 whatever it is).
    remat: rematerialise vision and OPT layers in the backward pass.
  """
  d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  if d.get("model_type") not in (None, "blip-2"):
    raise ValueError(f"hf_config.model_type={d.get('model_type')!r}; expected 'blip-2'")
  v, q, t = (d.get(k) or {} for k in ("vision_config", "qformer_config", "text_config"))
  if layers.pick(t, "model_type", "opt") != "opt":
    raise ValueError(f"text_config.model_type={t.get('model_type')!r} is not supported; "
                     "expected 'opt' (BLIP-2 OPT; the T5 variants are not ported)")
  if q.get("use_qformer_text_input"):
    raise ValueError("qformer_config.use_qformer_text_input=True is not supported: "
                     "Blip2ForConditionalGeneration never feeds text to the Q-Former")
  if not layers.pick(t, "layer_norm_elementwise_affine", True):
    raise ValueError("text_config.layer_norm_elementwise_affine=False is not supported "
                     "(every released OPT has affine LayerNorms)")
  image_token_id = layers.pick(d, "image_token_index", d.get("image_token_id"))
  if not isinstance(image_token_id, int):
    raise ValueError(f"config has no image_token_index ({image_token_id!r}): transformers 5 "
                     "needs it to place the image; add it to config.json (the "
                     "tokenizer's '<image>' id, 50265 for Salesforce/blip2-opt-*)")
  for name, act in (("vision_config.hidden_act", layers.pick(v, "hidden_act", "gelu")),
                    ("qformer_config.hidden_act", layers.pick(q, "hidden_act", "gelu")),
                    ("text_config.activation_function",
                     layers.pick(t, "activation_function", "relu"))):
    if act not in layers.ACTIVATIONS:
      raise ValueError(f"{name}={act!r} is not supported; expected one of "
                       f"{sorted(layers.ACTIVATIONS)}")
  num_channels = layers.pick(v, "num_channels", 3)
  mean = tuple(float(x) for x in (image_mean if image_mean is not None else BLIP_MEAN))
  std = tuple(float(x) for x in (image_std if image_std is not None else BLIP_STD))
  if len(mean) != num_channels or len(std) != num_channels:
    raise ValueError(f"image_mean {mean} and image_std {std} must have "
                     f"num_channels={num_channels} entries")
  vision = VisionConfig(
      hidden_size=layers.pick(v, "hidden_size", 1408),
      intermediate_size=layers.pick(v, "intermediate_size", 6144),
      num_hidden_layers=layers.pick(v, "num_hidden_layers", 39),
      num_attention_heads=layers.pick(v, "num_attention_heads", 16),
      image_size=layers.square_side("vision_config.image_size", layers.pick(v, "image_size", 224)),
      patch_size=layers.square_side("vision_config.patch_size", layers.pick(v, "patch_size", 14)),
      num_channels=num_channels,
      hidden_act=layers.pick(v, "hidden_act", "gelu"),
      layer_norm_eps=float(layers.pick(v, "layer_norm_eps", 1e-6)),
      qkv_bias=bool(layers.pick(v, "qkv_bias", True)),
      image_mean=mean, image_std=std)
  qformer = QFormerConfig(
      hidden_size=layers.pick(q, "hidden_size", 768),
      num_hidden_layers=layers.pick(q, "num_hidden_layers", 12),
      num_attention_heads=layers.pick(q, "num_attention_heads", 12),
      intermediate_size=layers.pick(q, "intermediate_size", 3072),
      hidden_act=layers.pick(q, "hidden_act", "gelu"),
      layer_norm_eps=float(layers.pick(q, "layer_norm_eps", 1e-12)),
      cross_attention_frequency=layers.pick(q, "cross_attention_frequency", 2),
      encoder_hidden_size=vision.hidden_size,  # as Blip2Config.__post_init__ sets it
      vocab_size=layers.pick(q, "vocab_size", 30522),
      max_position_embeddings=layers.pick(q, "max_position_embeddings", 512))
  hidden = layers.pick(t, "hidden_size", 768)
  word = t.get("word_embed_proj_dim")
  text = OPTConfig(
      vocab_size=layers.pick(t, "vocab_size", 50272),
      hidden_size=hidden,
      num_hidden_layers=layers.pick(t, "num_hidden_layers", 12),
      ffn_dim=layers.pick(t, "ffn_dim", 3072),
      num_attention_heads=layers.pick(t, "num_attention_heads", 12),
      max_position_embeddings=layers.pick(t, "max_position_embeddings", 2048),
      do_layer_norm_before=bool(layers.pick(t, "do_layer_norm_before", True)),
      remove_final_layer_norm=bool(layers.pick(t, "_remove_final_layer_norm", False)),
      word_embed_proj_dim=None if word in (None, hidden) else word,
      activation_function=layers.pick(t, "activation_function", "relu"),
      enable_bias=bool(layers.pick(t, "enable_bias", True)),
      tie_word_embeddings=bool(layers.pick(t, "tie_word_embeddings", True)),
      bos_token_id=layers.one_id("text_config.bos_token_id", t.get("bos_token_id")),
      eos_token_id=layers.one_id("text_config.eos_token_id", t.get("eos_token_id")),
      pad_token_id=layers.one_id("text_config.pad_token_id", t.get("pad_token_id")))
  for name, width, heads in (("vision_config", vision.hidden_size, vision.num_attention_heads),
                             ("qformer_config", qformer.hidden_size,
                              qformer.num_attention_heads),
                             ("text_config", text.hidden_size, text.num_attention_heads)):
    if width % heads:
      raise ValueError(f"{name}.hidden_size={width} is not a multiple of its {heads} heads")
  if qformer.cross_attention_frequency < 1:
    raise ValueError("qformer_config.cross_attention_frequency must be >= 1, got "
                     f"{qformer.cross_attention_frequency}")
  if text.embed_dim > text.hidden_size:
    raise ValueError(
        f"text_config.word_embed_proj_dim={text.embed_dim} > hidden_size={text.hidden_size}: "
        "the projected image embeddings (hidden_size wide) cannot fill the placeholders "
        "(transformers' masked_scatter fails too)")
  if not 0 <= image_token_id < text.vocab_size:
    raise ValueError(f"image_token_index={image_token_id} is not a token of the "
                     f"{text.vocab_size}-token vocabulary")
  return Blip2Config(
      vision=vision, qformer=qformer, text=text,
      num_query_tokens=layers.pick(d, "num_query_tokens", 32),
      image_token_id=image_token_id,
      image_text_hidden_size=layers.pick(d, "image_text_hidden_size", 256),
      dtype=jnp.dtype(dtype), remat=bool(remat))


# ----------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------



class VisionAttention(nn.Module):
  """Blip2Attention: one fused qkv matmul without bias, then q_bias and v_bias."""
  cfg: VisionConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    d, n = c.hidden_size, c.num_attention_heads
    qkv = layers.dense(3 * d, self.dtype, "qkv", use_bias=False)(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    if c.qkv_bias:
      q = q + self.param("q_bias", nn.initializers.zeros, (d,), jnp.float32).astype(q.dtype)
      v = v + self.param("v_bias", nn.initializers.zeros, (d,), jnp.float32).astype(v.dtype)
    q, k, v = (layers.split_heads(t, n) for t in (q, k, v))
    y = layers.attend(q, k, v, None, (d // n) ** -0.5)
    return layers.dense(d, self.dtype, "projection")(y)


class VisionLayer(nn.Module):
  """Pre-LN block: x + attn(LN1(x)); x + fc2(act(fc1(LN2(x))))."""
  cfg: VisionConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    h = layers.layer_norm(c.layer_norm_eps, self.dtype, "layer_norm1")(x)
    x = x + VisionAttention(c, self.dtype, name="self_attn")(h)
    h = layers.layer_norm(c.layer_norm_eps, self.dtype, "layer_norm2")(x)
    h = layers.ACTIVATIONS[c.hidden_act](layers.dense(c.intermediate_size, self.dtype, "fc1")(h))
    return x + layers.dense(c.hidden_size, self.dtype, "fc2")(h)


class VisionModel(nn.Module):
  """Blip2VisionModel: (B, H, W, C) in [0, 1] -> last_hidden_state (B, 1 + P, Dv)."""
  cfg: VisionConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images):
    c = self.cfg
    want = (c.image_size, c.image_size, c.num_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(f"images must have shape (B, {want[0]}, {want[1]}, {want[2]}) "
                       f"(NHWC in [0, 1] at the model's resolution), got {images.shape}")
    # Normalise in float32 (pixel budgets are tiny), then cast to compute dtype.
    mean = jnp.asarray(c.image_mean, jnp.float32)
    std = jnp.asarray(c.image_std, jnp.float32)
    x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)
    x = captioner.ViTPatchEmbedding(c.hidden_size, c.patch_size, self.dtype,
                              name="patch_embedding")(x)
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param("class_embedding", init, (1, 1, c.hidden_size), jnp.float32)
    pos = self.param("position_embedding", init, (1, c.num_patches + 1, c.hidden_size),
                     jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, c.hidden_size)),
                         x], axis=1)
    x = x + pos.astype(x.dtype)
    layer_cls = nn.remat(VisionLayer) if self.remat else VisionLayer
    for i in range(c.num_hidden_layers):
      x = layer_cls(c, self.dtype, name=f"layers_{i}")(x)
    return layers.layer_norm(c.layer_norm_eps, self.dtype, "post_layernorm")(x)


class QFormerAttention(nn.Module):
  """Blip2QFormerAttention: attention, then LayerNorm(dense(y) + x) (post-LN)."""
  cfg: QFormerConfig

  @nn.compact
  def __call__(self, x, states=None):
    """x: (B, Q, Dq) queries; states: (B, S, Dv) to cross-attend to, or None."""
    c, f32 = self.cfg, jnp.float32
    d, n = c.hidden_size, c.num_attention_heads
    kv = x if states is None else states
    q = layers.split_heads(layers.dense(d, f32, "query")(x), n)
    k = layers.split_heads(layers.dense(d, f32, "key")(kv), n)
    v = layers.split_heads(layers.dense(d, f32, "value")(kv), n)
    y = layers.attend(q, k, v, None, (d // n) ** -0.5)
    y = layers.dense(d, f32, "output_dense")(y)
    return layers.layer_norm(c.layer_norm_eps, f32, "output_LayerNorm")(y + x)


class QFormerLayer(nn.Module):
  """Blip2QFormerLayer on the query tokens only (no text input)."""
  cfg: QFormerConfig
  cross: bool

  @nn.compact
  def __call__(self, x, states):
    c, f32 = self.cfg, jnp.float32
    x = QFormerAttention(c, name="attention")(x)
    if self.cross:
      x = QFormerAttention(c, name="crossattention")(x, states)
    h = layers.dense(c.intermediate_size, f32, "intermediate_query")(x)
    h = layers.ACTIVATIONS[c.hidden_act](h)
    h = layers.dense(c.hidden_size, f32, "output_query_dense")(h)
    return layers.layer_norm(c.layer_norm_eps, f32, "output_query_LayerNorm")(h + x)


class QFormer(nn.Module):
  """Blip2QFormerModel (float32 always): query tokens + image states -> (B, Q, Dq)."""
  cfg: QFormerConfig

  @nn.compact
  def __call__(self, queries, states):
    c = self.cfg
    x = layers.layer_norm(c.layer_norm_eps, jnp.float32, "layernorm")(queries.astype(jnp.float32))
    states = states.astype(jnp.float32)
    for i in range(c.num_hidden_layers):
      x = QFormerLayer(c, c.has_cross_attention(i), name=f"layer_{i}")(x, states)
    return x


class OPTAttention(nn.Module):
  """OPT's causal self-attention (q scaled before QK^T, as OPTAttention does)."""
  cfg: OPTConfig
  dtype: Any

  @nn.compact
  def __call__(self, x, mask, cache=None):
    """x: (B, T, D); mask: bool (B, 1, T, Tk), True = attend.

    cache: None (keys are x's), or (k, v, index): (B, L, H, Dh) keys/values
    of positions [0, L) and the slot of x's first token; x's keys/values are
    written there and attention runs over all L slots (mask chooses).
    Returns (y (B, T, D), new (k, v) or None).
    """
    c = self.cfg
    d, n, bias = c.hidden_size, c.num_attention_heads, c.enable_bias
    q = layers.split_heads(layers.dense(d, self.dtype, "q_proj", bias)(x) * c.head_dim ** -0.5, n)
    k = layers.split_heads(layers.dense(d, self.dtype, "k_proj", bias)(x), n)
    v = layers.split_heads(layers.dense(d, self.dtype, "v_proj", bias)(x), n)
    new = None
    if cache is not None:
      ck, cv, index = cache
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
      new = (k, v)
    y = layers.attend(q, k, v, mask, 1.0)
    return layers.dense(d, self.dtype, "out_proj", bias)(y), new


class OPTLayer(nn.Module):
  """OPTDecoderLayer: pre-LN or post-LN per do_layer_norm_before."""
  cfg: OPTConfig
  dtype: Any

  @nn.compact
  def __call__(self, x, mask, cache=None):
    c = self.cfg
    pre = c.do_layer_norm_before
    ln_attn = layers.layer_norm(1e-5, self.dtype, "self_attn_layer_norm")
    ln_ffn = layers.layer_norm(1e-5, self.dtype, "final_layer_norm")
    h = ln_attn(x) if pre else x
    h, new = OPTAttention(c, self.dtype, name="self_attn")(h, mask, cache)
    x = x + h
    if not pre:
      x = ln_attn(x)
    h = ln_ffn(x) if pre else x
    h = layers.dense(c.ffn_dim, self.dtype, "fc1", c.enable_bias)(h)
    h = layers.ACTIVATIONS[c.activation_function](h)
    x = x + layers.dense(c.hidden_size, self.dtype, "fc2", c.enable_bias)(h)
    if not pre:
      x = ln_ffn(x)
    return x, new


class OPTForCausalLM(nn.Module):
  """OPT decoder + LM head on input embeddings (B, T, word_embed_proj_dim)."""
  cfg: OPTConfig
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.cfg
    init = nn.initializers.normal(0.02)
    self.embed_tokens = nn.Embed(c.vocab_size, c.embed_dim, embedding_init=init,
                                 param_dtype=jnp.float32, name="embed_tokens")
    self.embed_positions = nn.Embed(c.max_position_embeddings + OPT_POSITION_OFFSET,
                                    c.hidden_size, embedding_init=init,
                                    param_dtype=jnp.float32, name="embed_positions")
    if c.has_projections:
      self.project_in = layers.dense(c.hidden_size, self.dtype, "project_in", use_bias=False)
      self.project_out = layers.dense(c.embed_dim, self.dtype, "project_out", use_bias=False)
    layer_cls = nn.remat(OPTLayer) if self.remat else OPTLayer
    self.layers = [layer_cls(c, self.dtype, name=f"layers_{i}")
                   for i in range(c.num_hidden_layers)]
    if c.has_final_layer_norm:
      self.final_layer_norm = layers.layer_norm(1e-5, self.dtype, "final_layer_norm")
    if not c.tie_word_embeddings:
      self.lm_head = layers.dense(c.vocab_size, self.dtype, "lm_head", use_bias=False)

  def embed(self, input_ids):
    """(B, T) int -> (B, T, word_embed_proj_dim) float32 token embeddings."""
    return self.embed_tokens(input_ids)

  def __call__(self, embeds, positions, mask, cache=None):
    """Logits (B, T, V) float32.

    embeds: (B, T, word_embed_proj_dim); positions: (B, T) int OPT position
    ids (before the offset); mask: bool (B, 1, T, Tk), True = attend.
    cache: None or dict(k, v: (L, B, Lmax, H, Dh), index) (see Blip2.prefill);
    returns (logits, new cache or None).
    """
    c = self.cfg
    x = embeds.astype(self.dtype)
    if c.has_projections:
      x = self.project_in(x)
    pos = self.embed_positions(positions + OPT_POSITION_OFFSET)
    x = x + pos.astype(self.dtype)
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else (cache["k"][i], cache["v"][i], cache["index"])
      x, new = layer(x, mask, layer_cache)
      if new is not None:
        ks.append(new[0])
        vs.append(new[1])
    if c.has_final_layer_norm:
      x = self.final_layer_norm(x)
    if c.has_projections:
      x = self.project_out(x)
    if c.tie_word_embeddings:
      logits = self.embed_tokens.attend(x.astype(jnp.float32))
    else:
      logits = self.lm_head(x)
    new_cache = None if cache is None else dict(cache, k=jnp.stack(ks), v=jnp.stack(vs))
    return logits.astype(jnp.float32), new_cache


def scatter_image_embeds(embeds, input_ids, image_embeds, image_token_id):
  """transformers 5's masked_scatter of the image embeddings into the placeholders.

  embeds: (B, T, E) token embeddings; input_ids: (B, T); image_embeds:
  (B, Q, D) with E <= D. The k-th placeholder of row b (k < Q) gets
  image_embeds[b, k] when E == D. masked_scatter reads the source in memory
  order, so when E < D (word_embed_proj_dim < hidden_size; no released BLIP-2)
  the placeholders get consecutive E-wide chunks of the flattened image
  embeddings; that is reproduced here so the logits stay equal.
  Rows must hold exactly Q placeholders (checked by the caller).
  """
  b, q, d = image_embeds.shape
  e = embeds.shape[-1]
  chunks = image_embeds.reshape(-1)[:b * q * e].reshape(b, q, e)
  is_image = input_ids == image_token_id
  slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, q - 1)
  picked = jnp.take_along_axis(chunks, slot[..., None], axis=1)
  return jnp.where(is_image[..., None], picked.astype(embeds.dtype), embeds)


def opt_positions(attention_mask):
  """OPT's position ids: cumsum(mask) * mask - 1 ((B, T) int32; padding -> -1)."""
  m = attention_mask.astype(jnp.int32)
  return jnp.cumsum(m, axis=1) * m - 1


class Blip2Module(nn.Module):
  """Blip2ForConditionalGeneration (decoder-only OPT)."""
  cfg: Blip2Config

  def setup(self):
    c = self.cfg
    self.vision_model = VisionModel(c.vision, c.dtype, c.remat)
    self.query_tokens = self.param("query_tokens", nn.initializers.zeros,
                                   (1, c.num_query_tokens, c.qformer.hidden_size), jnp.float32)
    self.qformer = QFormer(c.qformer)
    self.language_projection = layers.dense(c.text.hidden_size, c.dtype, "language_projection")
    self.language_model = OPTForCausalLM(c.text, c.dtype, c.remat)

  def encode(self, images):
    """Images (B, H, W, C) in [0, 1] -> image embeddings (B, Q, D) compute dtype."""
    states = self.vision_model(images)
    queries = jnp.broadcast_to(self.query_tokens, (states.shape[0],) + self.query_tokens.shape[1:])
    return self.language_projection(self.qformer(queries, states).astype(self.cfg.dtype))

  def embed(self, image_embeds, input_ids):
    embeds = self.language_model.embed(input_ids)
    return scatter_image_embeds(embeds, input_ids, image_embeds, self.cfg.image_token_id)

  def __call__(self, images, input_ids, attention_mask):
    """Teacher-forced logits (B, T, V) float32."""
    embeds = self.embed(self.encode(images), input_ids)
    t = input_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
    return self.language_model(embeds, opt_positions(attention_mask), mask)[0]

  def lm(self, embeds, positions, mask, cache):
    return self.language_model(embeds, positions, mask, cache)

  def embed_tokens(self, input_ids):
    return self.language_model.embed(input_ids)


# ----------------------------------------------------------------------------
# The static model: config only, hashable and equal by value.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Blip2:
  """A BLIP-2 OPT architecture: pure functions of the params given.

  Hashable and equal by value (its config), so it is a safe jit static
  argument: two checkpoints of the same config compile once.

  Shapes: B batch, H = W = image_size, C channels, Q num_query_tokens, D OPT
  hidden_size, T tokens (Q image placeholders included), V vocab_size, L OPT
  layers, NH heads, Dh head width.
  """
  config: Blip2Config
  kind = "blip-2"  # config.json's model_type
  task = "captioning"  # what evaluate.py measures it with (prsl_jax.tasks)
  # Top-level param keys per tower (config.train_towers): 'vision' is
  # everything before OPT (the authors' setting, TRAINABLE_PARTS['authors']),
  # 'text' the OPT language model; 'qformer' also freezes the vision encoder
  # (LAVIS's freeze_vit=True).
  towers = {"vision": ("vision_model", "query_tokens", "qformer", "language_projection"),
            "text": ("language_model",),
            "both": ("vision_model", "query_tokens", "qformer", "language_projection",
                     "language_model"),
            "qformer": ("query_tokens", "qformer", "language_projection")}

  @property
  def module(self) -> Blip2Module:
    return Blip2Module(self.config)

  def init(self, key):
    """Random float32 params (for training from scratch)."""
    c = self.config
    v = c.vision
    images = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    ids = jnp.asarray([[c.image_token_id] * c.num_query_tokens + [0]], jnp.int32)
    variables = self.module.init(key, images, ids, jnp.ones_like(ids))
    return nn.unbox(variables)["params"]

  def param_shapes(self):
    """Nested dict of jax.ShapeDtypeStruct: the params' structure, no FLOPs."""
    return jax.eval_shape(self.init, jax.random.key(0))

  def encode(self, params, images):
    """images (B, H, W, C) float in [0, 1] -> (B, Q, D) float32: the projected
    Q-Former outputs (transformers' get_image_features(...).pooler_output)."""
    out = self.module.apply({"params": params}, images, method=Blip2Module.encode)
    return out.astype(jnp.float32)

  def logits(self, params, images, input_ids, attention_mask=None):
    """Teacher-forced logits (B, T, V) float32: transformers'
    Blip2ForConditionalGeneration(pixel_values, input_ids, attention_mask).logits
    with images (B, H, W, C) in [0, 1].

    input_ids: (B, T) int with exactly num_query_tokens image_token_id
    placeholders per row (see prompt_ids); position t's logits predict token
    t + 1. attention_mask: (B, T), 0 = padding; None = all ones.
    """
    self.check_ids(input_ids, attention_mask)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    return self.module.apply({"params": params}, images, input_ids, attention_mask)

  def caption_logits(self, params, images, decoder_input_ids, decoder_attention_mask=None):
    """The captioning task's token logits (B, T, V) float32, as a captioner's.

    decoder_input_ids: (B, T) int, the caption after the image: bos (+ prompt),
    then its tokens (captioning.teacher_forcing builds them from labels with
    decoder_start_token_id = bos); decoder_attention_mask: (B, T), 0 = padding.
    Runs logits() on [image_token_id] * Q + decoder_input_ids and drops the Q
    placeholder positions, so position t predicts decoder_input_ids[:, t + 1]
    and labels of IGNORE_INDEX on the prompt keep it out of the loss (as
    lm_labels).
    """
    b, q = decoder_input_ids.shape[0], self.config.num_query_tokens
    ids = jnp.concatenate([jnp.full((b, q), self.config.image_token_id, jnp.int32),
                           jnp.asarray(decoder_input_ids, jnp.int32)], axis=1)
    mask = None
    if decoder_attention_mask is not None:
      mask = jnp.concatenate([jnp.ones((b, q), jnp.int32),
                              jnp.asarray(decoder_attention_mask, jnp.int32)], axis=1)
    return self.logits(params, images, ids, mask)[:, q:]

  def caption(self, params, images, max_length=None, prompt=(), prompt_mask=None):
    """The captioning task's greedy captions (B, max_length) int32, as a
    captioner's: bos, then blip2_generation.greedy's max_length - 1 tokens
    (EOS, then pad); max_length None: self.max_length.

    prompt: a question's token ids (the tokenizer's, without bos): one list for
    every image, or (B, P) per image, left-padded with prompt_mask (B, P) 0 on
    the padding; e.g. "Question: what digit is this? Answer:". Generation
    starts after it and the result is (B, 1 + P + max_length - 1): bos, the
    prompt, the answer. The padding sits between bos and the question (masked,
    and OPT's positions count only unmasked tokens, so the logits are those of
    the unpadded row); teacher-forcing the first columns through caption_logits
    with the same mask gives the answer's logits.
    """
    n = generation.resolve_max_length(self, max_length)
    b = images.shape[0]
    bos = jnp.full((b, 1), self.bos_token_id, jnp.int32)
    if np.shape(prompt)[-1] == 0:
      return jnp.concatenate([bos, blip2_generation.greedy(self, params, images,
                                                           max_new_tokens=n - 1)], axis=1)
    p = jnp.asarray(prompt, jnp.int32)
    p = jnp.broadcast_to(p, (b, p.shape[-1]))
    mask = jnp.ones(p.shape, jnp.int32) if prompt_mask is None else jnp.broadcast_to(
        jnp.asarray(prompt_mask, jnp.int32), p.shape)
    head = jnp.asarray(self.prompt_ids(batch_size=b))
    ids = jnp.concatenate([head, p], axis=1)
    full_mask = jnp.concatenate([jnp.ones(head.shape, jnp.int32), mask], axis=1)
    new = blip2_generation.greedy(self, params, images, ids, full_mask, max_new_tokens=n - 1)
    return jnp.concatenate([bos, p, new], axis=1)

  def prefill(self, params, images, input_ids, attention_mask=None, *, max_new_tokens):
    """Runs the prompt once and returns (logits (B, V) float32 of the token
    after the prompt, the decoding cache for max_new_tokens more tokens).

    The cache is a dict:
      k, v:      (L, B, T + max_new_tokens, NH, Dh) compute dtype
      key_mask:  (B, T + max_new_tokens) bool, the prompt's attention mask then
                 True (generated tokens)
      position:  (B,) int32, the OPT position id of the next token
      index:     int32 scalar, the next slot to write (T)
    Rows are sequences, so beam search reorders a cache with
    jnp.take(x, rows, axis=...) on every per-row array.
    """
    self.check_ids(input_ids, attention_mask)
    c = self.config
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    total = t + max_new_tokens
    if total > c.text.max_position_embeddings:
      raise ValueError(f"prompt length {t} + max_new_tokens {max_new_tokens} exceeds "
                       f"the language model's max_position_embeddings="
                       f"{c.text.max_position_embeddings}: at most {c.text.max_position_embeddings - t} "
                       "new tokens fit; lower evaluate.py --max_length or config.eval.max_length "
                       "(they count the start token too) or shorten the prompt")
    key_mask = jnp.concatenate([attention_mask.astype(bool),
                                jnp.ones((b, max_new_tokens), bool)], axis=1)
    shape = (c.text.num_hidden_layers, b, total, c.text.num_attention_heads, c.text.head_dim)
    cache = dict(k=jnp.zeros(shape, c.dtype), v=jnp.zeros(shape, c.dtype), key_mask=key_mask,
                 position=jnp.sum(attention_mask.astype(jnp.int32), axis=1),
                 index=jnp.zeros((), jnp.int32))

    def f(module, images, ids, mask, cache):
      embeds = module.embed(module.encode(images), ids)
      causal = jnp.arange(total)[None, :] <= jnp.arange(t)[:, None]  # (t, total)
      attend = causal[None, None] & cache["key_mask"][:, None, None, :]
      return module.lm(embeds, opt_positions(mask), attend, cache)
    logits, cache = self.module.apply({"params": params}, images, input_ids, attention_mask,
                                      cache, method=f)
    return logits[:, -1], dict(cache, index=jnp.int32(t))

  def decode_step(self, params, cache, token_ids):
    """Feeds token_ids (N,) int at slot cache['index'].

    Returns (logits (N, V) float32 for the next token, the updated cache).
    Equal to logits() at that position for the same prefix.
    """
    index = cache["index"]

    def f(module, ids, cache):
      embeds = module.embed_tokens(ids[:, None])
      total = cache["key_mask"].shape[1]
      attend = (jnp.arange(total)[None, :] <= index) & cache["key_mask"]
      return module.lm(embeds, cache["position"][:, None], attend[:, None, None, :], cache)
    logits, cache = self.module.apply({"params": params}, token_ids, cache, method=f)
    return logits[:, 0], dict(cache, index=index + 1, position=cache["position"] + 1)

  def prompt_ids(self, prompts=None, batch_size=None):
    """input_ids as Blip2Processor builds them: [image_token_id] * Q + [bos] +
    prompt tokens. prompts: a list of token-id lists (the tokenizer's ids
    without its bos), all of one length, or None for captioning
    (batch_size rows of image tokens + bos). Returns (B, T) int32 numpy."""
    c = self.config
    head = [c.image_token_id] * c.num_query_tokens + [c.text.bos_token_id]
    if prompts is None:
      if batch_size is None:
        raise ValueError("prompt_ids needs prompts or batch_size")
      return np.asarray([head] * batch_size, np.int32)
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
      raise ValueError(f"prompts have different lengths {sorted(lengths)}; pad them "
                       "on the left and pass an attention_mask")
    return np.asarray([head + list(p) for p in prompts], np.int32)

  def check_ids(self, ids, mask):
    """Raises unless ids (B, T) fit the positions, mask (B, T) matches, and every
    concrete row holds exactly num_query_tokens image placeholders."""
    c = self.config
    n = c.text.max_position_embeddings
    if ids.ndim != 2 or ids.shape[1] > n:
      raise ValueError(f"input_ids must have shape (B, T) with T <= max_position_embeddings="
                       f"{n}, got {ids.shape}")
    if mask is not None and mask.shape != ids.shape:
      raise ValueError(f"attention_mask shape {mask.shape} must equal input_ids shape "
                       f"{ids.shape}")
    if losses.is_concrete(ids):
      counts = np.sum(np.asarray(ids) == c.image_token_id, axis=1)
      if (counts != c.num_query_tokens).any():
        raise ValueError(
            f"each row of input_ids must hold num_query_tokens={c.num_query_tokens} "
            f"image_token_id={c.image_token_id} placeholders, got {counts.tolist()} "
            "(build them with Blip2.prompt_ids)")

  @property
  def image_size(self):
    return self.config.vision.image_size

  @property
  def vocab_size(self):
    return self.config.text.vocab_size

  @property
  def max_positions(self):
    """Caption tokens (bos included) that fit after the Q image placeholders."""
    return self.config.text.max_position_embeddings - self.config.num_query_tokens

  @property
  def max_length(self):
    """Default caption length (tokens, bos included): transformers' 20, capped."""
    return min(captioner.HF_DEFAULT_MAX_LENGTH, self.max_positions)

  @property
  def decoder_start_token_id(self):
    """The token a caption's teacher-forced inputs start with (bos)."""
    return self.config.text.bos_token_id

  @property
  def num_query_tokens(self):
    return self.config.num_query_tokens

  @property
  def image_token_id(self):
    return self.config.image_token_id

  @property
  def bos_token_id(self):
    return self.config.text.bos_token_id

  @property
  def eos_token_id(self):
    return self.config.text.eos_token_id

  @property
  def pad_token_id(self):
    """The fill after EOS in generation: pad_token_id, else eos (as generate)."""
    t = self.config.text
    return t.pad_token_id if t.pad_token_id is not None else t.eos_token_id


# Which top-level params a fine-tuning run trains (the rest stay frozen).
# The authors (karlieswift/Mattack, blip2opt/, LAVIS's Blip2OPT with their
# blip2_caption_opt2.7b.yaml) froze OPT and trained the rest: freeze_vit is
# False there, so the vision encoder, query tokens, Q-Former and projection
# train while the PRSL loss is computed on the frozen OPT's token logits.
# Their VQA run (blip2opt/blip2opt/projects/blip2/train/caption_coco_vqa_ft.yaml)
# sets freeze_vit: True: 'qformer' (query tokens, Q-Former, projection).
# blip2opt/blip2opt/models/blip2_models/blip2_opt.py freezes OPT in both.
TRAINABLE_PARTS = {
    "authors": Blip2.towers["vision"],
    "qformer": Blip2.towers["qformer"],  # LAVIS's freeze_vit=True
    "language_model": Blip2.towers["text"],
    "all": Blip2.towers["both"],
}


def trainable_mask(params, parts="authors"):
  """A pytree of bools like params: True on the leaves of TRAINABLE_PARTS[parts]
  (for optax.masked / multi_transform)."""
  if parts not in TRAINABLE_PARTS:
    raise ValueError(f"parts={parts!r}; expected one of {sorted(TRAINABLE_PARTS)}")
  keep = TRAINABLE_PARTS[parts]
  return {k: jax.tree.map(lambda _, t=k in keep: t, v) for k, v in params.items()}


def lm_labels(input_ids, loss_mask):
  """Labels aligned with Blip2.logits for a token loss (the authors' targets).

  input_ids: (B, T) int; loss_mask: (B, T) bool/int, 1 on the tokens to learn
  (the answer or caption tokens, EOS included), 0 on image placeholders, bos,
  the prompt and padding. Returns (B, T) int32 where labels[:, t] =
  input_ids[:, t + 1] if loss_mask[:, t + 1] else -100 (the last column is
  -100): the logits at t predict token t + 1, so
  prsl_jax.losses.prsl_loss(logits, lm_labels(ids, mask)) is PRSL over the
  answer tokens only, as the authors trained BLIP-2 ("DRSL3" over the OPT
  token logits, prompt and padding targets = -100).
  """
  ids = jnp.asarray(input_ids, jnp.int32)
  keep = jnp.asarray(loss_mask).astype(bool)
  nxt = jnp.where(keep[:, 1:], ids[:, 1:], IGNORE_INDEX)
  return jnp.concatenate([nxt, jnp.full(ids.shape[:1] + (1,), IGNORE_INDEX, jnp.int32)], axis=1)


# ----------------------------------------------------------------------------
# HuggingFace Blip2ForConditionalGeneration: config and explicit key map.
# HF state-dict name -> (flax param path, layout kind) as in captioner.key_map
# ("linear" transposed, "conv" OIHW <-> HWIO, "copy" as is). The vision
# attention's fused qkv.bias (transformers 5's layout: [q_bias, 0, v_bias])
# is split by adapt_state_dict into the q_bias / v_bias names below (the
# original BLIP-2 names) and fused again by export_state_dict.
# ----------------------------------------------------------------------------



def key_map(config):
  """[(hf_name, flax_path, kind)] for every parameter of a Blip2Module(config)."""
  v, q, t = config.vision, config.qformer, config.text
  vm, qf, lm = ("vision_model",), ("qformer",), ("language_model",)
  out = [
      ("query_tokens", ("query_tokens",), "copy"),
      ("vision_model.embeddings.class_embedding", vm + ("class_embedding",), "copy"),
      ("vision_model.embeddings.position_embedding", vm + ("position_embedding",), "copy"),
      ("vision_model.embeddings.patch_embedding.weight", vm + ("patch_embedding", "kernel"),
       "conv"),
      ("vision_model.embeddings.patch_embedding.bias", vm + ("patch_embedding", "bias"), "copy"),
  ]
  for i in range(v.num_hidden_layers):
    h, f = f"vision_model.encoder.layers.{i}", vm + (f"layers_{i}",)
    out += layers.linear_keys(f"{h}.self_attn.qkv", f + ("self_attn", "qkv"), bias=False)
    if v.qkv_bias:
      out += [(f"{h}.self_attn.q_bias", f + ("self_attn", "q_bias"), "copy"),
              (f"{h}.self_attn.v_bias", f + ("self_attn", "v_bias"), "copy")]
    out += layers.linear_keys(f"{h}.self_attn.projection", f + ("self_attn", "projection"))
    out += layers.layer_norm_keys(f"{h}.layer_norm1", f + ("layer_norm1",))
    out += layers.linear_keys(f"{h}.mlp.fc1", f + ("fc1",))
    out += layers.linear_keys(f"{h}.mlp.fc2", f + ("fc2",))
    out += layers.layer_norm_keys(f"{h}.layer_norm2", f + ("layer_norm2",))
  out += layers.layer_norm_keys("vision_model.post_layernorm", vm + ("post_layernorm",))
  out += layers.layer_norm_keys("qformer.layernorm", qf + ("layernorm",))
  for i in range(q.num_hidden_layers):
    h, f = f"qformer.encoder.layer.{i}", qf + (f"layer_{i}",)
    for part in ("attention",) + (("crossattention",) if q.has_cross_attention(i) else ()):
      for name in ("query", "key", "value"):
        out += layers.linear_keys(f"{h}.{part}.attention.{name}", f + (part, name))
      out += layers.linear_keys(f"{h}.{part}.output.dense", f + (part, "output_dense"))
      out += layers.layer_norm_keys(f"{h}.{part}.output.LayerNorm", f + (part, "output_LayerNorm"))
    out += layers.linear_keys(f"{h}.intermediate_query.dense", f + ("intermediate_query",))
    out += layers.linear_keys(f"{h}.output_query.dense", f + ("output_query_dense",))
    out += layers.layer_norm_keys(f"{h}.output_query.LayerNorm", f + ("output_query_LayerNorm",))
  out += layers.linear_keys("language_projection", ("language_projection",))
  d = "language_model.model.decoder"
  out += [(f"{d}.embed_tokens.weight", lm + ("embed_tokens", "embedding"), "copy"),
          (f"{d}.embed_positions.weight", lm + ("embed_positions", "embedding"), "copy")]
  if t.has_projections:
    out += layers.linear_keys(f"{d}.project_in", lm + ("project_in",), bias=False)
    out += layers.linear_keys(f"{d}.project_out", lm + ("project_out",), bias=False)
  for i in range(t.num_hidden_layers):
    h, f = f"{d}.layers.{i}", lm + (f"layers_{i}",)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      out += layers.linear_keys(f"{h}.self_attn.{name}", f + ("self_attn", name), t.enable_bias)
    out += layers.layer_norm_keys(f"{h}.self_attn_layer_norm", f + ("self_attn_layer_norm",))
    out += layers.linear_keys(f"{h}.fc1", f + ("fc1",), t.enable_bias)
    out += layers.linear_keys(f"{h}.fc2", f + ("fc2",), t.enable_bias)
    out += layers.layer_norm_keys(f"{h}.final_layer_norm", f + ("final_layer_norm",))
  if t.has_final_layer_norm:
    out += layers.layer_norm_keys(f"{d}.final_layer_norm", lm + ("final_layer_norm",))
  if not t.tie_word_embeddings:
    out += [("language_model.lm_head.weight", lm + ("lm_head", "kernel"), "linear")]
  return out


def adapt_state_dict(state_dict, model):
  """A checkpoint's {name: array} -> the same in key_map's terms.

  What transformers does on load, made explicit (convert.load_pretrained calls
  this before matching names):
    * the vision attention's fused qkv.bias [q, k, v] becomes q_bias and
      v_bias; a non-zero k part is refused (BLIP-2's k bias is zero by design;
      this port keeps it structurally zero);
    * language_model.lm_head.weight is dropped when the LM ties it to
      embed_tokens (transformers ties it, ignoring the stored copy).

  Returns:
    (state_dict, model).
  """
  state = {}
  d = model.config.vision.hidden_size
  for name, x in state_dict.items():
    if name.startswith("vision_model.") and name.endswith(".self_attn.qkv.bias"):
      x = np.asarray(x)
      if x.shape != (3 * d,):
        raise ValueError(f"{name} has shape {x.shape}; expected ({3 * d},)")
      if np.any(x[d:2 * d] != 0):
        raise ValueError(f"{name} has a non-zero key bias; BLIP-2's vision attention has "
                         "q and v biases only (this port keeps the k bias at zero)")
      stem = name[:-len("qkv.bias")]
      state[stem + "q_bias"], state[stem + "v_bias"] = x[:d], x[2 * d:]
      continue
    state[name] = x
  if model.config.text.tie_word_embeddings:
    state.pop("language_model.lm_head.weight", None)
  return state, model


def export_state_dict(state_dict, model):
  """key_map's {name: array} -> transformers 5's: q_bias / v_bias fused into
  qkv.bias = [q_bias, 0, v_bias] (convert.save_pretrained calls this)."""
  state = {}
  for name, x in state_dict.items():
    if name.endswith(".self_attn.q_bias"):
      stem = name[:-len("q_bias")]
      v = state_dict[stem + "v_bias"]
      state[stem + "qkv.bias"] = np.concatenate([x, np.zeros_like(x), v])
    elif not name.endswith(".self_attn.v_bias"):
      state[name] = x
  return state


def config_to_hf(config):
  """Our Blip2Config -> transformers.Blip2Config (config.json)."""
  import transformers  # pylint: disable=g-import-not-at-top
  v, q, t = config.vision, config.qformer, config.text
  vision = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
                layer_norm_eps=v.layer_norm_eps, qkv_bias=v.qkv_bias)
  qformer = dict(hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
                 num_attention_heads=q.num_attention_heads,
                 intermediate_size=q.intermediate_size, hidden_act=q.hidden_act,
                 layer_norm_eps=q.layer_norm_eps,
                 cross_attention_frequency=q.cross_attention_frequency,
                 encoder_hidden_size=v.hidden_size, vocab_size=q.vocab_size,
                 max_position_embeddings=q.max_position_embeddings)
  text = transformers.OPTConfig(
      vocab_size=t.vocab_size, hidden_size=t.hidden_size,
      num_hidden_layers=t.num_hidden_layers, ffn_dim=t.ffn_dim,
      num_attention_heads=t.num_attention_heads,
      max_position_embeddings=t.max_position_embeddings,
      do_layer_norm_before=t.do_layer_norm_before,
      _remove_final_layer_norm=t.remove_final_layer_norm,
      word_embed_proj_dim=t.embed_dim, activation_function=t.activation_function,
      enable_bias=t.enable_bias, tie_word_embeddings=t.tie_word_embeddings,
      bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id)
  hf = transformers.Blip2Config(
      vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
      num_query_tokens=config.num_query_tokens, image_token_index=config.image_token_id,
      image_text_hidden_size=config.image_text_hidden_size,
      tie_word_embeddings=t.tie_word_embeddings)
  hf.architectures = ["Blip2ForConditionalGeneration"]
  return hf


def preprocessor_config(config):
  """preprocessor_config.json: the fields of transformers' BlipImageProcessor."""
  v = config.vision
  return {
      "image_processor_type": "BlipImageProcessor",
      "do_resize": True, "size": {"height": v.image_size, "width": v.image_size},
      "resample": 3,  # bicubic
      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "do_convert_rgb": True,
      "image_mean": list(v.image_mean), "image_std": list(v.image_std),
  }


def load_tokenizer(folder):
  """The folder's tokenizer (GPT2Tokenizer(Fast) for OPT)."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoTokenizer.from_pretrained(folder)


def from_hf(hf_config, *, image_mean=None, image_std=None, dtype=jnp.float32, remat=False):
  """The static Blip2 for a transformers Blip2Config or config.json dict."""
  return Blip2(config_from_hf(hf_config, image_mean=image_mean, image_std=image_std,
                              dtype=dtype, remat=remat))


def vocab_size(model):
  return model.config.text.vocab_size


MODEL = Blip2  # the static model class of this kind (models/__init__.py)
