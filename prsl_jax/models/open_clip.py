"""open_clip folders <-> our flax CLIP: config, explicit key map, export.

An open_clip folder (as open_clip's push_to_hf_hub writes it; FARE, TeCoA and
Delta-CLIP on the hub) holds:

  open_clip_config.json        {"model_cfg": {embed_dim, quick_gelu, vision_cfg,
                               text_cfg, ...}, "preprocess_cfg": {mean, std, ...}}
  open_clip_model.safetensors  or open_clip_pytorch_model.bin (a pickle)

A ViT open_clip CLIP is the same network as transformers' CLIPModel with other
names, so it loads into prsl_jax.models.clip.CLIP: `key_map` renames each
open_clip tensor to its HF name(s) (the fused attention `in_proj` splits into
q/k/v; `proj` and `text_projection` are x @ W, HF's are W x, so they transpose),
and the HF key map of clip.py does the rest. Two differences are config
switches: QuickGELU or GELU (open_clip's `quick_gelu`), and text pooling at the
largest token id (open_clip's pool_type 'argmax'; our TextConfig spells it
eos_token_id=2, transformers' legacy argmax convention). Architectures the
flax CLIP cannot express (ResNet towers, timm or HF towers, attention pooling,
layer scale, ...) are refused with the field that makes them so.

open_clip folders ship no tokenizer: `load_tokenizer` returns the offline CLIP
BPE of prsl_jax.models.bpe_tokenizer at the config's context length.
"""

import numpy as np

from prsl_jax.models import clip as clip_lib

CONFIG_NAME = "open_clip_config.json"
SAFETENSORS_NAME = "open_clip_model.safetensors"
PICKLE_NAME = "open_clip_pytorch_model.bin"
# What eos_token_id=2 means in TextConfig: pool at argmax(input_ids), as
# open_clip's text pool_type 'argmax' does (its end token has the largest id).
ARGMAX_POOLING_EOS = 2

# open_clip config fields and the values the flax CLIP can express (the
# dataclass defaults of open_clip's CLIPVisionCfg / CLIPTextCfg); any other
# value is refused by name.
_VISION_SUPPORTED = {
    "ls_init_value": (None,), "patch_dropout": (0, 0.0), "attentional_pool": (False,),
    "no_ln_pre": (False,), "pos_embed_type": ("learnable",), "pool_type": ("tok",),
    "output_tokens": (False,), "act_kwargs": (None, {}), "norm_kwargs": (None, {}),
    "block_type": (None, "default"), "qk_norm": (False,), "scaled_cosine_attn": (False,),
    "scale_heads": (False,), "scale_attn_inner": (False,), "scale_attn": (False,),
    "scale_fc": (False,), "timm_model_name": (None,), "input_patchnorm": (False,),
    "global_average_pool": (False,), "final_ln_after_pool": (False, True),
}
_TEXT_SUPPORTED = {
    "ls_init_value": (None,), "embed_cls": (False,), "no_causal_mask": (False,),
    "pool_type": ("argmax",), "proj_bias": (False,), "proj_type": ("linear",),
    "output_tokens": (False,), "act_kwargs": (None, {}), "norm_kwargs": (None, {}),
    "block_type": (None, "default"), "qk_norm": (False,), "scaled_cosine_attn": (False,),
    "scale_heads": (False,), "scale_attn_inner": (False,), "scale_attn": (False,),
    "scale_fc": (False,), "hf_model_name": (None,), "hf_tokenizer_name": (None,),
    "tokenizer_mode": (None,), "final_ln_after_pool": (False, True),
}
_TOP_SUPPORTED = {"custom_text": (False,), "init_logit_bias": (None,),
                  "cast_dtype": (None, "fp32", "float32")}


def _truth(value, where):
  """open_clip's quick_gelu: a bool, or a string such as FARE's "TRUE"."""
  if isinstance(value, bool):
    return value
  if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"):
    return True
  if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", ""):
    return False
  if isinstance(value, int):
    return bool(value)
  raise ValueError(f"{where}={value!r} is not a boolean (true/false)")


