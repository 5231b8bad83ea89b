"""CLIP in flax.linen, numerically matching transformers' PyTorch CLIPModel.

Two towers, as in transformers/models/clip/modeling_clip.py:

  vision: NHWC images in [0, 1] -> (x - mean) / std -> patch conv (no bias)
          -> [CLS; patches] + positions -> pre_layrnorm -> encoder
          -> post_layernorm(CLS) -> visual_projection (no bias)
  text:   token + position embeddings -> encoder (causal AND padding mask)
          -> final_layer_norm -> pool at the EOS token -> text_projection

Pixel normalisation lives inside the image encoder so that attacks, budgets and
data pipelines all work on [0, 1] pixels. Parameter names mirror the HF state
dict (`key_map` below is the explicit map); the top-level keys are exactly
'vision_model', 'text_model', 'visual_projection', 'text_projection',
'logit_scale' (the trainer masks the optimizer by them).

`CLIP` is the static part of a model: its config, hashable and equal by value,
so two checkpoints of one architecture share every compiled function. Params
are a plain pytree passed as an argument, never stored in it.

`dtype` is the compute dtype; params are always float32 and the projected
embeddings are returned in float32, so logits and attack gradients stay float32.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from prsl_jax.losses import l2_normalize
from prsl_jax.models import layers

# OpenAI CLIP's pixel statistics, used when a checkpoint has no
# preprocessor_config.json.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    # transformers' NewGELUActivation and PytorchGELUTanh are the tanh form.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  image_size: int
  patch_size: int
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # eos_token_id == 2 marks legacy configs: pooling then takes argmax(input_ids)
  # (transformers keeps that behaviour, so do we).
  eos_token_id: int = 49407
  bos_token_id: int = 49406
  pad_token_id: int = 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Static description of a CLIP model (hashable, safe as a jit static)."""
  vision: VisionConfig
  text: TextConfig
  projection_dim: int
  logit_scale_init_value: float = 2.6592
  dtype: Any = jnp.float32  # compute dtype; params stay float32
  remat: bool = False  # nn.remat each encoder layer (memory for compute)


def config_from_hf(hf_config, *, image_mean=None, image_std=None,
                   dtype=jnp.float32, remat=False):
  """Our CLIPConfig from a transformers CLIPConfig (or its config.json dict).

  Args:
    hf_config: transformers.CLIPConfig, or a dict as in config.json.
    image_mean, image_std: per-channel pixel statistics on [0, 1] pixels;
      None means OpenAI CLIP's.
    dtype: compute dtype (params stay float32).
    remat: rematerialise encoder layers in the backward pass.
  """
  d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  v, t = d.get("vision_config") or {}, d.get("text_config") or {}
  for name, sub in (("vision_config", v), ("text_config", t)):
    act = layers.pick(sub, "hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
      raise ValueError(f"{name}.hidden_act={act!r} is not supported; "
                       f"expected one of {sorted(ACTIVATIONS)}")
  image_size, patch_size = layers.pick(v, "image_size", 224), layers.pick(v, "patch_size", 32)
  for name, val in (("image_size", image_size), ("patch_size", patch_size)):
    if not isinstance(val, int):
      raise ValueError(f"vision_config.{name} must be an int (square images, as "
                       f"transformers' CLIPVisionEmbeddings assumes), got {val!r}")
  eos = layers.pick(t, "eos_token_id", 49407)
  if not isinstance(eos, int):
    raise ValueError(f"text_config.eos_token_id must be one int, got {eos!r}")
  num_channels = layers.pick(v, "num_channels", 3)
  mean, std = layers.pixel_stats(image_mean, image_std, num_channels, OPENAI_CLIP_MEAN,
                                 OPENAI_CLIP_STD)
  vision = VisionConfig(
      hidden_size=layers.pick(v, "hidden_size", 768),
      intermediate_size=layers.pick(v, "intermediate_size", 3072),
      num_hidden_layers=layers.pick(v, "num_hidden_layers", 12),
      num_attention_heads=layers.pick(v, "num_attention_heads", 12),
      image_size=image_size, patch_size=patch_size, num_channels=num_channels,
      hidden_act=layers.pick(v, "hidden_act", "quick_gelu"),
      layer_norm_eps=float(layers.pick(v, "layer_norm_eps", 1e-5)),
      image_mean=mean, image_std=std)
  text = TextConfig(
      vocab_size=layers.pick(t, "vocab_size", 49408),
      hidden_size=layers.pick(t, "hidden_size", 512),
      intermediate_size=layers.pick(t, "intermediate_size", 2048),
      num_hidden_layers=layers.pick(t, "num_hidden_layers", 12),
      num_attention_heads=layers.pick(t, "num_attention_heads", 8),
      max_position_embeddings=layers.pick(t, "max_position_embeddings", 77),
      hidden_act=layers.pick(t, "hidden_act", "quick_gelu"),
      layer_norm_eps=float(layers.pick(t, "layer_norm_eps", 1e-5)),
      eos_token_id=eos,
      bos_token_id=layers.pick(t, "bos_token_id", 49406),
      pad_token_id=layers.pick(t, "pad_token_id", 1))
  for name, sub in (("vision_config", vision), ("text_config", text)):
    if sub.hidden_size % sub.num_attention_heads:
      raise ValueError(f"{name}.hidden_size={sub.hidden_size} is not a multiple of "
                       f"num_attention_heads={sub.num_attention_heads}")
  return CLIPConfig(
      vision=vision, text=text,
      projection_dim=layers.pick(d, "projection_dim", 512),
      logit_scale_init_value=float(layers.pick(d, "logit_scale_init_value", 2.6592)),
      dtype=jnp.dtype(dtype), remat=bool(remat))


class Attention(nn.Module):
  """Multi-head self-attention with HF's q/k/v/out_proj names."""
  hidden_size: int
  num_heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x, mask=None):
    """x: (B, T, D); mask: bool broadcastable to (B, N, T, T), True = attend."""
    b, t, _ = x.shape
    head_dim = self.hidden_size // self.num_heads
    split = lambda y: y.reshape(b, t, self.num_heads, head_dim)
    q = split(layers.dense(self.hidden_size, self.dtype, "q_proj")(x))
    k = split(layers.dense(self.hidden_size, self.dtype, "k_proj")(x))
    v = split(layers.dense(self.hidden_size, self.dtype, "v_proj")(x))
    # Default scale is head_dim**-0.5, as in CLIPAttention.
    y = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return layers.dense(self.hidden_size, self.dtype, "out_proj")(y.reshape(b, t, -1))


