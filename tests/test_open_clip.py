"""open_clip folders: parity with open_clip_torch on random tiny models, export
round trip into open_clip, the offline BPE tokenizer, refusals."""

import json
import os

import jax
import numpy as np
import pytest
import safetensors.torch
import torch

from tests import reference_libs  # pylint: disable=g-import-not-at-top,wrong-import-position

open_clip = reference_libs.open_clip()

from prsl_jax import zeroshot  # pylint: disable=g-import-not-at-top,wrong-import-position
from prsl_jax.losses import l2_normalize  # pylint: disable=g-import-not-at-top,wrong-import-position
from prsl_jax.models import bpe_tokenizer  # pylint: disable=g-import-not-at-top,wrong-import-position
from prsl_jax.models import open_clip as open_clip_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from prsl_jax.models.convert import load_pretrained, save_pretrained  # pylint: disable=g-import-not-at-top,wrong-import-position

_TEXT = dict(context_length=12, vocab_size=49408, width=32, heads=4, layers=1)
# Scaled-down open_clip model_cfgs: a QuickGELU ViT-B/32-style (spelled as
# FARE's open_clip_config.json spells it, the string "TRUE"), a GELU one
# (LAION's H/g/bigG style), and non-default width/depth/patch/mlp ratios.
CONFIGS = {
    "quickgelu_b32": dict(
        model_cfg=dict(embed_dim=16, quick_gelu="TRUE",
                       vision_cfg=dict(image_size=64, layers=2, width=64, head_width=32,
                                       patch_size=32),
                       text_cfg=_TEXT),
        preprocess_cfg=dict(mean=[0.48145466, 0.4578275, 0.40821073],
                            std=[0.26862954, 0.26130258, 0.27577711])),
    "gelu": dict(
        model_cfg=dict(embed_dim=24,
                       vision_cfg=dict(image_size=28, layers=1, width=48, head_width=16,
                                       patch_size=14),
                       text_cfg=dict(_TEXT, width=48, heads=3, layers=2)),
        preprocess_cfg=dict(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])),
    "odd_shapes": dict(
        model_cfg=dict(embed_dim=8, quick_gelu=False,
                       vision_cfg=dict(image_size=30, layers=3, width=40, head_width=20,
                                       patch_size=6, mlp_ratio=3.0),
                       text_cfg=dict(_TEXT, context_length=9, width=24, heads=2, layers=3,
                                     mlp_ratio=2.0)),
        preprocess_cfg=dict(mean=[0.4, 0.45, 0.5], std=[0.2, 0.25, 0.3])),
}
TEXTS = ["a photo of a cat.", "Ünïcödé & emoji 🚀", "", "a much longer caption that "
         "runs well past the context length of these tiny models"]


def _reference(name):
  """A random open_clip_torch model of CONFIGS[name], every tensor perturbed."""
  cfg = json.loads(json.dumps(CONFIGS[name]["model_cfg"]))
  torch.manual_seed(len(name))
  model = open_clip.model.CLIP(**cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _write_folder(model, cfg, folder, pickle=False):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, open_clip_lib.CONFIG_NAME), "w") as f:
    json.dump(cfg, f)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  if pickle:
    torch.save(state, os.path.join(folder, open_clip_lib.PICKLE_NAME))
  else:
    safetensors.torch.save_file(state, os.path.join(folder, open_clip_lib.SAFETENSORS_NAME))
  return folder


def _ref_outputs(model, cfg, images, texts):
  pre = cfg["preprocess_cfg"]
  mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
  std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
  x = (torch.from_numpy(images).permute(0, 3, 1, 2) - mean) / std
  ids = open_clip.tokenize(texts, context_length=cfg["model_cfg"]["text_cfg"]["context_length"])
  with torch.no_grad():
    img, txt = model.encode_image(x), model.encode_text(ids)
    logits = model.logit_scale.exp() * torch.nn.functional.normalize(img, dim=-1) @ \
        torch.nn.functional.normalize(txt, dim=-1).T
  return img.numpy(), txt.numpy(), logits.numpy(), ids.numpy()


