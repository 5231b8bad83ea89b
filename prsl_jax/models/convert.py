"""HuggingFace checkpoints <-> our flax models (CLIP, ViT-GPT-2 captioner, BLIP-2):
load, convert, export.

A checkpoint is a folder as transformers writes it: config.json,
model.safetensors (or model.safetensors.index.json + shards), optionally
preprocessor_config.json (pixel mean/std) and tokenizer files. `load_pretrained`
reads it into `Pretrained(model, params, tokenizer)`: the static model
(hashable, a jit static), float32 params and the tokenizer; `save_pretrained`
writes params back in the same format, loadable by transformers'
from_pretrained. The kind of model comes from config.json's model_type; each
kind's module (MODEL_KINDS) holds its explicit key map.

pytorch_model.bin is a pickle: unpickling runs arbitrary code from the file, so
it is refused unless the caller opts in with allow_pickle=True (then read with
torch.load(weights_only=True)).

transformers (and through it torch, when installed) is imported lazily inside
the functions that need it, so `import prsl_jax` stays light.
"""

import json
import os
import pickle
import re
import shutil
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prsl_jax.models import blip2 as blip2_lib
from prsl_jax.models import captioner as captioner_lib
from prsl_jax.models import clip as clip_lib
from prsl_jax.models import open_clip as open_clip_lib
from prsl_jax.models import siglip as siglip_lib

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
# Any one of these marks a folder with a tokenizer (spiece.model: SigLIP's
# SentencePiece model).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model")


class Pretrained(NamedTuple):
  """What load_pretrained returns: the static model, its params, its tokenizer.

  model: hashable static part (prsl_jax.models.clip.CLIP, ...), a jit static.
  params: float32 params pytree (a plain argument everywhere).
  tokenizer: the transformers tokenizer of the folder, or None.
  """
  model: Any
  params: Any
  tokenizer: Any = None


# config.json model_type -> the module that defines that kind of model. Each
# defines (the model protocol, prsl_jax/models/__init__.py): MODEL, its static
# model class; from_hf(hf_config, *, image_mean, image_std, dtype, remat) -> model,
# key_map(config), config_to_hf(config), preprocessor_config(config),
# load_tokenizer(folder), vocab_size(model); optionally
# adapt_state_dict(state_dict, model) -> (state_dict, model), which load_pretrained
# applies before matching names (buffers, alternative spellings, optional parts),
# and export_state_dict(state_dict, model) -> state_dict, its inverse for
# save_pretrained (e.g. fusing tensors the key map splits: BLIP-2's qkv bias).
MODEL_KINDS = {"clip": clip_lib, "vision-encoder-decoder": captioner_lib,
               "siglip": siglip_lib, "blip-2": blip2_lib}


def model_class(model_type):
  """The static model class of a config.json model_type (e.g. clip.CLIP)."""
  if model_type not in MODEL_KINDS:
    raise ValueError(f"unknown model_type {model_type!r}; prsl_jax loads "
                     f"{sorted(MODEL_KINDS)}")
  return MODEL_KINDS[model_type].MODEL


def _model_module(model):
  for kind, module in MODEL_KINDS.items():
    if model.kind == kind:
      return module
  raise ValueError(f"unknown model kind {getattr(model, 'kind', None)!r}; expected one of "
                   f"{sorted(MODEL_KINDS)}")


# Layout kinds of a key map entry: "linear" torch (out, in) <-> flax (in, out);
# "conv" torch (O, I, kh, kw) <-> flax (kh, kw, I, O); "copy" same layout.
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


