"""SigLIP in flax.linen, numerically matching transformers' PyTorch SiglipModel.

Two towers, as in transformers/models/siglip/modeling_siglip.py:

  vision: NHWC images in [0, 1] -> (x - mean) / std -> patch conv (with bias)
          -> patches + learned positions (no CLS token) -> encoder
          -> post_layernorm -> multi-head attention pooling head (a learned
          probe attends over the tokens, then LayerNorm + MLP residual)
  text:   token + position embeddings -> encoder (bidirectional, no mask)
          -> final_layer_norm -> the LAST position's state -> head (Linear)

Scoring is sigmoid, not softmax: logits = exp(logit_scale) * cos + logit_bias,
so the model exposes `logit_bias` next to `logit_scale` and zeroshot.logits
adds it. The encoder layers are CLIP's (pre-LN, q/k/v/out_proj, fc1/fc2):
prsl_jax.models.clip's Encoder, with SigLIP's activation and eps.

Two deliberate readings of transformers' behaviour:
- Text: SigLIP was trained on max_length-padded text without an attention
  mask, and its tokenizer returns none; encode_texts therefore ignores
  attention_mask (equal to SiglipModel called without one). Texts must be
  padded to max_text_length, as zeroshot.tokenize does.
- Vision without the pooling head (vision_use_head=False): transformers
  returns no pooled output; we pool by the mean over tokens of the
  post-LayerNorm states (big_vision's 'gap'), so the model still has image
  features.

Parameter names mirror the HF state dict (`key_map`); the fused
in_proj of the pooling head's torch MultiheadAttention is split into q/k/v on
load (`adapt_state_dict`) and fused back on export (`export_state_dict`).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prsl_jax.losses import l2_normalize
from prsl_jax.models import clip as clip_lib
from prsl_jax.models import layers

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  image_size: int
  patch_size: int
  num_channels: int = 3
  hidden_act: str = "gelu_pytorch_tanh"
  layer_norm_eps: float = 1e-6
  use_head: bool = True  # the attention-pooling head (HF vision_use_head)
  image_mean: tuple[float, ...] = SIGLIP_MEAN
  image_std: tuple[float, ...] = SIGLIP_STD


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int
  projection_size: int
  hidden_act: str = "gelu_pytorch_tanh"
  layer_norm_eps: float = 1e-6
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  """Static description of a SigLIP model (hashable, safe as a jit static)."""
  vision: VisionConfig
  text: TextConfig
  dtype: Any = jnp.float32  # compute dtype; params stay float32
  remat: bool = False


def config_from_hf(hf_config, *, image_mean=None, image_std=None, dtype=jnp.float32,
                   remat=False):
  """Our SiglipConfig from a transformers SiglipConfig (or its config.json dict)."""
  d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  v, t = d.get("vision_config") or {}, d.get("text_config") or {}
  for name, sub in (("vision_config", v), ("text_config", t)):
    act = layers.pick(sub, "hidden_act", "gelu_pytorch_tanh")
    if act not in clip_lib.ACTIVATIONS:
      raise ValueError(f"{name}.hidden_act={act!r} is not supported; expected one of "
                       f"{sorted(clip_lib.ACTIVATIONS)}")
  num_channels = layers.pick(v, "num_channels", 3)
  mean, std = layers.pixel_stats(image_mean, image_std, num_channels, SIGLIP_MEAN,
                                 SIGLIP_STD)
  for name in ("image_size", "patch_size"):
    if not isinstance(layers.pick(v, name, 16), int):
      raise ValueError(f"vision_config.{name} must be an int, got {v.get(name)!r}")
  vision = VisionConfig(
      hidden_size=layers.pick(v, "hidden_size", 768),
      intermediate_size=layers.pick(v, "intermediate_size", 3072),
      num_hidden_layers=layers.pick(v, "num_hidden_layers", 12),
      num_attention_heads=layers.pick(v, "num_attention_heads", 12),
      image_size=layers.pick(v, "image_size", 224), patch_size=layers.pick(v, "patch_size", 16),
      num_channels=num_channels, hidden_act=layers.pick(v, "hidden_act", "gelu_pytorch_tanh"),
      layer_norm_eps=float(layers.pick(v, "layer_norm_eps", 1e-6)),
      use_head=bool(layers.pick(v, "vision_use_head", True)), image_mean=mean, image_std=std)
  hidden = layers.pick(t, "hidden_size", 768)
  text = TextConfig(
      vocab_size=layers.pick(t, "vocab_size", 32000), hidden_size=hidden,
      intermediate_size=layers.pick(t, "intermediate_size", 3072),
      num_hidden_layers=layers.pick(t, "num_hidden_layers", 12),
      num_attention_heads=layers.pick(t, "num_attention_heads", 12),
      max_position_embeddings=layers.pick(t, "max_position_embeddings", 64),
      projection_size=layers.pick(t, "projection_size", hidden),
      hidden_act=layers.pick(t, "hidden_act", "gelu_pytorch_tanh"),
      layer_norm_eps=float(layers.pick(t, "layer_norm_eps", 1e-6)),
      pad_token_id=layers.pick(t, "pad_token_id", 1), bos_token_id=layers.pick(t, "bos_token_id", 49406),
      eos_token_id=layers.pick(t, "eos_token_id", 49407))
  for name, sub in (("vision_config", vision), ("text_config", text)):
    if sub.hidden_size % sub.num_attention_heads:
      raise ValueError(f"{name}.hidden_size={sub.hidden_size} is not a multiple of "
                       f"num_attention_heads={sub.num_attention_heads}")
  if text.projection_size != vision.hidden_size:
    raise ValueError(f"text_config.projection_size={text.projection_size} must equal "
                     f"vision_config.hidden_size={vision.hidden_size} (SigLIP compares the "
                     "text head's output with the pooled image state)")
  return SiglipConfig(vision=vision, text=text, dtype=jnp.dtype(dtype), remat=bool(remat))


class PatchEmbedding(nn.Module):
  """Stride-p p x p patches -> D features, with bias (SigLIP's Conv2d); written as
  patchify + matmul like clip.PatchEmbedding (fast input gradients on CPU)."""
  features: int
  patch_size: int
  dtype: Any

  @nn.compact
  def __call__(self, pixels):
    b, height, width, c = pixels.shape
    p = self.patch_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (p, p, c, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    h, w = height // p, width // p
    x = pixels[:, :h * p, :w * p]
    x = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * c)
    y = jnp.dot(x.astype(self.dtype), kernel.reshape(p * p * c, -1).astype(self.dtype))
    return y + bias.astype(self.dtype)


class PoolingAttention(nn.Module):
  """Multi-head attention of queries over keys/values (torch MultiheadAttention)."""
  hidden_size: int
  num_heads: int
  dtype: Any

  @nn.compact
  def __call__(self, q, kv):
    """q: (B, Q, D), kv: (B, T, D) -> (B, Q, D)."""
    head_dim = self.hidden_size // self.num_heads
    split = lambda y: y.reshape(y.shape[0], y.shape[1], self.num_heads, head_dim)
    q = split(layers.dense(self.hidden_size, self.dtype, "q_proj")(q))
    k = split(layers.dense(self.hidden_size, self.dtype, "k_proj")(kv))
    v = split(layers.dense(self.hidden_size, self.dtype, "v_proj")(kv))
    y = jax.nn.dot_product_attention(q, k, v)
    return layers.dense(self.hidden_size, self.dtype, "out_proj")(y.reshape(q.shape[0], q.shape[1], -1))


class PoolingHead(nn.Module):
  """SiglipMultiheadAttentionPoolingHead: (B, T, D) -> (B, D)."""
  cfg: VisionConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, cfg.hidden_size),
                       jnp.float32)
    q = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, cfg.hidden_size))
    y = PoolingAttention(cfg.hidden_size, cfg.num_attention_heads, self.dtype,
                         name="attention")(q, x)
    h = layers.layer_norm(cfg.layer_norm_eps, self.dtype, "layernorm")(y)
    y = y + clip_lib.MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, self.dtype,
                         name="mlp")(h)
    return y[:, 0]


class VisionTransformer(nn.Module):
  """HF SiglipVisionModel: (B, H, W, C) in [0, 1] -> pooled (B, D)."""
  cfg: VisionConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images):
    cfg = self.cfg
    x = layers.normalize_images(images, cfg.image_size, cfg.num_channels, cfg.image_mean,
                                cfg.image_std, self.dtype)
    x = PatchEmbedding(cfg.hidden_size, cfg.patch_size, self.dtype,
                       name="embeddings_patch_embedding")(x)
    num_positions = (cfg.image_size // cfg.patch_size) ** 2
    pos = nn.Embed(num_positions, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                   name="embeddings_position_embedding")
    x = x + pos(jnp.arange(num_positions))[None]
    x = clip_lib.encoder(cfg, self.dtype, self.remat)(x)
    x = layers.layer_norm(cfg.layer_norm_eps, self.dtype, "post_layernorm")(x)
    if cfg.use_head:
      return PoolingHead(cfg, self.dtype, name="head")(x)
    return x.mean(axis=1)


class TextTransformer(nn.Module):
  """HF SiglipTextModel: (B, T) ids -> the head of the last position's state."""
  cfg: TextConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids):
    cfg = self.cfg
    if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"input_ids must have shape (B, T) with T <= "
                       f"max_position_embeddings={cfg.max_position_embeddings}, "
                       f"got {input_ids.shape}")
    x = clip_lib.TextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
    x = clip_lib.encoder(cfg, self.dtype, self.remat)(x)
    x = layers.layer_norm(cfg.layer_norm_eps, self.dtype, "final_layer_norm")(x)
    return layers.dense(cfg.projection_size, self.dtype, "head")(x[:, -1])