def _ours(pretrained, images, texts):
  model, params, tok = pretrained
  ids, mask = zeroshot.tokenize(tok, texts, model.max_text_length)
  # One jit: eager flax would compile every op on its own (slow on CPU).
  @jax.jit
  def run(params, images, ids, mask):
    txt = model.encode_texts(params, ids, mask)
    return (model.encode_images(params, images), txt,
            zeroshot.logits(model, params, txt, images))
  img, txt, logits = map(np.asarray, run(params, images, ids, mask))
  return img, txt, logits, ids


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("open_clip")
  out = {}
  for name, cfg in CONFIGS.items():
    ref = _reference(name)
    out[name] = (ref, _write_folder(ref, cfg, str(root / name)))
  return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_open_clip_torch(folders, name):
  ref, folder = folders[name]
  cfg = CONFIGS[name]
  pretrained = load_pretrained(folder)
  size = cfg["model_cfg"]["vision_cfg"]["image_size"]
  assert pretrained.model.image_size == size
  assert pretrained.model.config.vision.image_mean == tuple(cfg["preprocess_cfg"]["mean"])
  act = "quick_gelu" if name != "gelu" and cfg["model_cfg"]["quick_gelu"] else "gelu"
  assert pretrained.model.config.vision.hidden_act == act
  images = np.random.default_rng(0).uniform(size=(2, size, size, 3)).astype(np.float32)
  want_img, want_txt, want_logits, want_ids = _ref_outputs(ref, cfg, images, TEXTS)
  img, txt, logits, ids = _ours(pretrained, images, TEXTS)
  np.testing.assert_array_equal(ids, want_ids)  # the offline tokenizer, at the config's length
  np.testing.assert_allclose(img, want_img, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(txt, want_txt, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=1e-4)


def test_export_round_trip_loads_in_open_clip(folders, tmp_path):
  ref, folder = folders["quickgelu_b32"]
  cfg = CONFIGS["quickgelu_b32"]
  model, params, tok = load_pretrained(folder)
  rng = np.random.default_rng(1)
  tuned = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.02, x.shape).astype(
      np.float32), params)
  out = save_pretrained(model, tuned, str(tmp_path / "export"), format="open_clip")
  assert sorted(os.listdir(out)) == [open_clip_lib.CONFIG_NAME, open_clip_lib.SAFETENSORS_NAME]
  theirs, _, _ = open_clip.create_model_and_transforms("local-dir:" + out)
  theirs.eval()
  images = rng.uniform(size=(2, 64, 64, 3)).astype(np.float32)
  want_img, want_txt, want_logits, _ = _ref_outputs(theirs, cfg, images, TEXTS)
  img, txt, logits, _ = _ours((model, tuned, tok), images, TEXTS)
  np.testing.assert_allclose(img, want_img, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(txt, want_txt, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=1e-4)
  # And back: our loader reads our export bit for bit.
  again = load_pretrained(out)
  assert again.model == model
  jax.tree.map(np.testing.assert_array_equal, again.params, tuned)


def test_pickle_needs_opt_in_and_blocks_code(folders, tmp_path):
  ref, _ = folders["gelu"]
  folder = _write_folder(ref, CONFIGS["gelu"], str(tmp_path / "pickled"), pickle=True)
  with pytest.raises(ValueError, match="pickle"):
    load_pretrained(folder)
  assert load_pretrained(folder, allow_pickle=True).model.config.vision.hidden_act == "gelu"

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))
  torch.save({"x": Evil()}, os.path.join(folder, open_clip_lib.PICKLE_NAME))
  with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
    load_pretrained(folder, allow_pickle=True)


@pytest.mark.parametrize("field,value,match", [
    ("vision_cfg.layers", [3, 4, 6, 3], "ResNet"),
    ("vision_cfg.timm_model_name", "vit_base_patch16_224", "timm_model_name"),
    ("vision_cfg.attentional_pool", True, "attentional_pool"),
    ("text_cfg.hf_model_name", "roberta-base", "hf_model_name"),
    ("vision_cfg.ls_init_value", 1e-5, "ls_init_value"),
    ("init_logit_bias", -10, "init_logit_bias"),
    ("quick_gelu", "maybe", "quick_gelu"),
])
def test_unsupported_architectures_are_refused(field, value, match):
  cfg = json.loads(json.dumps(CONFIGS["gelu"]))
  where = cfg["model_cfg"]
  *parents, leaf = field.split(".")
  for p in parents:
    where = where[p]
  where[leaf] = value
  with pytest.raises(ValueError, match=match) as e:
    open_clip_lib.config_from_open_clip(cfg)
  assert "\n" not in str(e.value)


