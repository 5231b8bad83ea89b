"""Our flax BLIP-2 (OPT) against transformers' PyTorch
Blip2ForConditionalGeneration on the same (tiny, random, perturbed) weights:
teacher-forced logits, pixel gradients, greedy and beam-search generation with
a cache (captioning and a VQA prompt), HF export and import, and the token
loss labels.

The configs differ in what a port can get wrong: OPT pre-LN / post-LN,
word_embed_proj_dim != hidden_size (project_in/out), Q-Former
cross-attention in every layer / every second layer, vision qkv biases on /
off, tied / untied LM head, OPT biases off, the final LayerNorm removed.
Each checkpoint is built once per module. Its EOS id is chosen from what the
model generates on the test images (without an EOS), so that some captions end
early and some run to max_new_tokens. (Random tiny decoders tend to repeat one
token forever; the seeds and weight scales are ones whose outputs vary.)
"""

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from prsl_jax import captioning
from prsl_jax import losses
from prsl_jax import tasks
from prsl_jax.models import blip2
from prsl_jax.models import blip2_generation as gen
from prsl_jax.models.convert import load_pretrained, save_pretrained

# One worker runs this file (its checkpoints and compilations are shared);
# the seconds (per test, on 2 busy cores) schedule it early.
pytestmark = pytest.mark.heavy(15, alone=False)

TOL = dict(atol=2e-5, rtol=0)
N_IMAGES = 3
VOCAB = 48
IMAGE_TOKEN = VOCAB - 1
MAX_NEW = 6
NUM_BEAMS = 3
QUESTION = [5, 9, 13, 7]  # stands for "Question: ... Answer:" tokens

CONFIGS = {
    # Pre-LN OPT, equal widths, tied head, cross-attention in every Q-Former
    # layer, vision qkv biases, custom pixel statistics.
    "preln_tied_x1": dict(
        vision=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                    num_attention_heads=2, image_size=16, patch_size=4, qkv_bias=True),
        qformer=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, cross_attention_frequency=1),
        text=dict(hidden_size=32, num_hidden_layers=2, ffn_dim=40, num_attention_heads=4,
                  do_layer_norm_before=True, tie_word_embeddings=True),
        queries=4, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28), seed=2, scale=0.3),
    # Post-LN OPT (350m-style) with word_embed_proj_dim < hidden_size, untied
    # head, no OPT biases, cross-attention every second layer (3 layers),
    # no vision qkv biases, gelu_new vision MLP.
    "postln_proj_untied_x2": dict(
        vision=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                    num_attention_heads=2, image_size=12, patch_size=6, qkv_bias=False,
                    hidden_act="gelu_new"),
        qformer=dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=3,
                     intermediate_size=32, cross_attention_frequency=2),
        text=dict(hidden_size=32, num_hidden_layers=2, ffn_dim=24, num_attention_heads=2,
                  do_layer_norm_before=False, word_embed_proj_dim=16,
                  tie_word_embeddings=False, enable_bias=False),
        queries=3, mean=None, std=None, seed=1, scale=0.1),
    # Pre-LN without the final LayerNorm, word_embed_proj_dim < hidden_size
    # with a tied head, cross-attention every second layer (2 layers).
    "preln_nofinal_proj_tied_x2": dict(
        vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=4, image_size=8, patch_size=4, qkv_bias=True),
        qformer=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=16, cross_attention_frequency=2),
        text=dict(hidden_size=24, num_hidden_layers=1, ffn_dim=32, num_attention_heads=3,
                  do_layer_norm_before=True, _remove_final_layer_norm=True,
                  word_embed_proj_dim=12, tie_word_embeddings=True),
        queries=2, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed=1, scale=0.3),
}


@dataclasses.dataclass
class Ckpt:
  name: str
  path: str
  hf: Any = None  # the PyTorch Blip2ForConditionalGeneration (eval)
  images: np.ndarray = None  # (N_IMAGES, H, W, 3) in [0, 1]
  mean: tuple = None
  std: tuple = None


def _pixel_values(images, mean, std):
  """transformers' input for our [0, 1] NHWC images: (x - mean) / std, NCHW."""
  x = (images - np.float32(mean)) / np.float32(std)
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _build(name, path):
  spec = CONFIGS[name]
  text = transformers.OPTConfig(vocab_size=VOCAB, max_position_embeddings=32,
                                bos_token_id=2, eos_token_id=None, pad_token_id=1,
                                **spec["text"])
  config = transformers.Blip2Config(
      vision_config=spec["vision"], qformer_config=spec["qformer"],
      text_config=text.to_dict(), num_query_tokens=spec["queries"],
      image_token_index=IMAGE_TOKEN,
      tie_word_embeddings=spec["text"]["tie_word_embeddings"])
  torch.manual_seed(spec["seed"])
  hf = transformers.Blip2ForConditionalGeneration(config).eval()
  d = spec["vision"]["hidden_size"]
  with torch.no_grad():
    for pname, p in hf.named_parameters():  # LayerNorms off 1/0, biases off 0
      p.add_(spec["scale"] * torch.randn_like(p))
      if pname.endswith("self_attn.qkv.bias"):
        p[d:2 * d] = 0  # BLIP-2's k bias is zero
  size = spec["vision"]["image_size"]
  images = np.random.default_rng(spec["seed"]).uniform(
      0, 1, (N_IMAGES, size, size, 3)).astype(np.float32)
  mean = spec["mean"] or blip2.BLIP_MEAN
  std = spec["std"] or blip2.BLIP_STD
  ckpt = Ckpt(name, path, hf, images, tuple(mean), tuple(std))
  eos = _pick_eos(ckpt)
  hf.config.text_config.eos_token_id = eos
  hf.generation_config.eos_token_id = hf.language_model.generation_config.eos_token_id = eos
  hf.save_pretrained(path)
  if spec["mean"] is not None:
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
      json.dump({"image_processor_type": "BlipImageProcessor",
                 "image_mean": list(mean), "image_std": list(std)}, f)
  return ckpt


