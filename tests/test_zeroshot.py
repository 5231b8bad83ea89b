"""Zero-shot head (template averaging, logits, composition with attacks) and
CLIP preprocessing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import random_images
from prsl_jax import preprocessing
from prsl_jax import zeroshot

CLASSES = ("zero", "one", "two", "three")
TEMPLATES = ("This is a photo of a {}", "a photo of a {}", "{}")


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_templates():
  assert zeroshot.DEFAULT_TEMPLATES == ("This is a photo of a {}",)
  assert len(zeroshot.IMAGENET_TEMPLATES) == len(set(zeroshot.IMAGENET_TEMPLATES)) == 80
  assert all(t.count("{}") == 1 for t in zeroshot.IMAGENET_TEMPLATES)


def test_tokenize_pads_to_max_text_length(tiny_clip):
  ids, mask = zeroshot.tokenize(tiny_clip.tokenizer, ["This is a photo of a three", "a cat"],
                                tiny_clip.model.max_text_length)
  assert ids.shape == mask.shape == (2, tiny_clip.model.max_text_length)
  assert ids.dtype == mask.dtype == np.int32
  assert mask[0].sum() == 9 and mask[1].sum() == 4  # BOS + words + EOS
  assert (ids[mask == 0] == tiny_clip.tokenizer.pad_token_id).all()


@pytest.fixture(scope="module")
def class_emb(tiny_clip):
  # batch_size=5 splits the 12 prompts into 3 batches, the last one padded.
  return zeroshot.class_embeddings(tiny_clip.model, tiny_clip.params, tiny_clip.tokenizer,
                                   CLASSES, TEMPLATES, batch_size=5)


def test_class_embeddings_average_templates(tiny_clip, class_emb):
  """Equals the manual computation: normalise, mean over templates, renormalise."""
  params = tiny_clip.params
  emb = np.asarray(class_emb)
  assert emb.shape == (len(CLASSES), tiny_clip.model.config.projection_dim)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)

  texts = [t.format(c) for c in CLASSES for t in TEMPLATES]
  ids, mask = zeroshot.tokenize(tiny_clip.tokenizer, texts, tiny_clip.model.max_text_length)
  per_prompt = _unit(np.asarray(jax.jit(tiny_clip.model.encode_texts)(params, ids, mask)))
  manual = _unit(per_prompt.reshape(len(CLASSES), len(TEMPLATES), -1).mean(1))
  np.testing.assert_allclose(emb, manual, atol=1e-6)
  # Averaging is not a no-op here: one template alone gives something else.
  first_template = per_prompt[::len(TEMPLATES)]
  assert np.abs(manual - first_template).max() > 1e-3

  jitted = jax.jit(zeroshot.embed_prompts, static_argnums=(0, 4))
  np.testing.assert_allclose(jitted(tiny_clip.model, params, ids, mask, len(CLASSES)), manual,
                             atol=1e-6)

  # templates=None is DEFAULT_TEMPLATES = TEMPLATES[:1].
  default = zeroshot.class_embeddings(tiny_clip.model, params, tiny_clip.tokenizer, CLASSES)
  np.testing.assert_allclose(default, first_template, atol=1e-6)


def test_bad_arguments_named(tiny_clip):
  with pytest.raises(ValueError, match="templates"):
    zeroshot.class_embeddings(tiny_clip.model, tiny_clip.params, tiny_clip.tokenizer, CLASSES,
                              ["no placeholder"])
  with pytest.raises(ValueError, match="class_names"):
    zeroshot.class_embeddings(tiny_clip.model, tiny_clip.params, tiny_clip.tokenizer, "zero")
  with pytest.raises(ValueError, match="num_classes=5"):
    zeroshot.embed_prompts(tiny_clip.model, tiny_clip.params, np.zeros((12, 16), np.int32),
                           np.ones((12, 16), np.int32), 5)


def test_logits_are_scaled_cosines(tiny_clip, class_emb):
  logits_fn = zeroshot.Classifier(tiny_clip.model).bind(
      {"params": tiny_clip.params, "class_emb": class_emb})
  images = random_images(np.random.default_rng(0), 3, tiny_clip.model.image_size)
  img, got = jax.jit(lambda x: (tiny_clip.model.encode_images(tiny_clip.params, x),
                                logits_fn(x)))(images)
  scale = float(np.exp(tiny_clip.params["logit_scale"]))
  want = scale * _unit(np.asarray(img)) @ np.asarray(class_emb).T
  assert got.shape == (3, len(CLASSES)) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_composes_with_pgd_under_jit(tiny_clip, class_emb):
  from prsl_jax import attacks  # pylint: disable=g-import-not-at-top
  logits_fn = functools.partial(zeroshot.logits, tiny_clip.model, tiny_clip.params, class_emb)
  images = jnp.asarray(random_images(np.random.default_rng(1), 4, tiny_clip.model.image_size))
  eps = 8 / 255

  @jax.jit
  def attack(x, key):
    clean = logits_fn(x)
    labels = jnp.argmax(clean, axis=-1)  # clean predictions as labels
    adv = attacks.pgd(logits_fn, x, labels, key=key, eps=eps, steps=3)
    ce = lambda z: -jax.nn.log_softmax(z)[jnp.arange(z.shape[0]), labels]
    return adv, ce(clean), ce(logits_fn(adv))
  adv, ce_clean, ce_adv = attack(images, jax.random.key(0))
  assert adv.shape == images.shape
  assert float(jnp.max(jnp.abs(adv - images))) <= eps + 1e-6
  assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
  # PGD returns its best iterate: the true-class loss never goes down, and rises.
  assert (ce_adv >= ce_clean - 1e-5).all() and (ce_adv > ce_clean + 1e-4).any()


def test_preprocess_non_square_uint8():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
  out = preprocessing.clip_preprocess(image, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0 and out.max() > 0.5
  # Same resize + crop geometry as transformers' CLIP processor (PIL backend).
  from transformers.models.clip import image_processing_pil_clip  # pylint: disable=g-import-not-at-top
  proc = image_processing_pil_clip.CLIPImageProcessorPil(size={"shortest_edge": 16},
                               crop_size={"height": 16, "width": 16}, do_normalize=False)
  ref = proc(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(out, ref, atol=1 / 255 + 1e-6)
  # Tall images crop the other way.
  assert preprocessing.clip_preprocess(image.transpose(1, 0, 2), 16).shape == (16, 16, 3)


def test_preprocess_float_and_grayscale():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (21, 40, 3), dtype=np.uint8)
  from_uint8 = preprocessing.clip_preprocess(image, 12)
  from_float = preprocessing.clip_preprocess(image / 255.0, 12)
  np.testing.assert_allclose(from_float, from_uint8, atol=2 / 255)
  gray = preprocessing.clip_preprocess(image[..., 0], 12)
  assert gray.shape == (12, 12, 3)
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  with pytest.raises(ValueError, match="shape"):
    preprocessing.clip_preprocess(np.zeros((4, 4, 2), np.uint8), 12)
