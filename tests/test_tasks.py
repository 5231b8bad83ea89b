"""Tasks are values: a new task is its functions in one Task, registered by name,
and the trainer trains and evaluates it without a line of its own."""

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prsl_jax
from prsl_jax import data
from prsl_jax import evaluation
from prsl_jax import losses
from prsl_jax import tasks
from prsl_jax import trainer
from prsl_jax.models import convert
from tests import small_config

SCALE = 10.0  # the probe's temperature


def probe_logits(model, params, w, images):
  """(B, C): the normalised image embedding against fixed class directions w (D, C)."""
  return SCALE * losses.l2_normalize(model.encode_images(params, images)) @ w


@dataclasses.dataclass(frozen=True)
class Probe:
  """The model under attack, value-hashable as zeroshot.Classifier is."""
  model: Any

  def __call__(self, variables, images):
    return probe_logits(self.model, variables["params"], variables["probe"], images)


def _directions(model, params, num_classes):
  dim = model.encode_images(params, jnp.zeros((1, model.image_size, model.image_size, 3)))
  w = jax.random.normal(jax.random.key(7), (dim.shape[-1], num_classes))
  return w / jnp.linalg.norm(w, axis=0, keepdims=True)


def _head(config, model, params, tokenizer, class_names, templates):
  del config, tokenizer, templates
  return {"probe": _directions(model, params, len(class_names))}


def _logits(params, batch, images, head, *, model, axis_name=None):
  del batch, axis_name
  return probe_logits(model, params, head["probe"], images)


def _evaluate(model, params, tokenizer, source, indices, *, class_names, templates, eps_list,
              suites, norm, seed, batch_size, mesh, options=None):
  del tokenizer, templates, options
  variables = {"params": params, "probe": _directions(model, params, len(class_names))}
  return evaluation.evaluate(Probe(model), variables, source, indices, eps_list=eps_list,
                             suites=suites, norm=norm, seed=seed, batch_size=batch_size,
                             mesh=mesh, progress_bar=False)


# A fourth task: a linear probe on fixed random class directions. Everything
# else (suites, tables, plots, labels) is classification's.
LINEAR_PROBE = dataclasses.replace(
    tasks.TASKS["classification"], name="linear_probe", needs=("encode_images",),
    head=_head, logits=_logits, evaluate=_evaluate, track_accuracy=False)


def test_a_task_registered_by_name_trains_and_evaluates_through_the_trainer(
    tmp_path, monkeypatch):
  monkeypatch.setitem(tasks.TASKS, "linear_probe", LINEAR_PROBE)
  config = small_config.get_config()
  config.update_from_flattened_dict({
      "objective": "linear_probe", "total_steps": 2, "compare_losses": (),
      "export": False, "eval.num_examples": 16, "eval.batch_size": 8,
      "eval.suites": ("pgd-ce",), "eval.steps": 2, "eval.eps": (2 / 255,)})
  out = trainer.run(config, str(tmp_path))
  assert set(out["results"]) == {"start", "prsl fine-tuned"}
  assert "pgd-ce" in out["table"] and out["steps"] == {"prsl": 2}
  # Training went through the probe: its loss was logged at every step.
  with open(tmp_path / "prsl" / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  assert [m["step"] for m in logged] == [1, 2]
  assert all(np.isfinite(m["loss"]) for m in logged)
  # Evaluation went through the probe: its clean accuracy, computed here directly.
  pretrained = prsl_jax.load_pretrained(config.model.path)
  model, params = pretrained.model, pretrained.params
  source, class_names = data.load("digits", config.data.eval_split,
                                  image_size=model.image_size)
  idx = data.eval_indices(len(source), 16, config.eval.seed)
  x = np.stack([source[int(i)]["image"] for i in idx])
  y = np.asarray([source[int(i)]["label"] for i in idx])
  w = _directions(model, params, len(class_names))
  expected = float(np.mean(np.argmax(probe_logits(model, params, w, x), -1) == y))
  start = out["results"]["start"]
  assert start.clean_accuracy == pytest.approx(expected)
  r = start.robust["pgd-ce"][0]
  assert r.robust_accuracy <= start.clean_accuracy and start.checks.passed
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["complete"]


def test_each_model_family_names_its_task_and_fits_by_its_methods():
  clip, captioner = convert.model_class("clip"), convert.model_class("vision-encoder-decoder")
  assert tasks.for_model(clip) is tasks.TASKS["classification"]
  assert tasks.for_model(captioner) is tasks.TASKS["captioning"]
  tasks.check_fits(tasks.get("contrastive"), clip, "a CLIP")
  with pytest.raises(ValueError, match="does not fit a captioner.*fits \\['captioning'\\]"):
    tasks.check_fits(tasks.get("classification"), captioner, "a captioner")
  with pytest.raises(ValueError, match="config.objective must be one of"):
    tasks.get("segmentation")
