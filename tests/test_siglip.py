"""SigLIP: parity with transformers' SiglipModel on random tiny models (with and
without the attention-pooling head), HF export round trip, the sigmoid loss."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from prsl_jax import losses
from prsl_jax import zeroshot
from prsl_jax.models import siglip as siglip_lib
from prsl_jax.models.convert import load_pretrained, save_pretrained
from prsl_jax.models.tokenizer import build_word_tokenizer

WORDS = "a photo of the digit zero one two three four five six seven eight nine"
MAX_LEN = 8
CONFIGS = {
    "head": dict(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, image_size=16, patch_size=4,
                           vision_use_head=True),
        text_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, projection_size=32)),
    "no_head": dict(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=20, patch_size=5,
                           vision_use_head=False, hidden_act="gelu"),
        text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=4, projection_size=16, hidden_act="gelu")),
}
TEXTS = ["a photo of the digit seven", "zero", "nine eight"]


def make_siglip_folder(name, folder, seed=0, max_len=MAX_LEN, words=WORDS):
  """A random tiny transformers SiglipModel (every tensor perturbed), saved with a
  small CLIP-BPE tokenizer; returns the torch model."""
  vocab = build_word_tokenizer([words], folder, model_max_length=max_len)
  cfg = CONFIGS[name]
  text = dict(cfg["text_config"], vocab_size=vocab + 3, max_position_embeddings=max_len,
              pad_token_id=vocab - 1, bos_token_id=vocab - 2, eos_token_id=vocab - 1)
  hf_config = transformers.SiglipConfig(text_config=text, vision_config=cfg["vision_config"])
  torch.manual_seed(seed)
  model = transformers.SiglipModel(hf_config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model


def reference(model, images, ids):
  """(image features, text features, logits_per_image) of transformers' model."""
  x = torch.from_numpy((images - 0.5) / 0.5).permute(0, 3, 1, 2)
  t = torch.from_numpy(ids).long()
  with torch.no_grad():
    if model.config.vision_config.vision_use_head:
      img = model.get_image_features(pixel_values=x).pooler_output
    else:  # no pooled output in transformers: the tokens' mean (our documented choice)
      img = model.vision_model(pixel_values=x).last_hidden_state.mean(1)
    txt = model.get_text_features(input_ids=t).pooler_output
    norm = lambda a: a / a.norm(dim=-1, keepdim=True)
    logits = norm(img) @ norm(txt).T * model.logit_scale.exp() + model.logit_bias
  return img.numpy(), txt.numpy(), logits.numpy()


def ours(pretrained, images, ids):
  model, params, _ = pretrained

  @jax.jit
  def run(params, images, ids):
    txt = model.encode_texts(params, ids)
    return model.encode_images(params, images), txt, zeroshot.logits(model, params, txt, images)
  return tuple(map(np.asarray, run(params, images, ids)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("siglip")
  return {name: (make_siglip_folder(name, str(root / name)), str(root / name))
          for name in CONFIGS}


def _inputs(pretrained, seed=0):
  size = pretrained.model.image_size
  images = np.random.default_rng(seed).uniform(size=(2, size, size, 3)).astype(np.float32)
  ids, _ = zeroshot.tokenize(pretrained.tokenizer, TEXTS, pretrained.model.max_text_length)
  return images, ids


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_transformers_siglip(folders, name):
  ref, folder = folders[name]
  pretrained = load_pretrained(folder)
  assert pretrained.model.kind == "siglip"
  assert pretrained.model.config.vision.use_head == (name == "head")
  images, ids = _inputs(pretrained)
  assert ids.shape == (3, MAX_LEN)
  want = reference(ref, images, ids)
  got = ours(pretrained, images, ids)
  for w, g in zip(want, got):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)
  assert float(pretrained.model.logit_bias(pretrained.params)) == pytest.approx(
      float(ref.logit_bias.detach()))


def test_export_round_trip_through_transformers(folders, tmp_path):
  _, folder = folders["head"]
  pretrained = load_pretrained(folder)
  rng = np.random.default_rng(3)
  tuned = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.02, x.shape).astype(
      np.float32), pretrained.params)
  out = save_pretrained(pretrained.model, tuned, str(tmp_path / "export"),
                        tokenizer=pretrained.tokenizer)
  theirs = transformers.SiglipModel.from_pretrained(out).eval()
  images, ids = _inputs(pretrained, seed=4)
  want = reference(theirs, images, ids)
  got = ours(pretrained._replace(params=tuned), images, ids)
  for w, g in zip(want, got):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)
  again = load_pretrained(out)
  assert again.model == pretrained.model
  jax.tree.map(np.testing.assert_array_equal, again.params, tuned)


def test_sigmoid_loss_matches_formula_in_float64():
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
  scale, bias = 10.0, -3.0
  got = losses.sigmoid_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32),
                            scale, bias)
  n = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  z = scale * n(img) @ n(txt).T + bias
  sign = 2 * np.eye(5) - 1
  want = np.sum(np.log1p(np.exp(-sign * z))) / 5
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Bias moves it: a wrong sign on the diagonal costs more.
  assert float(losses.sigmoid_loss(jnp.asarray(img), jnp.asarray(txt), scale, 3.0)) != \
      pytest.approx(float(got))


def test_sigmoid_loss_over_an_axis_equals_the_whole_batch():
  # vmap with an axis name runs the collectives as shard_map does over devices.
  rng = np.random.default_rng(1)
  img = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  txt = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  whole = losses.sigmoid_loss(img, txt, 5.0, -2.0)
  parts = jax.vmap(lambda i, t: losses.sigmoid_loss(i, t, 5.0, -2.0, axis_name="d"),
                   axis_name="d")(img.reshape(3, 2, 4), txt.reshape(3, 2, 4))
  np.testing.assert_allclose(np.asarray(parts), float(whole), rtol=1e-6)


def test_contrastive_task_and_towers_use_the_models_bias(folders):
  """The contrastive task's logits add the model's logit_bias and its loss is the
  sigmoid loss; the optimizer's towers cover every param key once."""
  from prsl_jax import tasks  # pylint: disable=g-import-not-at-top
  from prsl_jax import training  # pylint: disable=g-import-not-at-top
  _, folder = folders["head"]
  pretrained = load_pretrained(folder)
  model, params = pretrained.model, pretrained.params
  assert tasks.for_model(model) is tasks.TASKS["classification"]
  tasks.check_fits(tasks.get("contrastive"), model, "siglip")
  keys = set(training.trainable_keys(model, "both"))
  assert keys == set(params)
  assert set(training.trainable_keys(model, "vision")) | set(
      training.trainable_keys(model, "text")) == keys
  images, ids = _inputs(pretrained)
  ids = ids[:2]  # one caption per image
  batch = {"image": images, "input_ids": ids, "attention_mask": np.ones_like(ids)}
  task = tasks.get("contrastive")
  logits = task.logits(params, batch, images, {}, model=model)
  _, _, want = reference(folders["head"][0], images, ids)
  np.testing.assert_allclose(np.asarray(logits), want, atol=2e-5, rtol=1e-4)
  got = task.loss(params, batch, images, {}, model=model, loss_fn=None)
  img, txt = model.encode_images(params, images), model.encode_texts(params, ids)
  np.testing.assert_allclose(float(got), float(losses.sigmoid_loss(
      img, txt, model.logit_scale(params), model.logit_bias(params))), rtol=1e-6)