AWKWARD = [
    "", " ", "a photo of a dog.", "A PHOTO OF A DOG!!!", "it's <end_of_text> isn't it",
    "<start_of_text>", "Héllo wörld, ÇA VA? naïve café", "東京タワー 🗼🚀👩‍👩‍👧", "“curly” ‘quotes’ — dash…",
    "&amp;lt;b&amp;gt; html &quot;", "ﬁ ligature ＦＵＬＬ ｗｉｄｔｈ", "tab\tnew\nline   spaces",
    "3.14159 1,000,000 #hashtag @user", "x" * 300, " ".join(["word"] * 100), "!!!!????....",
    "mojibake: Ã©tÃ©",
]


def test_bpe_tokenizer_equals_open_clip_ids():
  ours = bpe_tokenizer.ClipBpeTokenizer(context_length=77)
  theirs = open_clip.get_tokenizer("ViT-B-32")
  np.testing.assert_array_equal(ours.tokenize(AWKWARD), theirs(AWKWARD).numpy())
  np.testing.assert_array_equal(ours.tokenize(AWKWARD, 10),
                                theirs(AWKWARD, context_length=10).numpy())
  enc = ours(AWKWARD[:3], max_length=10)
  assert len(ours) == 49408
  # The mask covers start .. end token, so first-EOS and argmax pooling agree.
  np.testing.assert_array_equal(enc["attention_mask"].sum(1), [2, 2, 8])


# ----------------------------------------------------------------------------
# Vision-only weights on a base CLIP.


@pytest.fixture(scope="module")
def robust_tower(folders, tmp_path_factory):
  """A second model of the base's architecture: its vision tower is the 'robust' one."""
  cfg = CONFIGS["quickgelu_b32"]
  torch.manual_seed(123)
  other = open_clip.model.CLIP(**json.loads(json.dumps(cfg["model_cfg"]))).eval()
  with torch.no_grad():
    for p in other.parameters():
      p.add_(0.05 * torch.randn_like(p))
  folder = _write_folder(other, cfg, str(tmp_path_factory.mktemp("robust") / "full"))
  return other, load_pretrained(folder)


def _namings(other, robust):
  from prsl_jax.models import convert  # pylint: disable=g-import-not-at-top
  open_clip_names = {k: v.clone() for k, v in other.state_dict().items()
                     if k.startswith("visual.")}
  openai_names = {k: v.clone() for k, v in other.visual.state_dict().items()}
  hf = convert.to_hf_state_dict(robust.params, robust.model)
  hf_names = {k: torch.from_numpy(v) for k, v in hf.items()
              if k.startswith(("vision_model.", "visual_projection."))}
  return {"open_clip": open_clip_names, "openai": openai_names, "hf": hf_names}


@pytest.mark.parametrize("naming", ["open_clip", "openai", "hf"])
def test_vision_weights_replace_exactly_the_vision_tower(folders, robust_tower, tmp_path,
                                                         naming):
  from prsl_jax.models import vision_weights  # pylint: disable=g-import-not-at-top
  other, robust = robust_tower
  _, base_folder = folders["quickgelu_b32"]
  state = _namings(other, robust)[naming]
  if naming == "open_clip":  # a pickle, nested as TeCoA/FARE-style releases nest it
    path = str(tmp_path / "vision.pt")
    torch.save({"epoch": 3, "vision_encoder_state_dict": state}, path)
    with pytest.raises(ValueError, match="pickle"):
      vision_weights.load_on(load_pretrained(base_folder), path)
    loaded = vision_weights.load_on(load_pretrained(base_folder), path, allow_pickle=True)
  else:
    path = str(tmp_path / "vision.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    loaded = vision_weights.load_on(load_pretrained(base_folder), path)
  assert vision_weights.naming(vision_weights.read(path, allow_pickle=True)) == naming
  base = load_pretrained(base_folder)
  for key in loaded.params:
    src = robust if key in vision_weights.VISION_KEYS else base
    jax.tree.map(np.testing.assert_array_equal, loaded.params[key], src.params[key])
  images = np.random.default_rng(2).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  want, _, _, _ = _ref_outputs(other, CONFIGS["quickgelu_b32"], images, TEXTS[:1])
  got = jax.jit(loaded.model.encode_images)(loaded.params, images)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)