def from_hf_state_dict(state_dict, model, *, key_map=None, what=None):
  """HF state dict {name: array} -> our float32 params pytree for `model`.

  key_map: the entries to convert (default: the model's whole key map); a part
  of it (e.g. the vision tower's) gives the params of that part only.
  what: how an error names the tensors (default: the checkpoint's).

  Raises:
    ValueError listing missing/unexpected keys (HF's position_ids buffers are
    ignored), or naming a parameter whose shape does not fit the config.
  """
  state = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
  kmap = _model_module(model).key_map(model.config) if key_map is None else key_map
  expected = {hf for hf, _, _ in kmap}
  missing, unexpected = expected - set(state), set(state) - expected
  if missing or unexpected:
    what = what or f"checkpoint keys do not match a {model.kind} model with this config.json"
    raise ValueError(f"{what}: missing [{_list(missing)}]; unexpected [{_list(unexpected)}]")
  shapes = model.param_shapes()
  params = {}
  for hf, path, kind in kmap:
    x = np.asarray(state[hf])
    want = _hf_shape(_get(shapes, path).shape, kind)
    if tuple(x.shape) != want:
      raise ValueError(f"parameter {hf!r} has shape {tuple(x.shape)} in the checkpoint "
                       f"but the config expects {want}")
    _set(params, path, jnp.asarray(_to_flax(x.astype(np.float32), kind)))
  return params


def to_hf_state_dict(params, model):
  """Our params pytree -> {HF name: float32 numpy array in torch layout}."""
  shapes = model.param_shapes()
  flat_have = {tuple(getattr(k, "key", k) for k in path)
               for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  kmap = _model_module(model).key_map(model.config)
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


# ----------------------------------------------------------------------------
# Reading checkpoint folders.

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(spec) -> bool:
  """True for 'org/name' strings that are not local paths (the one hub-id rule)."""
  spec = str(spec)
  looks_local = spec.startswith((".", "/", "~")) or os.path.exists(spec.split("/")[0])
  return bool(_HUB_ID.fullmatch(spec)) and not looks_local


def _env_offline():
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  # constants.HF_HUB_OFFLINE is read once at import; the env var may be set later.
  env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
  return env or bool(constants.HF_HUB_OFFLINE)


def resolve_folder(path_or_hub_id, allow_pickle=False):
  """A local checkpoint folder for a folder path or a hub id (downloaded when online)."""
  path = os.path.expanduser(os.fspath(path_or_hub_id))
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise NotADirectoryError(f"checkpoint path {path!r} is a file; load_pretrained "
                             "expects the checkpoint folder (with config.json)")
  if not is_hub_id(path_or_hub_id):
    raise FileNotFoundError(f"checkpoint folder not found: {path!r} (and not a hub id "
                            "such as openai/clip-vit-base-patch32)")
  from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
  offline = _env_offline()
  patterns = ["*.json", "*.safetensors", "*.txt", "*.model"] + (
      ["*.bin"] if allow_pickle else [])
  hub_id = str(path_or_hub_id)
  unreachable = None if offline else _probe_hub(hub_id)
  try:
    # local_files_only when offline or when the hub did not answer the probe:
    # answer from the cache or fail now, instead of waiting on a network that is
    # not there. etag_timeout bounds the per-file metadata requests.
    return snapshot_download(hub_id, allow_patterns=patterns,
                             local_files_only=offline or unreachable is not None,
                             etag_timeout=_hub_timeout())
  except Exception as e:  # pylint: disable=broad-except
    if unreachable is not None:
      why = (f"the hub at {_hub_endpoint()} did not answer within {_hub_timeout():g} s "
             f"({unreachable}) and it is not in the local cache")
    elif offline:
      why = "HF_HUB_OFFLINE is set and it is not in the local cache"
    else:
      why = "the hub is unreachable or has no such repo"
    raise OSError(
        f"{path_or_hub_id!r} is not a local folder ({os.path.abspath(path)} does not "
        f"exist) and could not be fetched from the HuggingFace hub: {why} "
        f"({type(e).__name__}: {' '.join(str(e).split())[:300]}). To work offline, download "
        f"it where there is network (`hf download {path_or_hub_id} --local-dir DIR`) and "
        "pass the local folder: load_pretrained('DIR'), evaluate.py --checkpoint DIR or "
        "train.py --config.model.path=DIR; or set HF_HUB_OFFLINE=1 to use the hub cache "
        "(HF_HUB_ETAG_TIMEOUT: seconds to wait for the hub).") from e


def _hub_timeout() -> float:
  """Seconds to wait for one answer from the hub (HF_HUB_ETAG_TIMEOUT, default 10)."""
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  try:
    return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or constants.HF_HUB_ETAG_TIMEOUT)
  except ValueError:
    return float(constants.DEFAULT_ETAG_TIMEOUT)