class MLP(nn.Module):
  hidden_size: int
  intermediate_size: int
  act: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = layers.dense(self.intermediate_size, self.dtype, "fc1")(x)
    x = ACTIVATIONS[self.act](x)
    return layers.dense(self.hidden_size, self.dtype, "fc2")(x)


class EncoderLayer(nn.Module):
  """Pre-LN transformer block (CLIPEncoderLayer)."""
  hidden_size: int
  intermediate_size: int
  num_heads: int
  act: str
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x, mask=None):
    h = layers.layer_norm(self.eps, self.dtype, "layer_norm1")(x)
    x = x + Attention(self.hidden_size, self.num_heads, self.dtype, name="self_attn")(h, mask)
    h = layers.layer_norm(self.eps, self.dtype, "layer_norm2")(x)
    mlp = MLP(self.hidden_size, self.intermediate_size, self.act, self.dtype, name="mlp")
    return x + mlp(h)


class Encoder(nn.Module):
  """Stack of EncoderLayer named layers_0..layers_{L-1} (HF: layers.{i})."""
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  act: str
  eps: float
  dtype: Any
  remat: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
    for i in range(self.num_layers):
      x = layer_cls(self.hidden_size, self.intermediate_size, self.num_heads,
                    self.act, self.eps, self.dtype, name=f"layers_{i}")(x, mask)
    return x


def _encoder(cfg, dtype, remat):
  return Encoder(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                 cfg.num_attention_heads, cfg.hidden_act, cfg.layer_norm_eps,
                 dtype, remat, name="encoder")