def _refuse_unsupported(cfg, supported, where):
  for key, allowed in supported.items():
    if key in cfg and cfg[key] not in allowed:
      raise ValueError(f"open_clip {where}.{key}={cfg[key]!r} is not supported by prsl_jax's "
                       f"CLIP (it expresses ViT towers with {key} in {list(allowed)})")


def _square(value, where):
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"open_clip {where}={value!r}: only square sizes are supported")
    value = value[0]
  if not isinstance(value, int):
    raise ValueError(f"open_clip {where} must be an int, got {value!r}")
  return value


def config_from_open_clip(oc_config, *, dtype=None, remat=False):
  """Our CLIPConfig from open_clip_config.json's dict (or a bare model_cfg).

  Args:
    oc_config: {"model_cfg": ..., "preprocess_cfg": ...} or a model_cfg dict
      as in open_clip's model_configs/*.json.
    dtype: compute dtype (params stay float32); None is float32.
    remat: rematerialise encoder layers in the backward pass.

  Raises:
    ValueError naming the first field the flax CLIP cannot express.
  """
  if not isinstance(oc_config, dict):
    raise ValueError(f"an open_clip config must be a JSON object, got {type(oc_config).__name__}")
  model_cfg = oc_config.get("model_cfg", oc_config)
  pre = oc_config.get("preprocess_cfg") or {}
  v, t = model_cfg.get("vision_cfg"), model_cfg.get("text_cfg")
  if not isinstance(v, dict) or not isinstance(t, dict) or "embed_dim" not in model_cfg:
    raise ValueError("open_clip model_cfg needs embed_dim, vision_cfg and text_cfg")
  _refuse_unsupported(model_cfg, _TOP_SUPPORTED, "model_cfg")
  layers = v.get("layers", 12)
  if not isinstance(layers, int):
    raise ValueError(f"open_clip vision_cfg.layers={layers!r} is a ResNet (ModifiedResNet "
                     "with attention pooling), which prsl_jax's CLIP does not support: "
                     "only ViT towers")
  _refuse_unsupported(v, _VISION_SUPPORTED, "vision_cfg")
  _refuse_unsupported(t, _TEXT_SUPPORTED, "text_cfg")
  act = "quick_gelu" if _truth(model_cfg.get("quick_gelu", False), "quick_gelu") else "gelu"
  width = v.get("width", 768)
  head_width = v.get("head_width", 64)
  if width % head_width:
    raise ValueError(f"open_clip vision_cfg.width={width} is not a multiple of "
                     f"head_width={head_width}")
  t_width = t.get("width", 512)
  mean = pre.get("mean") or clip_lib.OPENAI_CLIP_MEAN
  std = pre.get("std") or clip_lib.OPENAI_CLIP_STD
  hf = {
      "projection_dim": model_cfg["embed_dim"],
      # open_clip initialises logit_scale to log(1 / 0.07), as HF's 2.6592.
      "vision_config": dict(
          hidden_size=width, intermediate_size=int(width * v.get("mlp_ratio", 4.0)),
          num_hidden_layers=layers, num_attention_heads=width // head_width,
          image_size=_square(v.get("image_size", 224), "vision_cfg.image_size"),
          patch_size=_square(v.get("patch_size", 16), "vision_cfg.patch_size"),
          hidden_act=act, layer_norm_eps=1e-5),
      "text_config": dict(
          vocab_size=t.get("vocab_size", 49408), hidden_size=t_width,
          intermediate_size=int(t_width * t.get("mlp_ratio", 4.0)),
          num_hidden_layers=t.get("layers", 12), num_attention_heads=t.get("heads", 8),
          max_position_embeddings=t.get("context_length", 77), hidden_act=act,
          layer_norm_eps=1e-5, eos_token_id=ARGMAX_POOLING_EOS,
          pad_token_id=t.get("pad_id", 0)),
  }
  kw = {} if dtype is None else {"dtype": dtype}
  return clip_lib.config_from_hf(hf, image_mean=mean, image_std=std, remat=remat, **kw)


def from_open_clip(oc_config, *, dtype=None, remat=False):
  """The static CLIP for an open_clip config (see config_from_open_clip)."""
  return clip_lib.CLIP(config_from_open_clip(oc_config, dtype=dtype, remat=remat))


