"""Vision-only weights put on a base CLIP (TeCoA, FARE, Sim-CLIP, QT-AFT releases).

Many robust-CLIP papers publish only the fine-tuned vision tower, as a state
dict of one of three namings:

  open_clip   visual.conv1.weight, visual.transformer.resblocks.0.attn.in_proj_weight,
              ..., visual.proj                      (open_clip's model.state_dict())
  OpenAI      conv1.weight, transformer.resblocks.0..., proj
              (OpenAI CLIP's model.visual.state_dict(): open_clip's names without
              the 'visual.' prefix)
  HF          vision_model.embeddings.patch_embedding.weight, ...,
              visual_projection.weight             (transformers' CLIPModel names)

sometimes nested under one of NESTING_KEYS (e.g. {"vision_encoder_state_dict":
{...}}) and prefixed with 'module.' (torch DDP). `apply` replaces exactly the
base model's vision tower and projection ('vision_model', 'visual_projection');
the text side keeps its arrays, the same objects. Every missing, extra or
mis-shaped tensor is named before anything is replaced.

.pt/.pth/.bin files are pickles: read only with allow_pickle, and then with
torch.load(weights_only=True), torch's restricted unpickler (tensors and plain
containers only). .safetensors files need no opt-in.
"""

import os

from prsl_jax.models import clip as clip_lib
from prsl_jax.models import convert
from prsl_jax.models import open_clip as open_clip_lib

# Keys a vision state dict is found under, searched in this order at each level.
NESTING_KEYS = ("vision_encoder_state_dict", "vision_state_dict", "visual_state_dict",
                "state_dict", "model_state_dict", "model", "module")
VISION_KEYS = ("vision_model", "visual_projection")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def check_file(path, *, allow_pickle=False):
  """Fails fast, before any compute: the file exists and its kind is allowed."""
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"vision weights file not found: {path!r}")
  if path.endswith(PICKLE_SUFFIXES):
    if not allow_pickle:
      raise convert.pickle_refusal([path])
  elif not path.endswith(".safetensors"):
    raise ValueError(f"vision weights {path!r}: expected a .safetensors file or a torch "
                     f"pickle ({', '.join(PICKLE_SUFFIXES)}, with allow_pickle)")


def read(path, *, allow_pickle=False):
  """The {name: array} tensors of a vision weights file (nesting resolved)."""
  check_file(path, allow_pickle=allow_pickle)
  path = os.path.expanduser(os.fspath(path))
  kind = "safetensors" if path.endswith(".safetensors") else "pickle"
  return unnest(convert.read_tensors(kind, [path]), path)


def unnest(state, what="vision weights"):
  """Descends NESTING_KEYS until a flat {name: array} dict; strips 'module.'."""
  while isinstance(state, dict):
    arrays = {k: v for k, v in state.items() if hasattr(v, "shape")}
    nested = [k for k in NESTING_KEYS if isinstance(state.get(k), dict)]
    if arrays or not nested:
      break
    state = state[nested[0]]
  if not isinstance(state, dict) or not any(hasattr(v, "shape") for v in state.values()):
    keys = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"{what} holds no tensors where expected: top-level keys {keys}; the "
                     f"tensors may be nested under one of {list(NESTING_KEYS)}")
  state = {k: v for k, v in state.items() if hasattr(v, "shape")}
  return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def naming(state):
  """'open_clip', 'openai' or 'hf': which naming a vision state dict uses."""
  names = set(state)
  if any(n.startswith("visual.") for n in names):
    return "open_clip"
  if any(n.startswith(("vision_model.", "visual_projection.")) for n in names):
    return "hf"
  if "conv1.weight" in names or any(n.startswith("transformer.resblocks.") for n in names):
    return "openai"
  raise ValueError(f"cannot tell the naming of these vision weights (names start "
                   f"{sorted(names)[:4]}): expected open_clip 'visual.*', OpenAI "
                   "'conv1.weight'/'transformer.resblocks.*' or HF 'vision_model.*' names")


def to_hf(state, model):
  """A vision state dict in any of the three namings -> HF names (open_clip and
  OpenAI names checked here, HF names by apply)."""
  kind = naming(state)
  if kind in ("openai", "open_clip"):
    kmap = open_clip_lib.vision_key_map(model.config)
    if kind == "openai":  # open_clip's names without 'visual.'
      kmap = [(oc[len("visual."):], hf, op) for oc, hf, op in kmap]
    return open_clip_lib.to_hf_state_dict(state, model, kmap=kmap,
                                          what=f"vision weights ({kind} names)")
  return state  # names and shapes are checked in apply (convert.from_hf_state_dict)


def _hf_vision_map(model):
  return [e for e in clip_lib.key_map(model.config) if e[1][0] in VISION_KEYS]


def apply(model, params, state):
  """params with the vision tower replaced from `state` (any naming).

  Args:
    model: a prsl_jax CLIP (the base).
    params: the base params.
    state: {name: array}, a vision state dict (see `naming`).

  Returns:
    A new params dict: 'vision_model' and 'visual_projection' from `state`,
    every other key the base's own object.
  """
  if getattr(model, "kind", None) != "clip":
    raise ValueError(f"vision weights go on a CLIP base; this is a "
                     f"{getattr(model, 'kind', None)!r} model")
  vision = convert.from_hf_state_dict(
      to_hf(state, model), model, key_map=_hf_vision_map(model),
      what="vision weights do not match this model's vision tower")
  return {**params, **vision}


def load(model, params, path, *, allow_pickle=False):
  """apply(model, params, read(path)): the base with the file's vision tower."""
  return apply(model, params, read(path, allow_pickle=allow_pickle))


def load_on(pretrained, path, *, allow_pickle=False):
  """A convert.Pretrained with its CLIP's vision tower from `path` (None: as it is):
  what train.py's config.model.vision_weights and evaluate.py's --vision_weights do."""
  if not path:
    return pretrained
  return pretrained._replace(params=load(pretrained.model, pretrained.params, path,
                                         allow_pickle=allow_pickle))
