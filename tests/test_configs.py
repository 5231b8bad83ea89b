"""Every config file and variant builds, validates, and shrinks the same way.

Config files name their choices at module level (VARIANTS, FLAGS; see
configs/common.py), so every argument a file accepts is enumerated here: each
builds, only sets fields configs/base.py defines, passes trainer.validate with
its dataset's class count, and its ',runlocal' is exactly common.runlocal
applied to the full config. The configs claiming FARE's setting agree on
configs/fare.FIELDS. Bad arguments fail with one line naming the bad part.
"""

import glob
import importlib
import itertools
import math
import os
import re

import pytest

from configs import base
from configs import common
from configs import fare
from prsl_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if re.search(r"^def get_config", open(p).read(), re.M))
COMMON = NAMES
# The classes a loss row ranges over, per dataset (contrastive: the global batch).
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}


def _module(name):
  return importlib.import_module(f"configs.{name}")


def _args(name):
  """Every argument of a config file: each variant alone and with each flag subset."""
  mod = _module(name)
  variants = mod.VARIANTS or ("",)
  subsets = [c for r in range(len(mod.FLAGS) + 1) for c in itertools.combinations(mod.FLAGS, r)]
  return [",".join(p for p in (v, *s) if p) or None for v in variants for s in subsets]


def _flat(d, prefix=""):
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return out


def _get(c, field):
  return _flat(c.to_dict())[field]


CASES = [(n, a) for n in NAMES for a in _args(n)]


def test_every_config_file_is_covered():
  assert {"default", "vitb32_cifar10", "imagenet_tpu_pod", "study_fare_l14"} <= set(NAMES)
  for name in NAMES:
    declared = hasattr(_module(name), "VARIANTS") and hasattr(_module(name), "FLAGS")
    assert declared, f"configs/{name}.py must declare VARIANTS and FLAGS (configs/common.py)"


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" for n, a in CASES])
def test_config_builds_and_validates(name, arg):
  c = _module(name).get_config(arg)
  if c.objective == "contrastive":
    num_classes = c.batch_size
  elif c.objective == "captioning":  # rows are tokens: the decoder's vocabulary
    num_classes = 50257 if c.data.name == "coco_captions" else 363
  else:
    num_classes = NUM_CLASSES[c.data.name]
  trainer.validate(c, num_classes=num_classes)
  assert trainer.eval_suites(c, c.loss)


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" for n, a in CASES])
def test_config_sets_only_fields_of_base(name, arg):
  """A field base.py lacks is read by nothing: a typo or a removed field."""
  c = _module(name).get_config(arg)
  stray = sorted(set(_flat(c.to_dict())) - set(_flat(base.base_config().to_dict())))
  assert not stray, f"configs/{name}.py:{arg} sets fields base.py does not have: {stray}"


@pytest.mark.parametrize("name", COMMON)
def test_loss_k_only_for_our_ablations(name):
  """k and renormalize are read by topk_variance / topk_ce only: others leave them."""
  default = base.base_config().loss
  for arg in _args(name):
    c = _module(name).get_config(arg)
    if not {c.loss.name, *c.compare_losses} & {"topk_variance", "topk_ce"}:
      assert (c.loss.k, c.loss.renormalize) == (default.k, default.renormalize), (name, arg)


@pytest.mark.parametrize("name", [n for n in COMMON if "runlocal" in _module(n).FLAGS])
def test_runlocal_is_common_runlocal_applied_last(name):
  mod = _module(name)
  for arg in _args(name):
    if arg is None or "runlocal" not in arg.split(","):
      continue
    full = mod.get_config(",".join(p for p in arg.split(",") if p != "runlocal") or None)
    local = mod.get_config(arg)
    assert local.to_dict() == common.runlocal(full.copy_and_resolve_references()).to_dict()
    for field, value in common.RUNLOCAL.items():
      assert _get(local, field) == value, (name, arg, field)
    assert local.adversarial.steps == min(full.adversarial.steps, common.RUNLOCAL_MAX_ADV_STEPS)


def test_runlocal_shrinks_a_full_scale_config():
  c = common.runlocal(_module("imagenet_tpu_pod").get_config("adv_prsl"))
  assert (c.batch_size, c.total_steps, c.eval.num_examples, c.adversarial.steps) == (8, 4, 16, 2)
  assert c.optimizer.warmup_steps < c.total_steps
  # The real setting is kept: model, data, budgets, loss.
  assert (c.model.path, c.data.name, c.adversarial.eps) == (
      "openai/clip-vit-large-patch14", "imagenet2012", 2 / 255)


@pytest.mark.parametrize("flag,eps", [("", 2 / 255), (",eps4", 4 / 255)])
def test_imagenet_tpu_pod_is_fares_protocol(flag, eps):
  want = fare.apply(base.base_config(), eps=eps)
  for variant in _module("imagenet_tpu_pod").VARIANTS:
    c = _module("imagenet_tpu_pod").get_config(variant + flag)
    for field in fare.FIELDS:
      assert _get(c, field) == _get(want, field), (variant + flag, field)
  assert (want.batch_size, want.optimizer.warmup_steps, want.total_steps) == (128, 1400, 20_000)
  assert (want.adversarial.steps, want.adversarial.step_size) == (10, 1 / 255)


@pytest.mark.parametrize("flag", ["", ",eps4"])
def test_fare_study_agrees_with_imagenet_tpu_pod(flag):
  pod = _module("imagenet_tpu_pod").get_config("adv_prsl" + flag)
  study = _module("study_fare_l14").get_config("adv_prsl_0_4_b1e-1" + flag)
  differ = [f for f in fare.FIELDS if _get(pod, f) != _get(study, f)]
  assert not differ, f"FARE fields that differ: {differ}"


