"""Our flax CLIP against transformers' PyTorch CLIPModel on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.conftest import MAX_LEN, TINY_CONFIGS, random_images, random_text_batch
from prsl_jax.models import clip as clip_lib
from prsl_jax.models.convert import load_pretrained

TOL = dict(atol=1e-5, rtol=1e-5)


def _pixel_values(images, ckpt):
  """HF's input for our [0, 1] NHWC images: (x - mean) / std, NCHW."""
  x = (images - np.float32(ckpt.mean)) / np.float32(ckpt.std)
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _reference(path, images_pt, ids, mask):
  hf = transformers.CLIPModel.from_pretrained(path).eval()
  ids_pt, mask_pt = torch.from_numpy(ids), torch.from_numpy(mask)
  with torch.no_grad():
    img = hf.get_image_features(pixel_values=images_pt).pooler_output.numpy()
    txt = hf.get_text_features(input_ids=ids_pt, attention_mask=mask_pt).pooler_output.numpy()
    out = hf(input_ids=ids_pt, pixel_values=images_pt, attention_mask=mask_pt)
  return img, txt, out


def _forward(pretrained, images, ids, mask):
  """Ours, one jit (compiling once is most of a tiny model's cost on CPU)."""
  model = pretrained.model
  @jax.jit
  def f(params):
    return (model.encode_images(params, images), model.encode_texts(params, ids, mask),
            model.module.apply({"params": params}, images, ids, mask))
  return f(pretrained.params)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_matches_transformers(hf_checkpoints, name):
  ckpt = hf_checkpoints(name)
  clip = load_pretrained(ckpt.path)
  rng = np.random.default_rng(1)
  images = random_images(rng, 3, clip.model.image_size)
  ids, mask = random_text_batch(rng, ckpt)
  # Real captions through the checkpoint's own tokenizer, right-padded.
  tok = clip.tokenizer(["this is a photo of a three", "a cat", "dog"],
                       padding="max_length", max_length=MAX_LEN, return_tensors="np")
  ids = np.concatenate([ids, tok["input_ids"].astype(np.int64)])
  mask = np.concatenate([mask, tok["attention_mask"].astype(np.int64)])

  # The inputs must exercise what they test: argmax(ids) and the first EOS
  # disagree on some row, and some row has padding.
  first_eos = np.argmax(ids == ckpt.tokenizer_size - 1, axis=-1)
  assert (np.argmax(ids, axis=-1) != first_eos).any()
  assert (mask == 0).any()

  ref_img, ref_txt, ref = _reference(ckpt.path, _pixel_values(images, ckpt), ids, mask)
  img, txt, out = _forward(clip, images, ids, mask)
  np.testing.assert_allclose(img, ref_img, **TOL)
  np.testing.assert_allclose(txt, ref_txt, **TOL)
  np.testing.assert_allclose(out["logits_per_image"], ref.logits_per_image.numpy(), **TOL)
  np.testing.assert_allclose(out["logits_per_text"], ref.logits_per_text.numpy(), **TOL)
  np.testing.assert_allclose(out["image_embeds"], ref.image_embeds.numpy(), **TOL)
  np.testing.assert_allclose(out["text_embeds"], ref.text_embeds.numpy(), **TOL)


def test_padding_mask_changes_pooled_feature(tiny_clip, tiny_ckpt):
  # Guards the parity test: the masked hole in its last row matters.
  ids, mask = random_text_batch(np.random.default_rng(2), tiny_ckpt)
  encode = jax.jit(tiny_clip.model.encode_texts)
  with_mask = encode(tiny_clip.params, ids, mask)
  without = encode(tiny_clip.params, ids, np.ones_like(mask))
  assert np.abs(with_mask[-1] - without[-1]).max() > 1e-3
  # Right padding comes after EOS, which the causal mask already hides.
  np.testing.assert_allclose(with_mask[:-1], without[:-1], atol=1e-6)


