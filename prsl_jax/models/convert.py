"""HuggingFace CLIP checkpoints <-> our flax CLIP: load, convert, export.

A checkpoint is a folder as transformers writes it: config.json,
model.safetensors (or model.safetensors.index.json + shards), optionally
preprocessor_config.json (pixel mean/std) and tokenizer files. `load_pretrained`
reads it into a `CLIP` (module, float32 params, config, tokenizer);
`save_pretrained` writes params back in the same format, loadable by
transformers' CLIPModel.from_pretrained and CLIPTokenizerFast.from_pretrained.

pytorch_model.bin is a pickle: unpickling runs arbitrary code from the file, so
it is refused unless the caller opts in with allow_pickle=True (then read with
torch.load(weights_only=True)).

transformers (and through it torch, when installed) is imported lazily inside
the functions that need it, so `import prsl_jax` stays light.
"""

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prsl_jax.models import clip as clip_lib

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


@dataclasses.dataclass(frozen=True, eq=False)
class CLIP:
  """A loaded CLIP: flax module, its params, static config and tokenizer.

  The methods are pure functions of the params they are given (not self.params),
  so they jit, grad and shard like any function. eq=False keeps the default
  identity hash, so a CLIP can be closed over or passed as a jit static.
  """
  module: clip_lib.CLIPModule
  params: Any
  config: clip_lib.CLIPConfig
  tokenizer: Any = None  # transformers CLIPTokenizerFast, or None

  def encode_images(self, params, images):
    """images: (B, H, W, C) float in [0, 1] -> (B, P) float32, not normalised."""
    return self.module.apply({"params": params}, images,
                             method=clip_lib.CLIPModule.encode_images)

  def encode_texts(self, params, input_ids, attention_mask=None):
    """input_ids, attention_mask: (B, T) int -> (B, P) float32, not normalised."""
    return self.module.apply({"params": params}, input_ids, attention_mask,
                             method=clip_lib.CLIPModule.encode_texts)

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
# Explicit key map: HF state-dict name -> (flax param path, layout kind).
# Kinds: "linear" torch (out, in) <-> flax kernel (in, out);
#        "conv"   torch (O, I, kh, kw) <-> flax (kh, kw, I, O);
#        "copy"   same layout (embeddings, LayerNorm, biases, scalars).

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


def _to_flax(x, kind):
  if kind == "linear":
    return x.T
  if kind == "conv":
    return x.transpose(2, 3, 1, 0)
  return x


def _to_hf(x, kind):
  if kind == "linear":
    return x.T
  if kind == "conv":
    return x.transpose(3, 2, 0, 1)
  return x


def _hf_shape(flax_shape, kind):
  return tuple(_to_hf(np.empty(flax_shape, np.int8), kind).shape)


def param_shapes(config):
  """Nested dict of jax.ShapeDtypeStruct, the params of CLIPModule(config)."""
  module = clip_lib.CLIPModule(config)
  v, t = config.vision, config.text
  images = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
  ids = jnp.zeros((1, t.max_position_embeddings), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), images, ids)
  return nn.unbox(shapes)["params"]


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _list(names, limit=20):
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def from_hf_state_dict(state_dict, config):
  """HF CLIPModel state dict {name: array} -> our float32 params pytree.

  Raises:
    ValueError listing missing/unexpected keys (HF's position_ids buffers are
    ignored), or naming a parameter whose shape does not fit the config.
  """
  state = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
  kmap = key_map(config)
  expected = {hf for hf, _, _ in kmap}
  missing, unexpected = expected - set(state), set(state) - expected
  if missing or unexpected:
    raise ValueError(
        "checkpoint keys do not match a CLIPModel with this config.json: "
        f"missing [{_list(missing)}]; unexpected [{_list(unexpected)}]")
  shapes = param_shapes(config)
  params = {}
  for hf, path, kind in kmap:
    x = np.asarray(state[hf])
    want = _hf_shape(_get(shapes, path).shape, kind)
    if tuple(x.shape) != want:
      raise ValueError(f"parameter {hf!r} has shape {tuple(x.shape)} in the checkpoint "
                       f"but the config expects {want}")
    _set(params, path, jnp.asarray(_to_flax(x.astype(np.float32), kind)))
  return params