def config_to_open_clip(config):
  """Our CLIPConfig -> open_clip_config.json's dict (model_cfg + preprocess_cfg)."""
  v, t = config.vision, config.text
  if v.hidden_act != t.hidden_act or v.hidden_act not in ("quick_gelu", "gelu"):
    raise ValueError(f"open_clip has one activation for both towers, QuickGELU or GELU; "
                     f"this model has vision {v.hidden_act!r}, text {t.hidden_act!r}")
  if v.hidden_size % v.num_attention_heads or v.layer_norm_eps != 1e-5 or \
      t.layer_norm_eps != 1e-5:
    raise ValueError("open_clip's ViT uses LayerNorm eps 1e-5 in both towers; this model "
                     "does not, export it in HF format instead")
  if t.eos_token_id != ARGMAX_POOLING_EOS:
    # First-EOS pooling equals open_clip's argmax pooling only when EOS is the
    # largest id (CLIP's tokenizers: <|endoftext|> is the last token).
    if t.eos_token_id != t.vocab_size - 1:
      raise ValueError(f"open_clip pools text at argmax(input_ids); this model pools at "
                       f"eos_token_id={t.eos_token_id}, which is not the largest id "
                       f"({t.vocab_size - 1}); export it in HF format instead")
  for name, sub in (("vision", v), ("text", t)):
    # open_clip rebuilds the MLP width as int(width * mlp_ratio).
    if int(sub.hidden_size * (sub.intermediate_size / sub.hidden_size)) != sub.intermediate_size:
      raise ValueError(f"{name} intermediate_size={sub.intermediate_size} cannot be written as "
                       f"open_clip's int(width * mlp_ratio) for width {sub.hidden_size}")
  model_cfg = {
      "embed_dim": config.projection_dim,
      "quick_gelu": v.hidden_act == "quick_gelu",
      "vision_cfg": {"image_size": v.image_size, "layers": v.num_hidden_layers,
                     "width": v.hidden_size,
                     "head_width": v.hidden_size // v.num_attention_heads,
                     "mlp_ratio": v.intermediate_size / v.hidden_size,
                     "patch_size": v.patch_size},
      "text_cfg": {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size,
                   "width": t.hidden_size, "heads": t.num_attention_heads,
                   "layers": t.num_hidden_layers,
                   "mlp_ratio": t.intermediate_size / t.hidden_size},
  }
  preprocess_cfg = {"mean": list(v.image_mean), "std": list(v.image_std),
                    "interpolation": "bicubic", "resize_mode": "shortest"}
  return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


# ----------------------------------------------------------------------------
# The key map: open_clip name -> (HF CLIPModel names, op); ops:
#   "copy"      same tensor;
#   "transpose" open_clip's x @ W parameter (in, out) <-> HF Linear (out, in);
#   "split3"    fused in_proj (3D, ...) <-> HF q, k, v (D, ...) each.
# ----------------------------------------------------------------------------


def _blocks(oc, hf, num_layers):
  out = []
  for i in range(num_layers):
    o, h = f"{oc}.resblocks.{i}", f"{hf}.encoder.layers.{i}"
    for p in ("weight", "bias"):
      out += [(f"{o}.ln_1.{p}", (f"{h}.layer_norm1.{p}",), "copy"),
              (f"{o}.attn.in_proj_{p}", tuple(f"{h}.self_attn.{q}_proj.{p}" for q in "qkv"),
               "split3"),
              (f"{o}.attn.out_proj.{p}", (f"{h}.self_attn.out_proj.{p}",), "copy"),
              (f"{o}.ln_2.{p}", (f"{h}.layer_norm2.{p}",), "copy"),
              (f"{o}.mlp.c_fc.{p}", (f"{h}.mlp.fc1.{p}",), "copy"),
              (f"{o}.mlp.c_proj.{p}", (f"{h}.mlp.fc2.{p}",), "copy")]
  return out


def _ln(oc, hf):
  return [(f"{oc}.{p}", (f"{hf}.{p}",), "copy") for p in ("weight", "bias")]