def test_param_tree_layout(tiny_clip):
  params = tiny_clip.params
  assert set(params) == {"vision_model", "text_model", "visual_projection",
                         "text_projection", "logit_scale"}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  v = TINY_CONFIGS["quick_gelu"]["vision"]
  p, d = v["patch_size"], v["hidden_size"]
  emb = params["vision_model"]["embeddings"]
  assert emb["patch_embedding"]["kernel"].shape == (p, p, 3, d)
  assert emb["position_embedding"]["embedding"].shape == ((v["image_size"] // p) ** 2 + 1, d)
  assert params["visual_projection"]["kernel"].shape == (d, 16)
  assert sorted(params["text_model"]["encoder"]) == ["layers_0", "layers_1"]
  assert params["logit_scale"].shape == ()


def test_pixel_statistics(hf_checkpoints, tiny_clip):
  assert tiny_clip.model.config.vision.image_mean == TINY_CONFIGS["quick_gelu"]["mean"]
  assert tiny_clip.model.config.vision.image_std == TINY_CONFIGS["quick_gelu"]["std"]
  legacy = load_pretrained(hf_checkpoints("gelu_legacy_eos").path)  # no preprocessor_config
  assert legacy.model.config.vision.image_mean == clip_lib.OPENAI_CLIP_MEAN
  assert legacy.model.config.vision.image_std == clip_lib.OPENAI_CLIP_STD


def test_bfloat16_compute_close_to_float32(tiny_ckpt, tiny_clip):
  bf = load_pretrained(tiny_ckpt.path, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf.params))
  rng = np.random.default_rng(3)
  images = random_images(rng, 4, bf.model.image_size)
  ids, mask = random_text_batch(rng, tiny_ckpt)
  encode = lambda c: jax.jit(lambda p: (c.model.encode_images(p, images),
                                        c.model.encode_texts(p, ids, mask)))(c.params)
  for f32, b16 in zip(encode(tiny_clip), encode(bf)):
    assert b16.dtype == jnp.float32  # outputs (hence logits, attack grads) in float32
    assert not np.array_equal(f32, b16)  # the bf16 path really ran
    f32, b16 = np.asarray(f32), np.asarray(b16)
    cos = (f32 * b16).sum(-1) / np.linalg.norm(f32, axis=-1) / np.linalg.norm(b16, axis=-1)
    assert cos.min() > 0.99, cos


def test_remat_same_values_and_grads(hf_checkpoints):
  # The config with a 1-layer vision tower: grad compiles dominate this test.
  path = hf_checkpoints("gelu_new").path
  plain, remat = load_pretrained(path), load_pretrained(path, remat=True)
  assert remat.model.config.remat and not plain.model.config.remat
  assert plain.model != remat.model and hash(plain.model) != hash(remat.model)
  images = random_images(np.random.default_rng(4), 2, plain.model.image_size)

  def grads(clip):
    loss = lambda p, x: jnp.sum(clip.model.encode_images(p, x)[:, :4] ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(clip.params, images)
  (gp0, gx0), (gp1, gx1) = grads(plain), grads(remat)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), gp0, gp1)
  np.testing.assert_allclose(gx0, gx1, atol=1e-5, rtol=1e-5)
  # Input gradients (what attacks use) are finite and non-zero.
  assert gx0.shape == images.shape and np.isfinite(gx0).all() and np.abs(gx0).max() > 0


def test_shape_errors_name_the_argument(tiny_clip):
  with pytest.raises(ValueError, match=r"images must have shape \(B, 16, 16, 3\)"):
    tiny_clip.model.encode_images(tiny_clip.params, np.zeros((1, 3, 16, 16), np.float32))
  with pytest.raises(ValueError, match="max_position_embeddings=16"):
    tiny_clip.model.encode_texts(tiny_clip.params, np.zeros((1, 17), np.int32))


def test_config_from_hf_rejects_unknown_activation():
  hf = transformers.CLIPConfig(vision_config=dict(hidden_act="relu6"))
  with pytest.raises(ValueError, match="vision_config.hidden_act='relu6'"):
    clip_lib.config_from_hf(hf)


def test_static_model_is_equal_by_value_and_holds_no_params(tiny_ckpt, tiny_clip):
  again = load_pretrained(tiny_ckpt.path)
  assert again.model == tiny_clip.model and hash(again.model) == hash(tiny_clip.model)
  assert again.model is not tiny_clip.model
  leaves = jax.tree.leaves(again.model)  # a dataclass of static config only
  assert not any(hasattr(x, "shape") and getattr(x, "size", 0) > 1 for x in leaves)
  # A jitted function with the model static compiles once for both checkpoints.
  f = jax.jit(lambda m, p, x: m.encode_images(p, x), static_argnums=0)
  x = np.zeros((1, 16, 16, 3), np.float32)
  f(tiny_clip.model, tiny_clip.params, x)
  f(again.model, again.params, x)
  assert f._cache_size() == 1  # pylint: disable=protected-access