class SiglipModule(nn.Module):
  """Params: vision_model, text_model, logit_scale (1,), logit_bias (1,)."""
  config: SiglipConfig

  def setup(self):
    c = self.config
    self.vision_model = VisionTransformer(c.vision, c.dtype, c.remat)
    self.text_model = TextTransformer(c.text, c.dtype, c.remat)
    # SigLIP's initial temperature and bias: log(10) and -10.
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(10.0)),
                                  (1,), jnp.float32)
    self.logit_bias = self.param("logit_bias", nn.initializers.constant(-10.0), (1,),
                                 jnp.float32)

  def encode_images(self, images):
    return self.vision_model(images).astype(jnp.float32)

  def encode_texts(self, input_ids, attention_mask=None):
    del attention_mask  # SigLIP's text tower attends to every position (module docstring)
    return self.text_model(input_ids).astype(jnp.float32)

  def __call__(self, images, input_ids, attention_mask=None):
    """Like HF SiglipModel.forward: logits_per_image = scale * cos + bias."""
    img = l2_normalize(self.encode_images(images))
    txt = l2_normalize(self.encode_texts(input_ids, attention_mask))
    logits = jnp.exp(self.logit_scale[0]) * img @ txt.T + self.logit_bias[0]
    return dict(image_embeds=img, text_embeds=txt, logits_per_image=logits,
                logits_per_text=logits.T)