def vision_key_map(config):
  """[(open_clip name, HF names, op)] of the vision tower and its projection."""
  return [
      ("visual.class_embedding", ("vision_model.embeddings.class_embedding",), "copy"),
      ("visual.positional_embedding", ("vision_model.embeddings.position_embedding.weight",),
       "copy"),
      ("visual.conv1.weight", ("vision_model.embeddings.patch_embedding.weight",), "copy"),
      *_ln("visual.ln_pre", "vision_model.pre_layrnorm"),
      *_blocks("visual.transformer", "vision_model", config.vision.num_hidden_layers),
      *_ln("visual.ln_post", "vision_model.post_layernorm"),
      ("visual.proj", ("visual_projection.weight",), "transpose"),
  ]


def key_map(config):
  """[(open_clip name, HF names, op)] for every parameter of a CLIP(config)."""
  return [
      *vision_key_map(config),
      ("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",), "copy"),
      ("positional_embedding", ("text_model.embeddings.position_embedding.weight",), "copy"),
      *_blocks("transformer", "text_model", config.text.num_hidden_layers),
      *_ln("ln_final", "text_model.final_layer_norm"),
      ("text_projection", ("text_projection.weight",), "transpose"),
      ("logit_scale", ("logit_scale",), "copy"),
  ]


def _hf_shapes(model):
  """{HF name: torch-layout shape} of the model's params."""
  shapes = model.param_shapes()
  out = {}
  for hf, path, kind in clip_lib.key_map(model.config):
    leaf = shapes
    for p in path:
      leaf = leaf[p]
    s = tuple(leaf.shape)
    out[hf] = s[::-1] if kind == "linear" else (
        (s[3], s[2], s[0], s[1]) if kind == "conv" else s)
  return out


def _oc_shape(hf_shapes, hf_names, op):
  s = hf_shapes[hf_names[0]]
  if op == "transpose":
    return s[::-1]
  if op == "split3":
    return (3 * s[0],) + s[1:]
  return s


def _list(names, limit=12):
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def to_hf_state_dict(state, model, kmap=None, what="open_clip weights"):
  """{open_clip name: array} -> {HF name: array} for `model` (a clip.CLIP).

  Every expected tensor must be there with the shape the config implies;
  missing, unexpected and mis-shaped tensors are named (open_clip's non-weight
  buffers, `attn_mask` and `position_ids`, are ignored).
  """
  kmap = key_map(model.config) if kmap is None else kmap
  state = {k: v for k, v in state.items() if not k.endswith(("attn_mask", "position_ids"))}
  expected = {oc for oc, _, _ in kmap}
  missing, unexpected = expected - set(state), set(state) - expected
  if missing or unexpected:
    raise ValueError(f"{what} do not match this model: missing [{_list(missing)}]; "
                     f"unexpected [{_list(unexpected)}]")
  hf_shapes = _hf_shapes(model)
  out = {}
  for oc, hf_names, op in kmap:
    x = np.asarray(state[oc])
    want = _oc_shape(hf_shapes, hf_names, op)
    if tuple(x.shape) != want:
      raise ValueError(f"{what}: tensor {oc!r} has shape {tuple(x.shape)} but the config "
                       f"expects {want}")
    if op == "split3":
      for name, part in zip(hf_names, np.split(x, 3, axis=0)):
        out[name] = part
    else:
      out[hf_names[0]] = x.T if op == "transpose" else x
  return out


def from_hf_state_dict(hf_state, model):
  """{HF name: array} (convert.to_hf_state_dict) -> {open_clip name: array}."""
  out = {}
  for oc, hf_names, op in key_map(model.config):
    if op == "split3":
      x = np.concatenate([hf_state[n] for n in hf_names], axis=0)
    else:
      x = hf_state[hf_names[0]]
      x = x.T if op == "transpose" else x
    out[oc] = np.array(x, order="C")
  return out


def load_tokenizer(model):
  """The offline CLIP BPE tokenizer at the model's context length; None for a
  text tower whose vocabulary is not CLIP's 49408 BPE tokens (e.g. a model with
  its own small vocabulary exported to open_clip: its ids would not fit)."""
  from prsl_jax.models import bpe_tokenizer  # pylint: disable=g-import-not-at-top
  if model.config.text.vocab_size != bpe_tokenizer.VOCAB_SIZE:
    return None
  return bpe_tokenizer.ClipBpeTokenizer(context_length=model.max_text_length)