class PatchEmbedding(nn.Module):
  """Non-overlapping p x p patches -> D features (HF's stride-p Conv2d, no bias).

  Written as patchify + one matmul instead of nn.Conv: the same param
  ('kernel', (p, p, C, D), nn.Conv's default lecun_normal init) and the same
  result up to float rounding, but XLA:CPU runs the input gradient of a strided
  conv ~5x slower than that of the matmul (measured for ViT-B/32 at batch 8:
  ~1.0 s vs ~0.2 s of a ~4 s attack step; bench/RESULTS.md), and attacks
  differentiate w.r.t. the pixels at every step.
  """
  features: int
  patch_size: int
  dtype: Any

  @nn.compact
  def __call__(self, pixels):
    """pixels: (B, H, W, C) -> (B, (H/p) * (W/p), D), patches in row-major (h, w)
    order, as torch's flatten(2) on the conv output (B, D, h, w)."""
    b, height, width, c = pixels.shape
    p = self.patch_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (p, p, c, self.features), jnp.float32)
    h, w = height // p, width // p
    x = pixels[:, :h * p, :w * p]  # VALID padding: a remainder is dropped
    x = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * c)
    kernel = kernel.reshape(p * p * c, self.features)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class VisionEmbeddings(nn.Module):
  cfg: VisionConfig
  dtype: Any

  @nn.compact
  def __call__(self, pixels):
    """pixels: (B, H, W, C) normalised -> (B, 1 + num_patches, D)."""
    cfg = self.cfg
    x = PatchEmbedding(cfg.hidden_size, cfg.patch_size, self.dtype,
                       name="patch_embedding")(pixels)
    b = x.shape[0]
    cls = self.param("class_embedding",
                     nn.initializers.normal(cfg.hidden_size ** -0.5),
                     (cfg.hidden_size,), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, x], axis=1)
    num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
    pos = nn.Embed(num_positions, cfg.hidden_size, dtype=self.dtype,
                   param_dtype=jnp.float32, name="position_embedding")
    return x + pos(jnp.arange(num_positions))[None]


class VisionTransformer(nn.Module):
  """HF CLIPVisionModel: returns the pooled (B, D) post_layernorm CLS state."""
  cfg: VisionConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images):
    """images: (B, H, W, C) float in [0, 1] at the model's resolution."""
    cfg = self.cfg
    x = layers.normalize_images(images, cfg.image_size, cfg.num_channels, cfg.image_mean,
                                cfg.image_std, self.dtype)
    x = VisionEmbeddings(cfg, self.dtype, name="embeddings")(x)
    x = layers.layer_norm(cfg.layer_norm_eps, self.dtype, "pre_layrnorm")(x)  # sic, HF's name
    x = _encoder(cfg, self.dtype, self.remat)(x)
    return layers.layer_norm(cfg.layer_norm_eps, self.dtype, "post_layernorm")(x[:, 0])


class TextEmbeddings(nn.Module):
  cfg: TextConfig
  dtype: Any

  @nn.compact
  def __call__(self, input_ids):
    """input_ids: (B, T) int -> (B, T, D) token + position embeddings."""
    cfg = self.cfg
    tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                   param_dtype=jnp.float32, name="token_embedding")
    pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                   param_dtype=jnp.float32, name="position_embedding")
    return tok(input_ids) + pos(jnp.arange(input_ids.shape[1]))[None]


class TextTransformer(nn.Module):
  """HF CLIPTextModel: returns the pooled (B, D) state at the EOS token."""
  cfg: TextConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    """input_ids, attention_mask: (B, T) int, T <= max_position_embeddings."""
    cfg = self.cfg
    if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"input_ids must have shape (B, T) with T <= "
                       f"max_position_embeddings={cfg.max_position_embeddings}, "
                       f"got {input_ids.shape}")
    b, t = input_ids.shape
    x = TextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
    # Causal AND key-padding mask, as transformers' create_causal_mask builds it.
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if attention_mask is not None:
      if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} must equal "
                         f"input_ids shape {input_ids.shape}")
      mask = mask & (attention_mask[:, None, None, :] > 0)
    x = _encoder(cfg, self.dtype, self.remat)(x, mask)
    x = layers.layer_norm(cfg.layer_norm_eps, self.dtype, "final_layer_norm")(x)
    if cfg.eos_token_id == 2:
      # Legacy configs (before transformers PR #24773): EOS = largest token id.
      eos_pos = jnp.argmax(input_ids, axis=-1)
    else:
      # First EOS (the pad token may equal EOS); argmax returns the first max.
      eos_pos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
    return x[jnp.arange(b), eos_pos]