@dataclasses.dataclass(frozen=True)
class Siglip:
  """A SigLIP architecture: pure functions of the params they are given (the
  methods of clip.CLIP, plus logit_bias)."""
  config: SiglipConfig
  kind = "siglip"  # config.json's model_type
  task = "classification"  # what evaluate.py measures it with (prsl_jax.tasks)
  # Top-level param keys per tower (config.train_towers): no separate
  # projections (the pooling head is in vision_model, the text head in
  # text_model); logit_bias trains with the text side, as logit_scale does.
  towers = {"vision": ("vision_model",),
            "text": ("text_model", "logit_scale", "logit_bias"),
            "both": ("vision_model", "text_model", "logit_scale", "logit_bias")}

  @property
  def module(self) -> SiglipModule:
    return SiglipModule(self.config)

  def init(self, key):
    v, t = self.config.vision, self.config.text
    images = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    ids = jnp.zeros((1, t.max_position_embeddings), jnp.int32)
    return nn.unbox(self.module.init(key, images, ids))["params"]

  def param_shapes(self):
    return jax.eval_shape(self.init, jax.random.key(0))

  def encode_images(self, params, images):
    """images: (B, H, W, C) float in [0, 1] -> (B, D) float32, not normalised."""
    return self.module.apply({"params": params}, images, method=SiglipModule.encode_images)

  def encode_texts(self, params, input_ids, attention_mask=None):
    """input_ids: (B, T) int, padded to max_text_length -> (B, D) float32;
    attention_mask is accepted and ignored (module docstring)."""
    return self.module.apply({"params": params}, input_ids, attention_mask,
                             method=SiglipModule.encode_texts)

  def logit_scale(self, params):
    """exp(params['logit_scale']), float32 scalar."""
    return jnp.exp(jnp.asarray(params["logit_scale"], jnp.float32).reshape(()))

  def logit_bias(self, params):
    """params['logit_bias'], float32 scalar: added to scale * cos."""
    return jnp.asarray(params["logit_bias"], jnp.float32).reshape(())

  @property
  def image_size(self):
    return self.config.vision.image_size

  @property
  def max_text_length(self):
    return self.config.text.max_position_embeddings


# ----------------------------------------------------------------------------
# HuggingFace SiglipModel: config and explicit key map (kinds as in clip.py).
# ----------------------------------------------------------------------------

_HEAD_IN_PROJ = "vision_model.head.attention.in_proj_"