def to_hf_state_dict(params, config):
  """Our params pytree -> {HF name: float32 numpy array in torch layout}."""
  shapes = param_shapes(config)
  flat_have = {tuple(getattr(k, "key", k) for k in path)
               for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  kmap = key_map(config)
  flat_want = {path for _, path, _ in kmap}
  if flat_have != flat_want:
    fmt = lambda ps: {"/".join(p) for p in ps}
    raise ValueError("params do not match the config: "
                     f"missing [{_list(fmt(flat_want - flat_have))}]; "
                     f"unexpected [{_list(fmt(flat_have - flat_want))}]")
  out = {}
  for hf, path, kind in kmap:
    x = np.asarray(jax.device_get(_get(params, path)), np.float32)
    want = _get(shapes, path).shape
    if x.shape != tuple(want):
      raise ValueError(f"param {'/'.join(path)!r} has shape {x.shape} but the config "
                       f"expects {tuple(want)}")
    # Not np.ascontiguousarray: it turns the 0-d logit_scale into shape (1,).
    out[hf] = np.array(_to_hf(x, kind), order="C")
  return out


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


# ----------------------------------------------------------------------------
# Reading checkpoint folders.

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _env_offline():
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  # constants.HF_HUB_OFFLINE is read once at import; the env var may be set later.
  env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
  return env or bool(constants.HF_HUB_OFFLINE)


def _resolve_folder(path_or_hub_id, allow_pickle):
  """A local checkpoint folder for a folder path or a hub id."""
  path = os.path.expanduser(os.fspath(path_or_hub_id))
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise NotADirectoryError(f"checkpoint path {path!r} is a file; load_pretrained "
                             "expects the checkpoint folder (with config.json)")
  if not _HUB_ID.match(str(path_or_hub_id)):
    raise FileNotFoundError(f"checkpoint folder not found: {path!r}")
  from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
  offline = _env_offline()
  patterns = ["*.json", "*.safetensors", "*.txt"] + (["*.bin"] if allow_pickle else [])
  try:
    # local_files_only when offline: answer from the cache or fail now, instead
    # of retrying a network that is not there. etag_timeout bounds the wait.
    return snapshot_download(str(path_or_hub_id), allow_patterns=patterns,
                             local_files_only=offline, etag_timeout=5)
  except Exception as e:  # pylint: disable=broad-except
    why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else \
        "the hub is unreachable or has no such repo"
    raise OSError(
        f"{path_or_hub_id!r} is not a local folder ({os.path.abspath(path)} does not "
        f"exist) and could not be fetched from the HuggingFace hub: {why} "
        f"({type(e).__name__}: {e}). Download it where there is network (e.g. "
        f"`hf download {path_or_hub_id} --local-dir DIR`) and pass the local folder: "
        "load_pretrained('DIR').") from e


def _pickle_refusal(files):
  return ValueError(
      f"refusing to load {', '.join(files)}: pytorch_model.bin is a Python pickle, and "
      "unpickling can execute arbitrary code from the file. Prefer a model.safetensors "
      "checkpoint (transformers' save_pretrained writes one by default). If you trust "
      "this file, opt in with load_pretrained(..., allow_pickle=True); it is then read "
      "with torch.load(weights_only=True), which needs torch installed.")


def _read_safetensors(files):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  state = {}
  for f in files:
    state.update(load_file(f))
  return state


def _read_pickles(files):
  import torch  # pylint: disable=g-import-not-at-top  # only on explicit opt-in
  state = {}
  for f in files:
    sd = torch.load(f, map_location="cpu", weights_only=True)
    # .float() first: numpy has no bfloat16 for torch tensors.
    state.update({k: v.detach().float().numpy() for k, v in sd.items()})
  return state


def _shards(folder, index_name):
  index_path = os.path.join(folder, index_name)
  with open(index_path) as f:
    weight_map = json.load(f).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index_path} has no 'weight_map'")
  files = [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
  for f in files:
    if not os.path.isfile(f):
      raise FileNotFoundError(f"shard {f} listed in {index_path} is missing")
  return files


def read_state_dict(folder, *, allow_pickle=False):
  """{HF name: numpy array} from a checkpoint folder (safetensors preferred)."""
  has = lambda name: os.path.isfile(os.path.join(folder, name))
  if has(SAFETENSORS_NAME):
    return _read_safetensors([os.path.join(folder, SAFETENSORS_NAME)])
  if has(SAFETENSORS_INDEX_NAME):
    return _read_safetensors(_shards(folder, SAFETENSORS_INDEX_NAME))
  if has(PICKLE_NAME) or has(PICKLE_INDEX_NAME):
    name = PICKLE_NAME if has(PICKLE_NAME) else PICKLE_INDEX_NAME
    if not allow_pickle:
      raise _pickle_refusal([os.path.join(folder, name)])
    files = [os.path.join(folder, PICKLE_NAME)] if name == PICKLE_NAME else \
        _shards(folder, PICKLE_INDEX_NAME)
    return _read_pickles(files)
  raise FileNotFoundError(
      f"no weights in {folder}: expected {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME} "
      f"(or {PICKLE_NAME} with allow_pickle=True)")


def _read_mean_std(folder):
  path = os.path.join(folder, PREPROCESSOR_NAME)
  if not os.path.isfile(path):
    return None, None
  with open(path) as f:
    pre = json.load(f)
  return pre.get("image_mean"), pre.get("image_std")


def load_pretrained(path_or_hub_id, *, allow_pickle=False, dtype=jnp.float32, remat=False):
  """Loads a HuggingFace CLIP checkpoint (local folder or hub id) as a CLIP.

  Args:
    path_or_hub_id: a folder as written by transformers' save_pretrained, or a
      hub id such as "openai/clip-vit-base-patch32" (needs network or the cache).
    allow_pickle: accept pytorch_model.bin (unpickling can run arbitrary code).
    dtype: compute dtype of the module; params are float32 regardless.
    remat: rematerialise encoder layers (less memory, more compute).

  Returns:
    CLIP with float32 params; tokenizer is None when the folder has none.
  """
  folder = _resolve_folder(path_or_hub_id, allow_pickle)
  config_path = os.path.join(folder, CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint folder {folder}")
  with open(config_path) as f:
    model_type = json.load(f).get("model_type")
  if model_type not in (None, "clip"):
    raise ValueError(f"{config_path} has model_type={model_type!r}; expected 'clip' "
                     "(a full two-tower CLIPModel checkpoint)")
  import transformers  # pylint: disable=g-import-not-at-top
  hf_config = transformers.CLIPConfig.from_pretrained(folder)
  mean, std = _read_mean_std(folder)
  config = clip_lib.config_from_hf(hf_config, image_mean=mean, image_std=std,
                                   dtype=dtype, remat=remat)
  params = from_hf_state_dict(read_state_dict(folder, allow_pickle=allow_pickle), config)
  tokenizer = None
  if any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES):
    tokenizer = transformers.CLIPTokenizerFast.from_pretrained(folder)
    if len(tokenizer) > config.text.vocab_size:
      raise ValueError(f"tokenizer in {folder} has {len(tokenizer)} tokens but "
                       f"text_config.vocab_size is {config.text.vocab_size}")
  return CLIP(module=clip_lib.CLIPModule(config), params=params, config=config,
              tokenizer=tokenizer)


def from_config(hf_config, *, key, tokenizer=None, image_mean=None, image_std=None,
                dtype=jnp.float32, remat=False):
  """A randomly initialised CLIP for a transformers CLIPConfig (to train from scratch)."""
  config = clip_lib.config_from_hf(hf_config, image_mean=image_mean, image_std=image_std,
                                   dtype=dtype, remat=remat)
  module = clip_lib.CLIPModule(config)
  v, t = config.vision, config.text
  images = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
  ids = jnp.zeros((1, t.max_position_embeddings), jnp.int32)
  params = nn.unbox(module.init(key, images, ids))["params"]
  return CLIP(module=module, params=params, config=config, tokenizer=tokenizer)


# ----------------------------------------------------------------------------
# Writing checkpoint folders.

def _preprocessor_config(config):
  v = config.vision
  # Same fields as transformers' CLIPImageProcessor (resample 3 = bicubic).
  return {
      "image_processor_type": "CLIPImageProcessor",
      "do_resize": True, "size": {"shortest_edge": v.image_size}, "resample": 3,
      "do_center_crop": True, "crop_size": {"height": v.image_size, "width": v.image_size},
      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": list(v.image_mean), "image_std": list(v.image_std),
      "do_convert_rgb": True,
  }


def save_pretrained(clip, params, out_dir):
  """Writes params as a HuggingFace CLIP checkpoint folder.

  Writes config.json, model.safetensors (float32, torch layout),
  preprocessor_config.json and, when clip.tokenizer is set, its files. Other
  files in out_dir are left alone; each written file appears atomically (staged
  in a temporary folder inside out_dir, then renamed).

  Args:
    clip: the CLIP whose config/tokenizer describe params.
    params: params pytree (e.g. fine-tuned), same structure as clip.params.
    out_dir: folder to write into (created if needed).

  Returns:
    out_dir.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = to_hf_state_dict(params, clip.config)  # validate before touching disk
  hf_config = config_to_hf(clip.config)
  os.makedirs(out_dir, exist_ok=True)
  stage = tempfile.mkdtemp(prefix=".staging-", dir=out_dir)
  try:
    hf_config.save_pretrained(stage)
    save_file(state, os.path.join(stage, SAFETENSORS_NAME), metadata={"format": "pt"})
    with open(os.path.join(stage, PREPROCESSOR_NAME), "w") as f:
      json.dump(_preprocessor_config(clip.config), f, indent=2)
    if clip.tokenizer is not None:
      clip.tokenizer.save_pretrained(stage)
    for name in sorted(os.listdir(stage)):
      os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  return out_dir