def _vqa_prompt(model):
  """A batch of "Question: ... Answer:"-like prompts, the second row shorter
  and padded on the left (as generation needs): (ids, mask) int64."""
  head = model.prompt_ids(batch_size=1)[0].tolist()
  pad = model.config.text.pad_token_id
  rows = [head + QUESTION, [pad] + head + QUESTION[1:]] + [head + QUESTION] * (N_IMAGES - 2)
  ids = np.asarray(rows, np.int64)
  mask = np.ones_like(ids)
  mask[1, 0] = 0
  return ids, mask


def _hf_generate(ckpt, ids=None, mask=None, **kw):
  """transformers' generate: (B, P + n) with the prompt (P tokens) first."""
  kwargs = dict(pixel_values=_pixel_values(ckpt.images, ckpt.mean, ckpt.std),
                do_sample=False, max_new_tokens=MAX_NEW, **kw)
  if ids is not None:
    kwargs.update(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  with torch.no_grad():
    return ckpt.hf.generate(**kwargs).numpy()


def _pick_eos(ckpt):
  """An EOS id for a model that has none yet: a token that ends some greedy
  captions early but not all (exercises EOS, filling and the early exit)."""
  out = _hf_generate(ckpt)[:, -MAX_NEW:]

  def first(row, t):
    hit = np.flatnonzero(row == t)
    return int(hit[0]) if hit.size else MAX_NEW

  def key(t):
    ends = [first(r, t) for r in out]
    return (MAX_NEW in ends and min(ends) < MAX_NEW, len(set(ends)), -t)
  candidates = sorted(set(out.ravel().tolist()) - {1, 2, IMAGE_TOKEN}, key=key, reverse=True)
  return candidates[0]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """Lazily built {name: Ckpt}; each checkpoint written once a module."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = _build(name, str(tmp_path_factory.mktemp(f"blip2_{name}")))
    return cache[name]
  return get


@functools.lru_cache(maxsize=None)
def _load(path):
  return load_pretrained(path)


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, images, ids, mask):
  return model.logits(params, images, ids, mask)


def _batch(model, seed=0, t=7):
  """(ids, mask) (N_IMAGES, Q + 1 + t): image tokens, bos, random tokens; the
  second row right-padded after 2 tokens. (t = len(QUESTION) + 3: every
  teacher-forced batch of a config has one shape, so one compilation.)"""
  rng = np.random.default_rng(seed)
  ids = np.concatenate([model.prompt_ids(batch_size=N_IMAGES),
                        rng.integers(3, VOCAB - 1, (N_IMAGES, t))], axis=1)
  mask = np.ones_like(ids)
  mask[1, -(t - 2):] = 0
  return ids.astype(np.int64), mask.astype(np.int64)


def _hf_logits(ckpt, images, ids, mask):
  with torch.no_grad():
    return ckpt.hf(pixel_values=_pixel_values(images, ckpt.mean, ckpt.std),
                   input_ids=torch.from_numpy(ids),
                   attention_mask=torch.from_numpy(mask)).logits.numpy()


# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(ckpts, name):
  ckpt = ckpts(name)
  pre = _load(ckpt.path)
  model, params = pre.model, pre.params
  c, spec = model.config, CONFIGS[name]
  assert c.text.do_layer_norm_before == spec["text"]["do_layer_norm_before"]
  assert c.text.has_projections == ("word_embed_proj_dim" in spec["text"])
  assert ("lm_head" in params["language_model"]) == (not spec["text"]["tie_word_embeddings"])
  assert ("final_layer_norm" in params["language_model"]) == c.text.has_final_layer_norm
  assert (c.vision.image_mean, c.vision.image_std) == (ckpt.mean, ckpt.std)
  freq = spec["qformer"]["cross_attention_frequency"]
  for i in range(spec["qformer"]["num_hidden_layers"]):
    assert ("crossattention" in params["qformer"][f"layer_{i}"]) == (i % freq == 0)

  ids, mask = _batch(model)
  ref = _hf_logits(ckpt, ckpt.images, ids, mask)
  ours = np.asarray(_logits(model, params, ckpt.images, ids, mask))
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, **TOL)
  # The image matters (guards the placeholder scatter) ...
  other = np.asarray(_logits(model, params, ckpt.images[::-1].copy(), ids, mask))
  assert np.abs(other[0] - ours[0]).max() > 1e-3
  # ... and so does the padding mask.
  unmasked = np.asarray(_logits(model, params, ckpt.images, ids, np.ones_like(mask)))
  assert np.abs(unmasked[1, -1] - ours[1, -1]).max() > 1e-3


def test_pixel_gradient_matches_torch(ckpts):
  # What attacks use: d(scalar of the logits)/d(pixels in [0, 1]), here
  # through rematerialised vision and OPT layers.
  ckpt = ckpts("postln_proj_untied_x2")
  pre = load_pretrained(ckpt.path, remat=True)
  model, params = pre.model, pre.params
  assert model.config.remat
  ids, mask = _batch(model, seed=3)
  labels = np.roll(ids, -1, axis=1)

  def loss(images):
    logp = jax.nn.log_softmax(model.logits(params, images, ids, mask))
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))
  value, grad = jax.jit(jax.value_and_grad(loss))(ckpt.images)

  pv = _pixel_values(ckpt.images, ckpt.mean, ckpt.std).requires_grad_()
  logits = ckpt.hf(pixel_values=pv, input_ids=torch.from_numpy(ids),
                   attention_mask=torch.from_numpy(mask)).logits
  ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          torch.from_numpy(labels).reshape(-1))
  ref.backward()
  ref_grad = pv.grad.numpy().transpose(0, 2, 3, 1) / np.float32(ckpt.std)
  np.testing.assert_allclose(value, ref.item(), atol=1e-5, rtol=0)
  scale = np.abs(ref_grad).max()
  assert scale > 0
  np.testing.assert_allclose(grad, ref_grad, atol=1e-4 * scale, rtol=0)


def test_bfloat16_keeps_qformer_float32(ckpts):
  ckpt = ckpts("preln_tied_x1")
  bf16 = load_pretrained(ckpt.path, dtype=jnp.bfloat16)
  f32 = _load(ckpt.path)
  jax.tree.map(np.testing.assert_array_equal, bf16.params, f32.params)  # params stay float32
  ids, mask = _batch(bf16.model)
  logits = jax.eval_shape(bf16.model.logits, bf16.params, ckpt.images, ids, mask)
  assert logits.dtype == jnp.float32
  # The query tokens and the Q-Former compute in float32 whatever the compute
  # dtype (as transformers keeps them); the vision model does not. Shapes and
  # dtypes only: no FLOPs.
  module = bf16.model.module
  _, inter = jax.eval_shape(
      lambda p: module.apply({"params": p}, ckpt.images, method=blip2.Blip2Module.encode,
                             capture_intermediates=True), bf16.params)
  qf = {x.dtype for x in jax.tree.leaves(inter["intermediates"]["qformer"])}
  assert qf == {jnp.dtype(jnp.float32)}
  vis = {x.dtype for x in jax.tree.leaves(inter["intermediates"]["vision_model"])}
  assert vis == {jnp.dtype(jnp.bfloat16)}
  lm = jax.eval_shape(lambda p: bf16.model.prefill(p, ckpt.images, ids, mask,
                                                   max_new_tokens=2), bf16.params)
  assert lm[0].dtype == jnp.float32 and lm[1]["k"].dtype == jnp.bfloat16


def _assert_generated(ours, ref, prompt_len, fill):
  """transformers returns the prompt, then the tokens, cropped at its longest
  sequence; ours is the (B, MAX_NEW) tokens."""
  ref = ref[:, prompt_len:]
  assert ours.shape == (ref.shape[0], MAX_NEW) and ours.dtype == np.int32
  np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
  assert (ours[:, ref.shape[1]:] == fill).all()


# Each config generates greedily and by beam search, captioning and VQA
# between them.
@pytest.mark.parametrize("name,prompt", [
    ("preln_tied_x1", "caption"),
    ("postln_proj_untied_x2", "vqa"),
    ("preln_nofinal_proj_tied_x2", "vqa"),
])
def test_greedy_matches_transformers(ckpts, name, prompt):
  ckpt = ckpts(name)
  pre = _load(ckpt.path)
  model, params = pre.model, pre.params
  ids, mask = _vqa_prompt(model) if prompt == "vqa" else (None, None)
  ref = _hf_generate(ckpt, ids, mask, num_beams=1)
  ours = np.asarray(gen.greedy(model, params, ckpt.images, ids, mask, max_new_tokens=MAX_NEW))
  plen = (ids.shape[1] if ids is not None else model.num_query_tokens + 1)
  _assert_generated(ours, ref, plen, model.pad_token_id)
  if prompt == "caption":  # the picked EOS ends some captions early, not all
    eos = model.eos_token_id
    assert eos is not None and (ours == eos).any() and not (ours == eos).any(axis=1).all()
    # Compiled once per shape: other params and an equal-by-value model (a
    # fresh load) hit the same compilation.
    size = gen._greedy._cache_size()  # pylint: disable=protected-access
    other = jax.device_put(jax.tree.map(lambda x: np.asarray(x) * 0.5, params))
    twin = load_pretrained(ckpt.path).model
    assert twin == model and twin is not model
    again = gen.greedy(twin, other, ckpt.images, max_new_tokens=MAX_NEW)
    assert gen._greedy._cache_size() == size  # pylint: disable=protected-access
    assert (np.asarray(again) != ours).any()  # the params did change


@pytest.mark.parametrize("name,prompt,kw", [
    ("preln_tied_x1", "vqa", dict(length_penalty=0.5, early_stopping=True)),
    ("postln_proj_untied_x2", "caption", {}),
    ("preln_nofinal_proj_tied_x2", "caption", dict(early_stopping="never")),
])
def test_beam_search_matches_transformers(ckpts, name, prompt, kw):
  ckpt = ckpts(name)
  pre = _load(ckpt.path)
  model, params = pre.model, pre.params
  ids, mask = _vqa_prompt(model) if prompt == "vqa" else (None, None)
  ref = _hf_generate(ckpt, ids, mask, num_beams=NUM_BEAMS, **kw)
  ours = np.asarray(gen.beam_search(model, params, ckpt.images, ids, mask,
                                    max_new_tokens=MAX_NEW, num_beams=NUM_BEAMS, **kw))
  plen = ids.shape[1] if ids is not None else model.num_query_tokens + 1
  _assert_generated(ours, ref, plen, model.pad_token_id)


@pytest.mark.parametrize("name", ["preln_tied_x1", "postln_proj_untied_x2"])
def test_export_round_trip(ckpts, name, tmp_path):
  # Fine-tuned-like params (every leaf moved) -> HF folder -> transformers
  # loads it (no missing or unexpected keys) with logits equal to ours; our
  # loader reads back the same params and config.
  ckpt = ckpts(name)
  pre = _load(ckpt.path)
  model = pre.model
  rng = np.random.default_rng(7)  # numpy: no per-shape compilations
  params = jax.tree.map(lambda x: np.asarray(x) + np.float32(0.01) * rng.standard_normal(
      x.shape, np.float32), pre.params)
  out = save_pretrained(model, params, str(tmp_path / "export"))
  hf, info = transformers.Blip2ForConditionalGeneration.from_pretrained(
      out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  hf.eval()
  state = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
  d = model.config.vision.hidden_size
  qkv = [k for k in state if k.endswith("self_attn.qkv.bias")]
  assert len(qkv) == (model.config.vision.num_hidden_layers if model.config.vision.qkv_bias
                      else 0)
  for k in qkv:
    assert not state[k][d:2 * d].any() and state[k][:d].any()
  with open(os.path.join(out, "preprocessor_config.json")) as f:
    pre_cfg = json.load(f)
  assert (tuple(pre_cfg["image_mean"]), tuple(pre_cfg["image_std"])) == (ckpt.mean, ckpt.std)

  ids, mask = _batch(model, seed=9)
  ours = np.asarray(_logits(model, params, ckpt.images, ids, mask))
  exported = Ckpt(name, out, hf, ckpt.images, ckpt.mean, ckpt.std)
  np.testing.assert_allclose(ours, _hf_logits(exported, ckpt.images, ids, mask), **TOL)
  back = load_pretrained(out)
  assert back.model == model
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0, rtol=0), back.params,
               params)


def test_pickle_refused_unless_allowed_and_k_bias_refused(ckpts, tmp_path):
  ckpt = ckpts("preln_tied_x1")
  folder = tmp_path / "pickle"
  folder.mkdir()
  ckpt.hf.config.save_pretrained(folder)
  torch.save(ckpt.hf.state_dict(), folder / "pytorch_model.bin")
  with pytest.raises(ValueError, match="pickle"):
    load_pretrained(str(folder))
  loaded = load_pretrained(str(folder), allow_pickle=True)
  jax.tree.map(np.testing.assert_array_equal, loaded.params, _load(ckpt.path).params)

  # A non-zero key bias (transformers 5 trains one) cannot be represented.
  bad = tmp_path / "kbias"
  bad.mkdir()
  ckpt.hf.config.save_pretrained(bad)
  state = safetensors.numpy.load_file(os.path.join(ckpt.path, "model.safetensors"))
  name = "vision_model.encoder.layers.0.self_attn.qkv.bias"
  d = ckpt.hf.config.vision_config.hidden_size
  state[name] = state[name].copy()
  state[name][d] = 0.5
  safetensors.numpy.save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match="non-zero key bias"):
    load_pretrained(str(bad))


def test_bad_inputs_name_the_problem(ckpts):
  ckpt = ckpts("preln_tied_x1")
  pre = _load(ckpt.path)
  model, params = pre.model, pre.params
  ids, mask = _batch(model)
  with pytest.raises(ValueError, match="placeholders"):
    model.logits(params, ckpt.images, ids[:, 1:], mask[:, 1:])
  with pytest.raises(ValueError, match="attention_mask shape"):
    model.logits(params, ckpt.images, ids, mask[:, 1:])
  with pytest.raises(ValueError, match="images must have shape"):
    model.logits(params, ckpt.images[:, :4], ids, mask)
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.greedy(model, params, ckpt.images, max_new_tokens=0)
  with pytest.raises(ValueError, match="num_beams"):
    gen.beam_search(model, params, ckpt.images, max_new_tokens=2, num_beams=0)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    gen.greedy(model, params, ckpt.images, max_new_tokens=40)
  hf = ckpt.hf.config.to_dict()
  with pytest.raises(ValueError, match="image_token_index"):
    blip2.config_from_hf(dict(hf, image_token_index=None))
  with pytest.raises(ValueError, match="'opt'"):
    blip2.config_from_hf(dict(hf, text_config=dict(hf["text_config"], model_type="t5")))
  with pytest.raises(ValueError, match="word_embed_proj_dim"):
    blip2.config_from_hf(dict(hf, text_config=dict(hf["text_config"], word_embed_proj_dim=64)))


def test_token_prsl_on_answer_tokens(ckpts):
  # The authors' BLIP-2 objective: PRSL ("DRSL3") over the OPT token logits
  # of the answer tokens; image placeholders, bos, the question and padding
  # are ignore_index.
  ckpt = ckpts("postln_proj_untied_x2")
  pre = _load(ckpt.path)
  model, params = pre.model, pre.params
  # [image] * Q, bos, question, answer, EOS-like end; row 1 right-padded.
  prompt = model.prompt_ids([QUESTION] * N_IMAGES)
  p = prompt.shape[1]
  pad = model.config.text.pad_token_id
  answers = np.asarray([[11, 12, 5], [13, 5, pad], [14, 15, 5]])
  ids = np.concatenate([prompt, answers], axis=1).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, -1] = 0
  loss_mask = mask.copy()
  loss_mask[:, :p] = 0
  labels = np.asarray(blip2.lm_labels(ids, loss_mask))
  assert labels.shape == ids.shape and (labels[:, -1] == -100).all()
  assert ((labels != -100).sum(axis=1) == loss_mask.sum(axis=1)).all()

  logits = _logits(model, params, ckpt.images, ids, mask)
  # CE on these labels is transformers' own loss with labels = answer tokens
  # (it shifts them itself), so the alignment is the one transformers uses.
  hf_labels = np.where(loss_mask == 1, ids, -100)
  with torch.no_grad():
    ref_ce = ckpt.hf(pixel_values=_pixel_values(ckpt.images, ckpt.mean, ckpt.std),
                     input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     labels=torch.from_numpy(hf_labels)).loss.item()
  ce = losses.mean_cross_entropy(logits, labels)
  np.testing.assert_allclose(ce, ref_ce, atol=1e-5, rtol=0)

  b = 1e-6 * 1e5  # the authors' weight, scaled so the spread term shows
  prsl = losses.prsl_loss(logits, labels, start=0, end=4, weight=b)
  v = logits.shape[-1]
  flat = losses.prsl_loss(logits.reshape(-1, v), labels.reshape(-1), start=0, end=4, weight=b)
  np.testing.assert_allclose(prsl, flat, atol=1e-6, rtol=0)
  # float64 reference on the answer rows only.
  z = np.asarray(logits, np.float64).reshape(-1, v)
  y = labels.reshape(-1)
  z, y = z[y != -100], y[y != -100]
  lse = lambda a: a.max() + np.log(np.exp(a - a.max()).sum())
  ref = np.mean([lse(r) - r[t] for r, t in zip(z, y)])
  m = np.asarray([np.sort(np.delete(r, t))[::-1][:4].mean() for r, t in zip(z, y)])
  ref += b * (len(m) * lse(m) - m.sum())
  np.testing.assert_allclose(prsl, ref, atol=1e-5, rtol=0)
  assert abs(prsl - ce) > 1e-3  # the spread term counts

  # The captioning task (train.py's objective 'captioning') on BLIP-2: labels
  # are the caption's tokens and EOS (captioning.tokenize_captions' layout),
  # its inputs bos + caption (teacher_forcing), and TASK.logits runs OPT after
  # the image placeholders: the mean CE is transformers' loss with the image
  # placeholders and bos at -100.
  task = tasks.for_model(model)
  assert task is tasks.TASKS["captioning"]
  tasks.check_fits(task, model, "a BLIP-2")
  cap_labels = np.full((N_IMAGES, 5), -100, np.int32)
  cap_labels[:, :4] = answers[:, :1].repeat(4, 1) + np.arange(4)
  cap_labels[1, 2:] = -100
  batch = captioning.teacher_forcing(model, cap_labels)
  assert (batch["decoder_input_ids"][:, 0] == model.bos_token_id).all()
  cap_logits = task.logits(params, batch, ckpt.images, {}, model=model)
  assert cap_logits.shape == (N_IMAGES, 5, VOCAB)
  full = np.concatenate([model.prompt_ids(batch_size=N_IMAGES), cap_labels], axis=1)
  hf_labels = np.where(full == -100, -100, full)
  hf_labels[:, :model.num_query_tokens + 1] = -100
  full = np.where(full == -100, pad, full).astype(np.int64)
  with torch.no_grad():
    ref_ce = ckpt.hf(pixel_values=_pixel_values(ckpt.images, ckpt.mean, ckpt.std),
                     input_ids=torch.from_numpy(full),
                     labels=torch.from_numpy(hf_labels.astype(np.int64))).loss.item()
  np.testing.assert_allclose(losses.mean_cross_entropy(cap_logits, task.labels(batch)),
                             ref_ce, atol=1e-5, rtol=0)


def test_token_prsl_on_questions_through_the_task_data_path():
  # The digits' VQA texts through the captioning task's data path (the
  # tokenizer and teacher forcing train.py uses with data.questions): PRSL on
  # TASK.logits / TASK.labels equals PRSL on the flattened (B*T, V) logits of
  # the whole sequence built by hand, the question's positions ignored, and a
  # float64 reference on the answer rows alone.
  import prsl_jax  # pylint: disable=g-import-not-at-top
  from configs import digits_blip2  # pylint: disable=g-import-not-at-top
  from prsl_jax import data  # pylint: disable=g-import-not-at-top
  model, params, tok = _load(prsl_jax.TINY_BLIP2)
  config = digits_blip2.get_config()
  task = tasks.TASKS["captioning"]
  fields = task.data_fields(config, model, tok)
  assert set(data.DIGIT_VQA) <= set(fields["caption_templates"])
  texts = [data.DIGIT_VQA[0].format("three"), "a handwritten seven",
           data.DIGIT_VQA[1].format("one")]
  batch = fields["tokenize"](texts)
  source, _ = data.load("digits", "test", image_size=model.image_size)
  images = np.stack([source[i]["image"] for i in range(len(texts))])
  loss_fn = losses.from_config(config.loss)
  logits = task.logits(params, batch, images, {}, model=model)
  got = float(loss_fn(logits, task.labels(batch)))

  # By hand: [image] * Q, bos, question, answer, EOS, padded with pad.
  q, bos, eos = model.num_query_tokens, model.bos_token_id, model.eos_token_id
  pieces = [(tok.encode(data.DIGIT_QUESTIONS[0]), tok.encode(" three")),
            ([], tok.encode("a handwritten seven")),
            (tok.encode(data.DIGIT_QUESTIONS[1]), tok.encode(" one"))]
  t = q + 1 + config.data.caption_length
  ids = np.full((len(texts), t), model.pad_token_id, np.int32)
  target = np.zeros((len(texts), t), bool)  # positions whose token is learned
  for i, (question, answer) in enumerate(pieces):
    seq = [model.image_token_id] * q + [bos] + question + answer + [eos]
    ids[i, :len(seq)] = seq
    target[i, q + 1 + len(question):len(seq)] = True
  assert (np.sum(batch["labels"] != -100, axis=1) == target.sum(axis=1)).all()
  full = np.asarray(_logits(model, params, images, ids, np.ones_like(ids)))
  v = full.shape[-1]
  # Position t predicts token t + 1: rows of the flattened logits, labels by hand.
  flat_labels = np.where(target[:, 1:], ids[:, 1:], -100).reshape(-1)
  flat_logits = full[:, :-1].reshape(-1, v)
  np.testing.assert_allclose(got, float(loss_fn(flat_logits, flat_labels)), atol=1e-5, rtol=0)
  # float64 on the answer rows only (PRSL's group: every answer token of the batch).
  z, y = flat_logits[flat_labels != -100].astype(np.float64), flat_labels[flat_labels != -100]
  lse = lambda a: a.max() + np.log(np.exp(a - a.max()).sum())
  m = np.asarray([np.sort(np.delete(r, k))[::-1][config.loss.start:config.loss.end].mean()
                  for r, k in zip(z, y)])
  ref = np.mean([lse(r) - r[k] for r, k in zip(z, y)]) + config.loss.weight * (
      len(m) * lse(m) - m.sum())
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
  # The question's rows would change it: they are really left out.
  with_prompt = np.where((ids[:, 1:] != model.pad_token_id) & (np.arange(1, t) > q),
                         ids[:, 1:], -100).reshape(-1)
  assert abs(float(loss_fn(flat_logits, with_prompt)) - got) > 1e-2

  # Generation from the question (the evaluation's): bos, the question, then
  # the greedy answer, which names the digit.
  prompt = tuple(tok.encode(data.DIGIT_QUESTIONS[0]))
  out = np.asarray(captioning.generate(model, params, images, max_length=3, prompt=prompt))
  assert out.shape == (len(texts), 1 + len(prompt) + 2)
  assert (out[:, :1 + len(prompt)] == np.asarray([bos, *prompt])).all()
  answers = captioning.decode(tok, out[:, 1 + len(prompt):])
  assert answers == [data.DIGIT_NAMES[source.labels[i]] for i in range(len(texts))], answers
  dec, labels = captioning.generated_labels(jnp.asarray(out), eos, len(prompt))
  assert (np.asarray(labels)[:, :len(prompt)] == -100).all()
  np.testing.assert_array_equal(np.asarray(labels)[:, len(prompt)], out[:, 1 + len(prompt)])
  # Questions of different lengths in one batch (a VQA source's): left-padded,
  # the padding masked; each row answers as it does alone.
  questions = [data.DIGIT_QUESTIONS[2], data.DIGIT_QUESTIONS[0], data.DIGIT_QUESTIONS[1]]
  pq, pm = captioning.question_ids(tok, questions, model.pad_token_id)
  assert pm[1].sum() < pm.shape[1] == pm[0].sum()
  mixed = np.asarray(captioning.generate(model, params, images, max_length=3, prompt=pq,
                                         prompt_mask=pm))
  np.testing.assert_array_equal(mixed[1, 1 + pq.shape[1]:], out[1, 1 + len(prompt):])
  mask = captioning.decoder_mask(pm, mixed.shape[1] - 1)
  padded = np.asarray(task.logits(params, {"decoder_input_ids": mixed[:, :-1],
                                           "decoder_attention_mask": mask}, images, {},
                                  model=model))
  alone = np.asarray(task.logits(params, {"decoder_input_ids": out[:, :-1],
                                          "decoder_attention_mask": None}, images, {},
                                 model=model))
  np.testing.assert_allclose(padded[1, pq.shape[1]:], alone[1, len(prompt):], **TOL)


def test_bundled_tiny_blip2_answers_the_digits():
  # The checkpoint scripts/pretrain_tiny_blip2.py makes (prsl_jax/assets/
  # tiny_blip2) loads with its tokenizer and answers the first VQA prompt it
  # was trained on.
  import prsl_jax  # pylint: disable=g-import-not-at-top
  from prsl_jax import data  # pylint: disable=g-import-not-at-top
  path = prsl_jax.TINY_BLIP2
  model, params, tok = load_pretrained(path)
  assert tok is not None and tok.convert_tokens_to_ids("<image>") == model.image_token_id
  source, _ = data.load("digits", "test", image_size=model.image_size)
  idx = np.arange(32)
  images = np.stack([source[int(i)]["image"] for i in idx])
  question = tok.encode("Question: what digit is this? Answer:")
  out = np.asarray(gen.greedy(model, params, images, model.prompt_ids([question] * len(idx)),
                              max_new_tokens=3))
  answers = [tok.decode(r[:r.index(model.eos_token_id)] if model.eos_token_id in r
                        else r).strip() for r in out.tolist()]
  right = np.mean([a == data.DIGIT_NAMES[source.labels[i]] for a, i in zip(answers, idx)])
  assert right >= 0.8, answers
  # The captioning task's entry (model.caption): bos, then the greedy caption,
  # which names the digit.
  tokens = np.asarray(model.caption(params, images, max_length=5))
  assert tokens.shape == (len(idx), 5) and (tokens[:, 0] == model.bos_token_id).all()
  np.testing.assert_array_equal(tokens[:, 1:], gen.greedy(model, params, images,
                                                          max_new_tokens=4))
  texts = captioning.decode(tok, tokens)
  named = np.mean([data.DIGIT_NAMES[source.labels[i]] in t.split() for t, i in zip(texts, idx)])
  assert named >= 0.8, texts


def test_trainable_mask_covers_the_parts():
  model = blip2.Blip2(blip2.config_from_hf(dict(
      transformers.Blip2Config(
          vision_config=CONFIGS["preln_tied_x1"]["vision"],
          qformer_config=CONFIGS["preln_tied_x1"]["qformer"],
          text_config=dict(model_type="opt", vocab_size=VOCAB, hidden_size=32,
                           num_hidden_layers=1, ffn_dim=16, num_attention_heads=4),
          num_query_tokens=2, image_token_index=IMAGE_TOKEN).to_dict())))
  shapes = model.param_shapes()
  assert set(shapes) == set(blip2.TRAINABLE_PARTS["all"])
  mask = blip2.trainable_mask(shapes, "authors")
  leaves = jax.tree_util.tree_flatten_with_path(mask)[0]
  frozen = {path[0].key for path, on in leaves if not on}
  assert frozen == {"language_model"}  # the authors froze OPT, nothing else
  assert all(not on for _, on in jax.tree_util.tree_flatten_with_path(
      blip2.trainable_mask(shapes, "qformer")["vision_model"])[0])
  with pytest.raises(ValueError, match="parts="):
    blip2.trainable_mask(shapes, "decoder")
  # The trainer's train_towers reach the same parts (training.trainable_keys).
  from prsl_jax import training  # pylint: disable=g-import-not-at-top
  assert training.trainable_keys(model, "vision") == blip2.TRAINABLE_PARTS["authors"]
  assert training.trainable_keys(model, "qformer") == ("query_tokens", "qformer",
                                                       "language_projection")


@pytest.mark.heavy(90)
def test_digits_blip2_config_trains_and_evaluates_through_the_trainer(tmp_path):
  # configs/digits_blip2.py end to end in one process, shrunk: PRSL on the
  # caption and answer tokens trains the Q-Former side (the authors' VQA
  # setting) and leaves OPT and the vision encoder as they were; the paper's
  # suite then runs on both models' answers to the question.
  import prsl_jax  # pylint: disable=g-import-not-at-top
  from configs import digits_blip2  # pylint: disable=g-import-not-at-top
  from prsl_jax import trainer  # pylint: disable=g-import-not-at-top
  c = digits_blip2.get_config("runlocal")
  c.update_from_flattened_dict({
      "total_steps": 2, "checkpoint_every": 2, "compare_losses": (), "eval.num_examples": 8,
      "eval.suites": ("paper",), "eval.steps": 1, "eval.eps": (4 / 255,)})
  out = trainer.run(c, str(tmp_path))
  assert set(out["results"]) == {"start", "prsl fine-tuned"}
  assert "VQA acc." in out["table"]  # answers to c.eval.prompt
  start = out["results"]["start"]
  assert start.checks.passed and len(start.clean_captions) == 8
  assert start.prompt == c.eval.prompt and start.model_type == "blip-2"
  assert start.kind == "captioner"  # the result family, as the ViT-GPT2 captioner's
  assert start.clean["vqa_accuracy"] >= 0.5, start.clean_captions  # it answers digits
  paper = start.robust["paper"][0]
  assert paper.answer_change_rate is not None and paper.vqa_accuracy is not None
  before = load_pretrained(prsl_jax.TINY_BLIP2).params
  after = load_pretrained(str(tmp_path / "prsl" / "export")).params
  moved = {k: max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                  for a, b in zip(jax.tree.leaves(after[k]), jax.tree.leaves(before[k])))
           for k in before}
  # The authors' VQA run: OPT and the vision encoder frozen, the Q-Former side trained.
  assert moved["language_model"] == 0.0 and moved["vision_model"] == 0.0, moved
  assert all(moved[k] > 0 for k in blip2.Blip2.towers["qformer"]), moved


@pytest.mark.heavy(95)
def test_training_step_on_eight_devices_matches_one(tmp_path):
  # One BLIP-2 step of configs/digits_blip2.py (PRSL over the answer and
  # caption tokens of the global batch, Q-Former side trained) on 8 simulated
  # devices (a subprocess, tests/train_worker.py), 1 example each, against
  # the same step on one device in this process. SGD, not Adam (as
  # tests/small_config.py: Adam's first step is sign-like and would turn float
  # noise into full-size differences).
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import prsl_jax  # pylint: disable=g-import-not-at-top
  from configs import digits_blip2  # pylint: disable=g-import-not-at-top
  from prsl_jax import trainer  # pylint: disable=g-import-not-at-top
  from tests import processes  # pylint: disable=g-import-not-at-top
  overrides = {"total_steps": 1, "batch_size": 8, "log_every": 1, "checkpoint_every": 1,
               "optimizer.name": "sgd", "optimizer.lr": 0.5, "optimizer.warmup_steps": 0,
               "loss.weight": 0.01}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = str(tmp_path / "p8.npz")
  proc = subprocess.run(
      [sys.executable, "-m", "tests.train_worker",
       f"--config={os.path.join(root, 'configs', 'digits_blip2.py')}:runlocal",
       f"--workdir={tmp_path / 'w8'}", f"--out={out}",
       *[f"--config.{k}={v}" for k, v in overrides.items()]],
      env=processes.env(8), cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert "devices=8" in proc.stdout
  eight = dict(np.load(out))
  c = digits_blip2.get_config("runlocal")
  c.update_from_flattened_dict(overrides)
  params = trainer.train(c, str(tmp_path / "w1"), trainer.setup(c))[0]
  one = {jax.tree_util.keystr(k): np.asarray(v)
         for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert one.keys() == eight.keys()
  for k in one:
    np.testing.assert_allclose(eight[k], one[k], rtol=1e-5, atol=2e-6, err_msg=k)
  # The step moved the trained parts far beyond that tolerance.
  start = _load(prsl_jax.TINY_BLIP2).params
  start = {jax.tree_util.keystr(k): np.asarray(v)
           for k, v in jax.tree_util.tree_flatten_with_path(start)[0]}
  assert max(np.abs(one[k] - start[k]).max() for k in one if "qformer" in k) > 1e-3


@pytest.mark.heavy(60)
def test_vqa_jsonl_source_and_per_question_evaluation(tmp_path):
  # A VQA set as JSON lines (configs/blip2_opt.py's data): digits saved as
  # PNG, each with its own question. Training texts are question + the most
  # frequent answer; the evaluation asks each image its question (questions
  # of different lengths, left-padded), scores VQA accuracy against the
  # answers and attacks the answers.
  import json as json_lib  # pylint: disable=g-import-not-at-top
  import prsl_jax  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from prsl_jax import data  # pylint: disable=g-import-not-at-top
  model, params, tok = _load(prsl_jax.TINY_BLIP2)
  digits, _ = data.load("digits", "test", image_size=model.image_size)
  lines = []
  for i in range(4):
    name = data.DIGIT_NAMES[digits.labels[i]]
    Image.fromarray((digits[i]["image"] * 255).round().astype(np.uint8)).save(
        tmp_path / f"{i}.png")
    question = data.DIGIT_QUESTIONS[i % 2][len("Question: "):-len(" Answer:")]
    lines.append({"image": f"{i}.png", "question": question,
                  "answers": ["a blur", name, name] if i else [name, "ten", "ten"]})
  (tmp_path / "val.jsonl").write_text("\n".join(json_lib.dumps(r) for r in lines) + "\n")
  source, class_names = data.load("vqa_jsonl", "val", image_size=model.image_size,
                                  data_dir=str(tmp_path))
  assert class_names is None and len(source) == 4
  assert source.question(1) == data.DIGIT_QUESTIONS[1]
  name1 = data.DIGIT_NAMES[digits.labels[1]]
  assert source[0]["caption"] == f"{data.DIGIT_QUESTIONS[0]} ten"  # the most frequent
  assert source[1]["caption"] == f"{data.DIGIT_QUESTIONS[1]} {name1}"
  np.testing.assert_allclose(source[0]["image"], digits[0]["image"], atol=1 / 255)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "val.jsonl").write_text(json_lib.dumps({"image": "0.png", "question": "q?"}) + "\n")
  with pytest.raises(ValueError, match="answers"):
    data.load("vqa_jsonl", "val", image_size=8, data_dir=str(bad))

  result = captioning.evaluate(
      model, params, tok, source, np.arange(4), eps_list=[4 / 255],
      suites={"paper": captioning.make_suite("paper", steps=1)}, batch_size=4,
      max_length=3, progress_bar=False)
  assert result.prompt == "per example" and result.checks.passed
  # Each image answers its digit. Soft accuracy by hand, three references:
  # example 0 [name, ten, ten]: leaving out name -> 0 matches, out a ten -> 1:
  # (0 + 1/3 + 1/3) / 3 = 2/9; the others [a blur, name, name]: (2/3 + 1/3 +
  # 1/3) / 3 = 4/9.
  names = [data.DIGIT_NAMES[digits.labels[i]] for i in range(4)]
  assert result.clean_captions == names, result.clean_captions
  assert result.clean["vqa_accuracy"] == pytest.approx((2 / 9 + 3 * 4 / 9) / 4)
  paper = result.robust["paper"][0]
  assert 0.0 <= paper.answer_change_rate <= 1.0 and paper.vqa_accuracy is not None