def key_map(config):
  """[(hf_name, flax_path, kind)] for every parameter of a SiglipModule(config).

  The pooling head's q/k/v names are split from torch's fused in_proj
  (adapt_state_dict); every other name is transformers' own.
  """
  v, t = ("vision_model",), ("text_model",)
  lnk = clip_lib.layer_norm_keys
  out = [
      ("vision_model.embeddings.patch_embedding.weight",
       v + ("embeddings_patch_embedding", "kernel"), "conv"),
      ("vision_model.embeddings.patch_embedding.bias",
       v + ("embeddings_patch_embedding", "bias"), "copy"),
      ("vision_model.embeddings.position_embedding.weight",
       v + ("embeddings_position_embedding", "embedding"), "copy"),
      *clip_lib.encoder_keys("vision_model", v, config.vision.num_hidden_layers),
      *lnk("vision_model.post_layernorm", v + ("post_layernorm",)),
  ]
  if config.vision.use_head:
    h, fh = "vision_model.head", v + ("head",)
    out += [(f"{h}.probe", fh + ("probe",), "copy")]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      out += [(f"{h}.attention.{proj}.weight", fh + ("attention", proj, "kernel"), "linear"),
              (f"{h}.attention.{proj}.bias", fh + ("attention", proj, "bias"), "copy")]
    out += lnk(f"{h}.layernorm", fh + ("layernorm",))
    for fc in ("fc1", "fc2"):
      out += [(f"{h}.mlp.{fc}.weight", fh + ("mlp", fc, "kernel"), "linear"),
              (f"{h}.mlp.{fc}.bias", fh + ("mlp", fc, "bias"), "copy")]
  out += [
      ("text_model.embeddings.token_embedding.weight",
       t + ("embeddings", "token_embedding", "embedding"), "copy"),
      ("text_model.embeddings.position_embedding.weight",
       t + ("embeddings", "position_embedding", "embedding"), "copy"),
      *clip_lib.encoder_keys("text_model", t, config.text.num_hidden_layers),
      *lnk("text_model.final_layer_norm", t + ("final_layer_norm",)),
      ("text_model.head.weight", t + ("head", "kernel"), "linear"),
      ("text_model.head.bias", t + ("head", "bias"), "copy"),
      ("logit_scale", ("logit_scale",), "copy"),
      ("logit_bias", ("logit_bias",), "copy"),
  ]
  return out


def adapt_state_dict(state, model):
  """Splits the pooling head's fused in_proj_{weight,bias} into q/k/v names."""
  state = dict(state)
  for p in ("weight", "bias"):
    name = _HEAD_IN_PROJ + p
    if name in state:
      fused = np.asarray(state.pop(name))
      if fused.shape[0] % 3:
        raise ValueError(f"parameter {name!r} has shape {fused.shape}; its first axis must "
                         "stack q, k and v")
      for proj, part in zip(("q_proj", "k_proj", "v_proj"), np.split(fused, 3, axis=0)):
        state[f"vision_model.head.attention.{proj}.{p}"] = part
  return state, model


def export_state_dict(state, model):
  """The inverse of adapt_state_dict, for save_pretrained: torch's fused in_proj."""
  if not model.config.vision.use_head:
    return state
  state = dict(state)
  for p in ("weight", "bias"):
    parts = [state.pop(f"vision_model.head.attention.{q}.{p}") for q in
             ("q_proj", "k_proj", "v_proj")]
    state[_HEAD_IN_PROJ + p] = np.concatenate(parts, axis=0)
  return state


def config_to_hf(config):
  """Our SiglipConfig -> transformers.SiglipConfig (for config.json)."""
  import transformers  # pylint: disable=g-import-not-at-top
  v, t = config.vision, config.text
  vision = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
                hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps,
                vision_use_head=v.use_head)
  text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
              intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
              num_attention_heads=t.num_attention_heads,
              max_position_embeddings=t.max_position_embeddings,
              projection_size=t.projection_size, hidden_act=t.hidden_act,
              layer_norm_eps=t.layer_norm_eps, pad_token_id=t.pad_token_id,
              bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id)
  hf = transformers.SiglipConfig(text_config=text, vision_config=vision)
  hf.architectures = ["SiglipModel"]
  return hf


def preprocessor_config(config):
  """preprocessor_config.json: the fields of transformers' SiglipImageProcessor."""
  v = config.vision
  return {
      "image_processor_type": "SiglipImageProcessor",
      "do_resize": True, "size": {"height": v.image_size, "width": v.image_size},
      "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": list(v.image_mean), "image_std": list(v.image_std),
      "do_convert_rgb": True,
  }


def load_tokenizer(folder):
  """The folder's own tokenizer (SigLIP's SentencePiece, or what it ships)."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoTokenizer.from_pretrained(folder)


def from_hf(hf_config, *, image_mean=None, image_std=None, dtype=jnp.float32, remat=False):
  """The static Siglip for a transformers SiglipConfig or config.json dict."""
  return Siglip(config_from_hf(hf_config, image_mean=image_mean, image_std=image_std,
                               dtype=dtype, remat=remat))


def vocab_size(model):
  return model.config.text.vocab_size


MODEL = Siglip  # the static model class of this kind (models/__init__.py)