def _hub_endpoint() -> str:
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  return constants.ENDPOINT


def _probe_hub(repo_id):
  """None if the hub answers (anything, a 404 included) within the timeout; else why not.

  snapshot_download's first request (repo_info) has no timeout, so an endpoint
  that accepts connections and never answers would hang it for minutes; this
  one request, without retries, is bounded.
  """
  from huggingface_hub import HfApi  # pylint: disable=g-import-not-at-top
  try:
    HfApi().model_info(repo_id, timeout=_hub_timeout())
  except Exception as e:  # pylint: disable=broad-except
    name = type(e).__name__
    if isinstance(e, (TimeoutError, ConnectionError)) or "Timeout" in name or \
        "Connect" in name or "Network" in name or "Proxy" in name:
      return name
  return None


def pickle_refusal(files):
  """The ValueError refusing a pickle weight file without the allow_pickle opt-in."""
  return ValueError(
      f"refusing to load {', '.join(files)}: a .bin/.pt file is a Python pickle, and "
      "unpickling can execute arbitrary code from the file. Prefer a model.safetensors "
      "checkpoint (transformers' save_pretrained writes one by default). If you trust "
      "this file, opt in: evaluate.py --allow_pickle, train.py "
      "--config.model.allow_pickle=True, or load_pretrained(..., allow_pickle=True); it is "
      "then read with torch.load(weights_only=True), which needs torch installed.")


# Tensors that are integers in HF checkpoints (buffers, not weights).
_INTEGER_BUFFERS = ("position_ids", "num_batches_tracked")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "float16", "bfloat16",
                 "float32", "float64")


# GPT-2's causal-mask buffers (bool or uint8 in older checkpoints; dropped on load).
_MASK_BUFFER = re.compile(r"(^|\.)(attn|crossattention)\.(bias|masked_bias)$")


def _check_dtype(path, name, dtype):
  """A weight declared with an integer or bool dtype in its header is a broken file."""
  if (str(dtype) in _FLOAT_DTYPES or name.split(".")[-1] in _INTEGER_BUFFERS
      or _MASK_BUFFER.search(name)):
    return
  raise ValueError(f"{path}: tensor {name!r} is declared {dtype} in the file's header, but "
                   "it is a float weight; the file is damaged or was written wrongly: save "
                   "or download it again")


def _check_finite(path, state):
  """Every float array of state (through nested dicts) is finite, else one line."""
  for name, value in state.items():
    if isinstance(value, dict):
      _check_finite(path, {f"{name}.{k}": v for k, v in value.items()})
      continue
    if not hasattr(value, "dtype"):  # e.g. an epoch counter beside the tensors
      continue
    if str(value.dtype) in _FLOAT_DTYPES and not np.isfinite(value).all():
      bad = int(np.size(value) - np.isfinite(value).sum())
      raise ValueError(f"{path}: tensor {name!r} has {bad} NaN/Inf value(s) of "
                       f"{np.size(value)}; the checkpoint is broken (a diverged run?): use "
                       "an earlier one")


def _read_safetensors(files):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  state = {}
  for f in files:
    try:
      part = load_file(f)
    except Exception as e:  # pylint: disable=broad-except  # SafetensorError, OSError
      raise ValueError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e}); "
                       "it may be truncated: download or save it again") from None
    for name, value in part.items():
      _check_dtype(f, name, value.dtype)
    _check_finite(f, part)
    state.update(part)
  return state


def _weight_files(folder, allow_pickle):
  """(kind, files) of the folder's weights: 'safetensors' or 'pickle' (opt-in only)."""
  has = lambda name: os.path.isfile(os.path.join(folder, name))
  if has(SAFETENSORS_NAME):
    return "safetensors", [os.path.join(folder, SAFETENSORS_NAME)]
  if has(SAFETENSORS_INDEX_NAME):
    return "safetensors", _shards(folder, SAFETENSORS_INDEX_NAME)
  if has(PICKLE_NAME) or has(PICKLE_INDEX_NAME):
    name = PICKLE_NAME if has(PICKLE_NAME) else PICKLE_INDEX_NAME
    if not allow_pickle:
      raise pickle_refusal([os.path.join(folder, name)])
    files = [os.path.join(folder, PICKLE_NAME)] if name == PICKLE_NAME else \
        _shards(folder, PICKLE_INDEX_NAME)
    return "pickle", files
  raise FileNotFoundError(
      f"no weights in {folder}: expected {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME} "
      f"(or {PICKLE_NAME} with allow_pickle)")