class CLIPModule(nn.Module):
  """Two-tower CLIP. Params: vision_model, text_model, visual_projection,
  text_projection, logit_scale."""
  config: CLIPConfig

  def setup(self):
    c = self.config
    self.vision_model = VisionTransformer(c.vision, c.dtype, c.remat)
    self.text_model = TextTransformer(c.text, c.dtype, c.remat)
    self.visual_projection = layers.dense(c.projection_dim, c.dtype, None, use_bias=False)
    self.text_projection = layers.dense(c.projection_dim, c.dtype, None, use_bias=False)
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(c.logit_scale_init_value), (), jnp.float32)

  def encode_images(self, images):
    """images: (B, H, W, C) in [0, 1] -> (B, projection_dim) float32, not normalised."""
    return self.visual_projection(self.vision_model(images)).astype(jnp.float32)

  def encode_texts(self, input_ids, attention_mask=None):
    """input_ids, attention_mask: (B, T) int -> (B, projection_dim) float32."""
    return self.text_projection(
        self.text_model(input_ids, attention_mask)).astype(jnp.float32)

  def __call__(self, images, input_ids, attention_mask=None):
    """Like HF CLIPModel.forward: normalised embeds and scaled cosine logits.

    Returns dict with image_embeds (B_i, P), text_embeds (B_t, P) (both unit
    norm), logits_per_image (B_i, B_t) and logits_per_text (B_t, B_i).
    """
    img = l2_normalize(self.encode_images(images))
    txt = l2_normalize(self.encode_texts(input_ids, attention_mask))
    logits_per_image = jnp.exp(self.logit_scale) * img @ txt.T
    return dict(image_embeds=img, text_embeds=txt,
                logits_per_image=logits_per_image, logits_per_text=logits_per_image.T)




# ----------------------------------------------------------------------------
# The static model: config only, hashable and equal by value.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CLIP:
  """A CLIP architecture: pure functions of the params they are given.

  Hashable and equal by value (its config), so it is a safe jit static argument:
  two checkpoints of the same config compile once, and nothing here keeps
  params alive.
  """
  config: CLIPConfig
  kind = "clip"  # config.json's model_type
  task = "classification"  # what evaluate.py measures it with (prsl_jax.tasks)
  # Top-level param keys per tower (config.train_towers; the optimizer masks by them).
  towers = {"vision": ("vision_model", "visual_projection"),
            "text": ("text_model", "text_projection", "logit_scale"),
            "both": ("vision_model", "visual_projection", "text_model", "text_projection",
                     "logit_scale")}

  @property
  def module(self) -> CLIPModule:
    return CLIPModule(self.config)

  def init(self, key):
    """Random float32 params (for training from scratch)."""
    v, t = self.config.vision, self.config.text
    images = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    ids = jnp.zeros((1, t.max_position_embeddings), jnp.int32)
    return nn.unbox(self.module.init(key, images, ids))["params"]

  def param_shapes(self):
    """Nested dict of jax.ShapeDtypeStruct: the params' structure, no FLOPs."""
    return jax.eval_shape(self.init, jax.random.key(0))

  def encode_images(self, params, images):
    """images: (B, H, W, C) float in [0, 1] -> (B, P) float32, not normalised."""
    return self.module.apply({"params": params}, images, method=CLIPModule.encode_images)

  def encode_texts(self, params, input_ids, attention_mask=None):
    """input_ids, attention_mask: (B, T) int -> (B, P) float32, not normalised."""
    return self.module.apply({"params": params}, input_ids, attention_mask,
                             method=CLIPModule.encode_texts)

  def logit_scale(self, params):
    """exp(params['logit_scale']), float32 scalar.

    Not clipped: transformers' CLIPModel.forward does not clip either (OpenAI
    clamps the parameter to ln(100) in its training loop, not in the model).
    """
    return jnp.exp(jnp.asarray(params["logit_scale"], jnp.float32))

  @property
  def image_size(self):
    return self.config.vision.image_size

  @property
  def max_text_length(self):
    return self.config.text.max_position_embeddings


# ----------------------------------------------------------------------------
# HuggingFace CLIPModel: config and explicit key map.
# HF state-dict name -> (flax param path, layout kind); kinds:
#   "linear" torch (out, in) <-> flax kernel (in, out);
#   "conv"   torch (O, I, kh, kw) <-> flax (kh, kw, I, O);
#   "copy"   same layout (embeddings, LayerNorm, biases, scalars).
# ----------------------------------------------------------------------------