def test_vision_weights_errors_name_the_tensor(folders, robust_tower):
  from prsl_jax.models import vision_weights  # pylint: disable=g-import-not-at-top
  other, robust = robust_tower
  base = load_pretrained(folders["quickgelu_b32"][1])
  for naming, state in _namings(other, robust).items():
    name = sorted(state)[3]
    truncated = {k: v.numpy() for k, v in state.items() if k != name}
    with pytest.raises(ValueError, match="missing .*" + name.replace(".", r"\.")) as e:
      vision_weights.apply(base.model, base.params, truncated)
    assert "\n" not in str(e.value)
    extra = dict({k: v.numpy() for k, v in state.items()}, **{"extra.tensor": np.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected \[extra\.tensor\]"):
      vision_weights.apply(base.model, base.params, extra)
    misshaped = {k: v.numpy() for k, v in state.items()}
    misshaped[name] = np.zeros(misshaped[name].shape + (2,), np.float32)
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".* shape") as e:
      vision_weights.apply(base.model, base.params, misshaped)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="nested under"):
    vision_weights.unnest({"epoch": 1, "weird_key": {"x": 1}})


def test_evaluate_checks_vision_weights_before_compute(tmp_path):
  import prsl_jax  # pylint: disable=g-import-not-at-top
  from prsl_jax import evaluator  # pylint: disable=g-import-not-at-top
  outdir = str(tmp_path / "out")
  settings = dict(checkpoint=prsl_jax.TINY_CLIP, outdir=outdir)
  with pytest.raises(FileNotFoundError, match="vision weights file not found"):
    evaluator.preflight(dict(settings, vision_weights=str(tmp_path / "missing.pt")))
  pickled = tmp_path / "tower.pt"
  torch.save({"conv1.weight": torch.zeros(1)}, str(pickled))
  with pytest.raises(ValueError, match="pickle"):
    evaluator.preflight(dict(settings, vision_weights=str(pickled)))
  (tmp_path / "tower.npz").write_bytes(b"")
  with pytest.raises(ValueError, match="safetensors"):
    evaluator.preflight(dict(settings, vision_weights=str(tmp_path / "tower.npz")))
  assert not os.path.exists(outdir)


def test_open_clip_model_exports_to_hf_with_its_tokenizer(folders, tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  ref, folder = folders["odd_shapes"]
  model, params, tok = load_pretrained(folder)
  out = save_pretrained(model, params, str(tmp_path / "hf"), tokenizer=tok)
  hf_model = transformers.CLIPModel.from_pretrained(out).eval()
  hf_tok = transformers.CLIPTokenizerFast.from_pretrained(out)
  texts = ["a photo of a cat.", "Héllo wörld, naïve café!", "x" * 40]
  enc = hf_tok(texts, padding="max_length", truncation=True, max_length=model.max_text_length,
               return_tensors="pt")
  ids, _ = zeroshot.tokenize(tok, texts, model.max_text_length)
  mask = enc["attention_mask"].numpy().astype(bool)
  np.testing.assert_array_equal(enc["input_ids"].numpy()[mask], ids[mask])  # pads differ
  with torch.no_grad():
    theirs = hf_model.get_text_features(**enc).pooler_output.numpy()
  want = _ref_outputs(ref, CONFIGS["odd_shapes"], np.zeros((1, 30, 30, 3), np.float32), texts)[1]
  np.testing.assert_allclose(theirs, want, atol=2e-5, rtol=1e-4)


def test_train_and_evaluate_put_the_tower_file_on_their_base(tmp_path):
  # The CLIs' path (trainer.setup, evaluator.load_model), not load_on alone: the
  # tiny CLIP's own vision tower, shifted by 1, in HF names.
  import prsl_jax  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from prsl_jax import evaluator, trainer  # pylint: disable=g-import-not-at-top
  from tests import small_config  # pylint: disable=g-import-not-at-top
  state = safetensors.numpy.load_file(os.path.join(prsl_jax.TINY_CLIP, "model.safetensors"))
  tower = {k: v + 1 for k, v in state.items()
           if k.startswith(("vision_model.", "visual_projection."))
           and not k.endswith("position_ids")}
  path = str(tmp_path / "tower.safetensors")
  safetensors.numpy.save_file(tower, path)
  base = load_pretrained(prsl_jax.TINY_CLIP)
  config = small_config.get_config()
  config.model.vision_weights = path
  _, params, _ = trainer.setup(config).pretrained
  _, evaluated = evaluator.load_model({"kind": "hf", "path": prsl_jax.TINY_CLIP}, False, path)
  for got in (params, evaluated):
    for key in base.params:
      shift = 1 if key in ("vision_model", "visual_projection") else 0
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b + shift, rtol=1e-6),
                   got[key], base.params[key])