def checkpoint_format(folder):
  """'open_clip' for a folder with open_clip_config.json and no config.json, else 'hf'."""
  has = lambda name: os.path.isfile(os.path.join(folder, name))
  return "open_clip" if has(open_clip_lib.CONFIG_NAME) and not has(CONFIG_NAME) else "hf"


def source_format(path_or_hub_id):
  """The format a checkpoint folder or hub id (resolved from the cache) is in;
  save_pretrained(format=...) writes it back the same way."""
  path = os.path.expanduser(os.fspath(path_or_hub_id))
  folder = path if os.path.isdir(path) else resolve_folder(path_or_hub_id)
  return checkpoint_format(folder)


def _read_open_clip_config(folder):
  path = os.path.join(folder, open_clip_lib.CONFIG_NAME)
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} cannot be read as JSON ({e})") from None
  if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
    raise ValueError(f"{path} has no 'model_cfg' object; is {folder} an open_clip folder?")
  return cfg


def _open_clip_weight_files(folder, allow_pickle):
  """(kind, [file]) of an open_clip folder: safetensors, or the pickle (opt-in only)."""
  st = os.path.join(folder, open_clip_lib.SAFETENSORS_NAME)
  pk = os.path.join(folder, open_clip_lib.PICKLE_NAME)
  if os.path.isfile(st):
    return "safetensors", [st]
  if os.path.isfile(pk):
    if not allow_pickle:
      raise pickle_refusal([pk])
    return "pickle", [pk]
  raise FileNotFoundError(f"no weights in open_clip folder {folder}: expected "
                          f"{open_clip_lib.SAFETENSORS_NAME} (or {open_clip_lib.PICKLE_NAME} "
                          "with allow_pickle)")


def model_type(folder):
  """config.json's model_type of a checkpoint folder (one JSON read, no weights);
  'clip' for an open_clip folder."""
  if checkpoint_format(folder) == "open_clip":
    open_clip_lib.config_from_open_clip(_read_open_clip_config(folder))  # refuses early
    return "clip"
  path = os.path.join(folder, CONFIG_NAME)
  try:
    with open(path) as f:
      value = json.load(f).get("model_type")
  except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
    raise ValueError(f"{path} cannot be read as a JSON object ({e}); is {folder} a "
                     "checkpoint folder?") from None
  if value not in MODEL_KINDS:
    raise ValueError(f"{path} has model_type={value!r}; prsl_jax loads {sorted(MODEL_KINDS)}")
  return value


def check_weights(folder, *, allow_pickle=False):
  """Reads only the headers of a folder's weight files: fails fast on a broken file."""
  if checkpoint_format(folder) == "open_clip":
    kind, files = _open_clip_weight_files(folder, allow_pickle)
  else:
    kind, files = _weight_files(folder, allow_pickle)
  if kind != "safetensors":
    return
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  for f in files:
    try:
      with safe_open(f, framework="np") as handle:
        names = list(handle.keys())
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e}); "
                       "it may be truncated: download or save it again") from None
    if not names:
      raise ValueError(f"{f} holds no tensors")
    with safe_open(f, framework="np") as handle:
      for name in names:
        _check_dtype(f, name, handle.get_slice(name).get_dtype())


def _read_pickles(files):
  import torch  # pylint: disable=g-import-not-at-top  # only on explicit opt-in
  state = {}
  for f in files:
    try:
      sd = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: blocked, as it must be
      lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
      first = next((l for l in lines if "unsupported global" in l.lower()), lines[0])
      raise ValueError(f"{f} holds more than tensors and was not loaded: torch.load("
                       f"weights_only=True) blocked it ({first[:200]}); only a file of "
                       "plain tensors can be read: convert the checkpoint to safetensors "
                       "where you trust it") from None
    part = _numpy_tensors(sd)
    _check_finite(f, part)
    state.update(part)
  return state