def _encoder_keys(hf, fx, num_layers):
  out = []
  for i in range(num_layers):
    h, f = f"{hf}.encoder.layers.{i}", fx + ("encoder", f"layers_{i}")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      out += [(f"{h}.self_attn.{proj}.weight", f + ("self_attn", proj, "kernel"), "linear"),
              (f"{h}.self_attn.{proj}.bias", f + ("self_attn", proj, "bias"), "copy")]
    for ln in ("layer_norm1", "layer_norm2"):
      out += [(f"{h}.{ln}.weight", f + (ln, "scale"), "copy"),
              (f"{h}.{ln}.bias", f + (ln, "bias"), "copy")]
    for fc in ("fc1", "fc2"):
      out += [(f"{h}.mlp.{fc}.weight", f + ("mlp", fc, "kernel"), "linear"),
              (f"{h}.mlp.{fc}.bias", f + ("mlp", fc, "bias"), "copy")]
  return out


def _layer_norm_keys(hf, fx):
  return [(f"{hf}.weight", fx + ("scale",), "copy"), (f"{hf}.bias", fx + ("bias",), "copy")]


def key_map(config):
  """[(hf_name, flax_path, kind)] for every parameter of a CLIPModule(config)."""
  v, t = ("vision_model",), ("text_model",)
  return [
      ("vision_model.embeddings.class_embedding", v + ("embeddings", "class_embedding"), "copy"),
      ("vision_model.embeddings.patch_embedding.weight",
       v + ("embeddings", "patch_embedding", "kernel"), "conv"),
      ("vision_model.embeddings.position_embedding.weight",
       v + ("embeddings", "position_embedding", "embedding"), "copy"),
      *_layer_norm_keys("vision_model.pre_layrnorm", v + ("pre_layrnorm",)),
      *_encoder_keys("vision_model", v, config.vision.num_hidden_layers),
      *_layer_norm_keys("vision_model.post_layernorm", v + ("post_layernorm",)),
      ("text_model.embeddings.token_embedding.weight",
       t + ("embeddings", "token_embedding", "embedding"), "copy"),
      ("text_model.embeddings.position_embedding.weight",
       t + ("embeddings", "position_embedding", "embedding"), "copy"),
      *_encoder_keys("text_model", t, config.text.num_hidden_layers),
      *_layer_norm_keys("text_model.final_layer_norm", t + ("final_layer_norm",)),
      ("visual_projection.weight", ("visual_projection", "kernel"), "linear"),
      ("text_projection.weight", ("text_projection", "kernel"), "linear"),
      ("logit_scale", ("logit_scale",), "copy"),
  ]


def config_to_hf(config):
  """Our CLIPConfig -> transformers.CLIPConfig (for config.json)."""
  import transformers  # pylint: disable=g-import-not-at-top
  v, t = config.vision, config.text
  vision = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_hidden_layers,
                num_attention_heads=v.num_attention_heads, num_channels=v.num_channels,
                image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
                layer_norm_eps=v.layer_norm_eps, projection_dim=config.projection_dim)
  text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
              intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
              num_attention_heads=t.num_attention_heads,
              max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act,
              layer_norm_eps=t.layer_norm_eps, eos_token_id=t.eos_token_id,
              bos_token_id=t.bos_token_id, pad_token_id=t.pad_token_id,
              projection_dim=config.projection_dim)
  hf = transformers.CLIPConfig(text_config=text, vision_config=vision,
                               projection_dim=config.projection_dim,
                               logit_scale_init_value=config.logit_scale_init_value)
  hf.architectures = ["CLIPModel"]
  return hf


def preprocessor_config(config):
  """preprocessor_config.json: the fields of transformers' CLIPImageProcessor."""
  v = config.vision
  return {
      "image_processor_type": "CLIPImageProcessor",
      "do_resize": True, "size": {"shortest_edge": v.image_size}, "resample": 3,  # bicubic
      "do_center_crop": True, "crop_size": {"height": v.image_size, "width": v.image_size},
      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": list(v.image_mean), "image_std": list(v.image_std),
      "do_convert_rgb": True,
  }


def load_tokenizer(folder):
  """transformers' CLIPTokenizerFast from a checkpoint folder."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.CLIPTokenizerFast.from_pretrained(folder)


def from_hf(hf_config, *, image_mean=None, image_std=None, dtype=jnp.float32, remat=False):
  """The static CLIP for a transformers CLIPConfig or config.json dict."""
  return CLIP(config_from_hf(hf_config, image_mean=image_mean, image_std=image_std,
                             dtype=dtype, remat=remat))


def vocab_size(model):
  return model.config.text.vocab_size


MODEL = CLIP  # the static model class of this kind (models/__init__.py)