def test_fare_refuses_other_budgets():
  with pytest.raises(ValueError, match=r"eps 2/255 or 4/255, got eps=0\.0117"):
    fare.apply(base.base_config(), eps=3 / 255)


def _error(fn, arg):
  with pytest.raises(ValueError) as info:
    fn(arg)
  text = str(info.value)
  assert "\n" not in text
  return text


@pytest.mark.parametrize("name", COMMON)
def test_bad_arguments_are_named(name):
  mod = _module(name)
  if mod.VARIANTS:
    text = _error(mod.get_config, "nope")
    assert "variant 'nope'" in text and repr(list(mod.VARIANTS)) in text
    text = _error(mod.get_config, f"{mod.VARIANTS[-1]},runlocal,bogus")
    assert "flag 'bogus'" in text and repr(list(mod.FLAGS)) in text
  else:
    text = _error(mod.get_config, "nope")
    assert "flag 'nope'" in text and repr(list(mod.FLAGS)) in text


def test_parse_arg():
  assert common.parse_arg(None, variants=("a", "b")) == ("a", set())
  assert common.parse_arg("b, runlocal", variants=("a", "b")) == ("b", {"runlocal"})
  assert common.parse_arg("runlocal", variants=("a", "b")) == ("a", {"runlocal"})
  assert common.parse_arg("", variants=()) == (None, set())
  assert common.parse_arg("runlocal", variants=()) == (None, {"runlocal"})


@pytest.mark.parametrize("name", COMMON)
def test_docstring_launch_commands_build(name):
  """The docstring's `--config configs/NAME.py[:ARG]` and --config.FIELD overrides exist."""
  mod = _module(name)
  doc = mod.__doc__
  commands = re.findall(rf"--config configs/{name}\.py(?::(\S+))?", doc)
  assert commands, f"configs/{name}.py's docstring has no launch command"
  fields = set(_flat(base.base_config().to_dict()))
  for arg in commands:
    mod.get_config(arg or None)
  for field in re.findall(r"--config\.([\w.]+)=", doc):
    assert field in fields, f"configs/{name}.py's docstring overrides unknown {field!r}"


# A stand-in for TFDS coco_captions (whose builder needs tensorflow and a
# download): the same record layout (image, image/id, captions {text, id}).
_COCO_LIKE = '''
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

class PrslTestCoco(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "image/id": np.int64,
        "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64}),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(16, 0), "val": self._generate_examples(8, 100)}

  def _generate_examples(self, n, offset):
    rng = np.random.default_rng(offset)
    for i in range(n):
      pixels = rng.integers(0, 256, (20 + i % 3, 24, 3), dtype=np.uint8)
      word = WORDS[i % 10]
      yield i, {"image": Image.fromarray(pixels), "image/id": offset + i,
                "captions": [{"text": f"a handwritten {word}", "id": 2 * i},
                             {"text": f"the digit {word}", "id": 2 * i + 1}]}
'''


@pytest.mark.heavy(80)
def test_coco_vitgpt2_runlocal_trains_and_evaluates_on_coco_shaped_tfds(tmp_path, monkeypatch):
  # The authors' ViT-GPT2 recipe (configs/coco_vitgpt2.py) end to end on tiny
  # shapes: PRSL over token rows in groups of 8 captions, a TFDS dataset with
  # coco_captions' layout prepared as ArrayRecord, the bundled tiny captioner.
  import json  # pylint: disable=g-import-not-at-top
  import prsl_jax  # pylint: disable=g-import-not-at-top
  from configs import coco_vitgpt2  # pylint: disable=g-import-not-at-top
  from prsl_jax import data  # pylint: disable=g-import-not-at-top
  (tmp_path / "prsl_test_coco.py").write_text(_COCO_LIKE)
  monkeypatch.syspath_prepend(str(tmp_path))
  import prsl_test_coco  # pylint: disable=g-import-not-at-top,unused-import  # registers it
  monkeypatch.setitem(data._TFDS_KEYS, "prsl_test_coco", data._TFDS_KEYS["coco_captions"])  # pylint: disable=protected-access
  data_dir = str(tmp_path / "tfds")
  data.prepare("prsl_test_coco", data_dir=data_dir)
  c = coco_vitgpt2.get_config("prsl_0_4,runlocal")
  assert c.loss.name == "prsl" and c.loss.weight == 1e-5 and c.train_towers == "both"
  assert c.loss.group_size == coco_vitgpt2.PER_GPU * c.data.caption_length
  c.model.path = prsl_jax.TINY_CAPTIONER  # 16 positions: captions of 12 tokens
  c.data.name, c.data.data_dir, c.data.caption_length = "prsl_test_coco", data_dir, 12
  c.loss.group_size = coco_vitgpt2.PER_GPU * 12
  c.eval.num_examples, c.eval.eps, c.eval_every = 8, (4 / 255,), 0
  out = trainer.run(c, str(tmp_path / "run"))
  assert out["steps"] == {"prsl": c.total_steps}
  with open(tmp_path / "run" / "prsl" / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  assert logged[-1]["step"] == c.total_steps and all(
      math.isfinite(m["loss"]) for m in logged if "loss" in m)
  with open(tmp_path / "run" / "results.json") as f:
    record = json.load(f)
  assert record["complete"] and "prsl fine-tuned" in json.dumps(record)