def _numpy_tensors(tree):
  """torch tensors -> float32 numpy arrays, through nested dicts (other leaves kept)."""
  if isinstance(tree, dict):
    return {k: _numpy_tensors(v) for k, v in tree.items()}
  if hasattr(tree, "detach"):
    # .float() first: numpy has no bfloat16 for torch tensors.
    return tree.detach().float().numpy()
  return tree


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
  kind, files = _weight_files(folder, allow_pickle)
  return read_tensors(kind, files)


def read_tensors(kind, files):
  """{name: array} of weight files of one kind: 'safetensors', or 'pickle' (read
  with torch.load(weights_only=True): float32 arrays, nested dicts kept); the
  caller has checked the allow_pickle opt-in (pickle_refusal)."""
  return _read_safetensors(files) if kind == "safetensors" else _read_pickles(files)


def _read_mean_std(folder):
  path = os.path.join(folder, PREPROCESSOR_NAME)
  if not os.path.isfile(path):
    return None, None
  with open(path) as f:
    pre = json.load(f)
  return pre.get("image_mean"), pre.get("image_std")


def load_pretrained(path_or_hub_id, *, allow_pickle=False, dtype=jnp.float32,
                    remat=False) -> Pretrained:
  """Loads a HuggingFace checkpoint (local folder or hub id) of a supported kind.

  The kind comes from config.json's model_type: 'clip' (CLIPModel), 'siglip'
  (SiglipModel), 'vision-encoder-decoder' (ViT + GPT-2 captioner) or 'blip-2'
  (Blip2ForConditionalGeneration with OPT); a folder with open_clip_config.json
  (and no config.json) is an open_clip CLIP (prsl_jax.models.open_clip),
  tokenized offline with CLIP's BPE.

  Args:
    path_or_hub_id: a folder as written by transformers' save_pretrained, or a
      hub id such as "openai/clip-vit-base-patch32" (needs network or the cache).
    allow_pickle: accept pytorch_model.bin (unpickling can run arbitrary code).
    dtype: compute dtype of the module; params are float32 regardless.
    remat: rematerialise transformer layers (less memory, more compute).

  Returns:
    Pretrained(model, params, tokenizer): model is static and hashable, params a
    float32 pytree, tokenizer None when the folder has none.
  """
  folder = resolve_folder(path_or_hub_id, allow_pickle)
  if checkpoint_format(folder) == "open_clip":
    return _load_open_clip(folder, allow_pickle=allow_pickle, dtype=dtype, remat=remat)
  config_path = os.path.join(folder, CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint folder {folder}")
  try:
    with open(config_path) as f:
      model_type = json.load(f).get("model_type")
  except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
    raise ValueError(f"{config_path} is not a JSON object: {e}") from e
  if model_type not in MODEL_KINDS:
    raise ValueError(f"{config_path} has model_type={model_type!r}; prsl_jax loads "
                     f"{sorted(MODEL_KINDS)}")
  kind = MODEL_KINDS[model_type]
  import transformers  # pylint: disable=g-import-not-at-top
  hf_config = transformers.AutoConfig.from_pretrained(folder)
  mean, std = _read_mean_std(folder)
  model = kind.from_hf(hf_config, image_mean=mean, image_std=std, dtype=dtype, remat=remat)
  state = read_state_dict(folder, allow_pickle=allow_pickle)
  if hasattr(kind, "adapt_state_dict"):
    state, model = kind.adapt_state_dict(state, model)
  params = from_hf_state_dict(state, model)
  tokenizer = None
  if any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES):
    tokenizer = kind.load_tokenizer(folder)
    if len(tokenizer) > kind.vocab_size(model):
      raise ValueError(f"tokenizer in {folder} has {len(tokenizer)} tokens but the "
                       f"model's vocab_size is {kind.vocab_size(model)}")
  return Pretrained(model, params, tokenizer)


def _load_open_clip(folder, *, allow_pickle, dtype, remat):
  """An open_clip folder -> Pretrained(CLIP, params, offline CLIP BPE tokenizer)."""
  model = open_clip_lib.from_open_clip(_read_open_clip_config(folder), dtype=dtype,
                                       remat=remat)
  kind, files = _open_clip_weight_files(folder, allow_pickle)
  state = read_tensors(kind, files)
  if isinstance(state.get("state_dict"), dict):  # open_clip training checkpoints nest it
    state = state["state_dict"]
  state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
  params = from_hf_state_dict(open_clip_lib.to_hf_state_dict(state, model), model)
  return Pretrained(model, params, open_clip_lib.load_tokenizer(model))


def from_config(hf_config, *, key, tokenizer=None, image_mean=None, image_std=None,
                dtype=jnp.float32, remat=False) -> Pretrained:
  """A randomly initialised model for a transformers config (to train from scratch)."""
  model_type = getattr(hf_config, "model_type", None)
  if model_type not in MODEL_KINDS:
    raise ValueError(f"hf_config.model_type={model_type!r}; expected one of "
                     f"{sorted(MODEL_KINDS)}")
  model = MODEL_KINDS[model_type].from_hf(hf_config, image_mean=image_mean,
                                          image_std=image_std, dtype=dtype, remat=remat)
  return Pretrained(model, model.init(key), tokenizer)


# ----------------------------------------------------------------------------
# Writing checkpoint folders.


FORMATS = ("hf", "open_clip")


def save_pretrained(model, params, out_dir, *, tokenizer=None, format="hf"):  # pylint: disable=redefined-builtin
  """Writes params as a HuggingFace (or open_clip) checkpoint folder.

  format="open_clip" (a CLIP only) writes open_clip_config.json and
  open_clip_model.safetensors, loadable by open_clip's
  create_model_and_transforms("hf-hub:..." or a model_cfg, pretrained=<file>);
  open_clip folders carry no tokenizer, so `tokenizer` is not written.

  Writes config.json, model.safetensors (float32, torch layout),
  preprocessor_config.json and, when a tokenizer is given, its files. Other
  files in out_dir are left alone; each written file appears atomically (staged
  in a temporary folder inside out_dir, then renamed).

  Args:
    model: the static model (Pretrained.model) describing params.
    params: params pytree (e.g. fine-tuned), same structure as the model's.
    out_dir: folder to write into (created if needed).
    tokenizer: optional transformers tokenizer saved beside the weights.

  Returns:
    out_dir.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  kind = _model_module(model)
  if format == "open_clip" and model.kind != "clip":
    raise ValueError(f"format='open_clip' exports CLIP models; this is a {model.kind!r} model")
  state = to_hf_state_dict(params, model)  # validate before touching disk
  if format == "open_clip":
    oc_config = open_clip_lib.config_to_open_clip(model.config)
    state = open_clip_lib.from_hf_state_dict(state, model)
  else:
    hf_config = kind.config_to_hf(model.config)
    if hasattr(kind, "export_state_dict"):
      state = kind.export_state_dict(state, model)
  os.makedirs(out_dir, exist_ok=True)
  stage = tempfile.mkdtemp(prefix=".staging-", dir=out_dir)
  try:
    if format == "open_clip":
      with open(os.path.join(stage, open_clip_lib.CONFIG_NAME), "w") as f:
        json.dump(oc_config, f, indent=2)
      save_file(state, os.path.join(stage, open_clip_lib.SAFETENSORS_NAME))
    else:
      hf_config.save_pretrained(stage)
      save_file(state, os.path.join(stage, SAFETENSORS_NAME), metadata={"format": "pt"})
      with open(os.path.join(stage, PREPROCESSOR_NAME), "w") as f:
        json.dump(kind.preprocessor_config(model.config), f, indent=2)
      if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(stage)
  except Exception as e:  # pylint: disable=broad-except  # ENOSPC arrives as SafetensorError too
    shutil.rmtree(stage, ignore_errors=True)
    raise OSError(f"cannot write the model into {out_dir} ({type(e).__name__}: "
                  f"{' '.join(str(e).split())[:300]}); its earlier files are left as they "
                  "were: free space or choose another folder") from e
  try:
    for name in sorted(os.listdir(stage)):
      os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  return out_dir
