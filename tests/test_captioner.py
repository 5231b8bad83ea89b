"""Our flax ViT-GPT-2 captioner against transformers' PyTorch
VisionEncoderDecoderModel on the same (tiny, random, perturbed) weights:
teacher-forced logits, greedy and beam-search generation, cached decoding,
HF export and import.

Each tiny checkpoint is built once per session. Its EOS id is chosen from what
the model generates on the test images (without an EOS), so that some
sequences end early and some run to max_length: generation's EOS, padding and
early-exit paths are all exercised. (Random tiny decoders tend to repeat one
token forever; the seeds are ones whose outputs vary.)
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

from prsl_jax.models import captioner as cap
from prsl_jax.models import generation
from prsl_jax.models.convert import load_pretrained, save_pretrained
from prsl_jax.models.tokenizer import build_gpt2_word_tokenizer

TOL = dict(atol=1e-5, rtol=0)
MAX_LENGTH = 10
NUM_BEAMS = 3
N_IMAGES = 4
WORDS = "a photo of cat dog two sitting on the mat grass red blue"

CONFIGS = {
    # Equal widths (no projection), tied LM head, exact gelu ViT, a real
    # GPT-2 tokenizer, custom pixel statistics.
    "tied": dict(
        encoder=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, image_size=16, patch_size=4, hidden_act="gelu"),
        decoder=dict(n_embd=32, n_layer=2, n_head=4, n_positions=16,
                     activation_function="gelu_new", tie_word_embeddings=True),
        tokenizer=True, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28), pad="extra",
        seed=4),
    # Another image/patch size, no qkv bias, untied lm_head, n_inner, relu,
    # per-layer attention scaling, upcast attention; pad id 0 (transformers'
    # beam search then fills with EOS).
    "untied_p8": dict(
        encoder=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                     num_attention_heads=2, image_size=24, patch_size=8,
                     hidden_act="gelu_new", qkv_bias=False, layer_norm_eps=1e-6),
        decoder=dict(n_embd=24, n_layer=2, n_head=3, n_positions=16, n_inner=40,
                     activation_function="relu", tie_word_embeddings=False,
                     scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
        vocab=64, mean=None, std=None, pad=0, seed=1),
    # Encoder wider than the decoder (enc_to_dec_proj), image not a multiple of
    # the patch, unscaled attention; the checkpoint file has
    # no pooler and carries GPT-2's old mask buffers; loaded with remat.
    "proj_legacy": dict(
        encoder=dict(hidden_size=48, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=3, image_size=22, patch_size=5,
                     hidden_act="quick_gelu"),
        decoder=dict(n_embd=16, n_layer=2, n_head=2, n_positions=24,
                     scale_attn_weights=False, tie_word_embeddings=True),
        vocab=64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), pad="extra", legacy_file=True,
        seed=2),
}


@dataclasses.dataclass
class Ckpt:
  name: str
  path: str
  hf: Any = None  # the PyTorch VisionEncoderDecoderModel (eval)
  images: np.ndarray = None  # (N_IMAGES, H, W, 3) in [0, 1]
  mean: tuple = None
  std: tuple = None



def _pixel_values(images, mean, std):
  """transformers' input for our [0, 1] NHWC images: (x - mean) / std, NCHW."""
  x = (images - np.float32(mean)) / np.float32(std)
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _hf_generate(hf, pv, **kw):
  with torch.no_grad():
    return hf.generate(pv, do_sample=False, max_length=MAX_LENGTH, **kw).numpy()


def _pick_eos(hf, pv, exclude):
  """An EOS id for `hf`, which has none yet: a token that ends some of its
  greedy captions of `pv` but not all, at as many different steps as
  possible, and that ends some beam-search caption too. Exercises EOS,
  padding and the early exit of both searches."""
  greedy = _hf_generate(hf, pv, num_beams=1)

  def first(row, t):
    hit = np.flatnonzero(row[1:] == t)
    return int(hit[0]) + 1 if hit.size else MAX_LENGTH

  def key(t):
    ends = [first(r, t) for r in greedy]
    return (MAX_LENGTH in ends and min(ends) < MAX_LENGTH, len(set(ends)), -t)
  candidates = sorted(set(greedy[:, 1:].ravel().tolist()) - set(exclude), key=key,
                      reverse=True)
  for t in candidates:
    if key(t)[0] and (_hf_generate(hf, pv, num_beams=NUM_BEAMS, eos_token_id=t) == t).any():
      return t
  return candidates[0]


def _build(name, path, seed):
  spec = CONFIGS[name]
  if spec.get("tokenizer"):
    tok_size = build_gpt2_word_tokenizer([WORDS], path, spec["decoder"]["n_positions"])
    vocab, start = tok_size + 8, tok_size - 1  # <|endoftext|> starts, as in GPT-2
  else:
    vocab = spec["vocab"]
    start = vocab - 1
  pad = vocab - 2 if spec["pad"] == "extra" else spec["pad"]
  dec = transformers.GPT2Config(vocab_size=vocab, add_cross_attention=True, is_decoder=True,
                                bos_token_id=start, eos_token_id=None, **spec["decoder"])
  config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
      transformers.ViTConfig(**spec["encoder"]), dec)
  config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = start, pad, None
  torch.manual_seed(seed)
  hf = transformers.VisionEncoderDecoderModel(config).eval()
  with torch.no_grad():
    for p in hf.parameters():  # LayerNorms off 1/0, biases off 0: swaps show
      p.add_(0.1 * torch.randn_like(p))

  size = spec["encoder"]["image_size"]
  images = np.random.default_rng(seed).uniform(0, 1, (N_IMAGES, size, size, 3)).astype(np.float32)
  mean = spec["mean"] or cap.VIT_MEAN
  std = spec["std"] or cap.VIT_STD
  eos = _pick_eos(hf, _pixel_values(images, mean, std), exclude=(start, pad))
  hf.config.eos_token_id = hf.generation_config.eos_token_id = eos
  hf.config.decoder.eos_token_id = eos
  hf.save_pretrained(path)
  if spec["mean"] is not None:
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
      json.dump({"image_processor_type": "ViTImageProcessor",
                 "image_mean": list(mean), "image_std": list(std)}, f)
  if spec.get("legacy_file"):
    file = os.path.join(path, "model.safetensors")
    state = safetensors.numpy.load_file(file)
    state = {k: v for k, v in state.items() if not k.startswith("encoder.pooler.")}
    n = spec["decoder"]["n_positions"]
    for i in range(spec["decoder"]["n_layer"]):
      state[f"decoder.transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, n, n), np.uint8))
      state[f"decoder.transformer.h.{i}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    safetensors.numpy.save_file(state, file, metadata={"format": "pt"})
  return Ckpt(name, path, hf, images, tuple(mean), tuple(std))


@pytest.fixture(scope="session")
def captioner_ckpts(tmp_path_factory):
  """Lazily built {name: Ckpt}; each checkpoint written once a session."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = _build(name, str(tmp_path_factory.mktemp(f"cap_{name}")),
                           seed=CONFIGS[name]["seed"])
    return cache[name]
  return get


@functools.lru_cache(maxsize=None)
def _load(path, remat=False):
  return load_pretrained(path, remat=remat)


def _ours(ckpt):
  return _load(ckpt.path, remat=bool(CONFIGS[ckpt.name].get("legacy_file")))


# One jitted function per computation, shared by all tests (one compile per
# model config and shape).
@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, images, ids, mask):
  return model.logits(params, images, ids, mask)


def _decoder_batch(model, seed=0, t=9):
  """(ids, mask) (N_IMAGES, t): decoder_start, random tokens; the third row
  right-padded after 5 tokens."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, model.vocab_size, (N_IMAGES, t))
  ids[:, 0] = model.decoder_start_token_id
  mask = np.ones_like(ids)
  mask[2, 5:] = 0
  return ids, mask


def _hf_logits(hf, ckpt, images, ids, mask):
  with torch.no_grad():
    return hf(pixel_values=_pixel_values(images, ckpt.mean, ckpt.std),
              decoder_input_ids=torch.from_numpy(ids),
              decoder_attention_mask=torch.from_numpy(mask)).logits.numpy()


def _assert_generated(ours, ref, fill):
  """transformers crops at its longest sequence; ours is (B, MAX_LENGTH)."""
  assert ours.shape == (ref.shape[0], MAX_LENGTH) and ours.dtype == np.int32
  np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
  assert (ours[:, ref.shape[1]:] == fill).all()


# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_match_transformers(captioner_ckpts, name):
  ckpt = captioner_ckpts(name)
  pre = _ours(ckpt)
  model, params = pre.model, pre.params
  c = model.config
  assert c.has_enc_to_dec_proj == (name == "proj_legacy")
  assert ("enc_to_dec_proj" in params) == (name == "proj_legacy")
  assert ("lm_head" in params["decoder"]) == (name == "untied_p8")
  assert c.encoder.add_pooling_layer == (name != "proj_legacy")
  assert c.remat == (name == "proj_legacy")
  assert (c.encoder.image_mean, c.encoder.image_std) == (ckpt.mean, ckpt.std)

  ids, mask = _decoder_batch(model)
  ref = _hf_logits(ckpt.hf, ckpt, ckpt.images, ids, mask)
  ours = np.asarray(_logits(model, params, ckpt.images, ids, mask))
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, **TOL)
  # The padding mask matters (guards the comparison above).
  unmasked = np.asarray(_logits(model, params, ckpt.images, ids, np.ones_like(mask)))
  assert np.abs(unmasked[2, 5:] - ours[2, 5:]).max() > 1e-3

  ref_ids = _hf_generate(ckpt.hf, _pixel_values(ckpt.images, ckpt.mean, ckpt.std), num_beams=1)
  got = np.asarray(generation.greedy(model, params, ckpt.images, max_length=MAX_LENGTH))
  _assert_generated(got, ref_ids, c.pad_token_id)
  # The EOS path ran: some row ended early and was padded, some ran to the end.
  ended = (ref_ids == c.eos_token_id).any(axis=1)
  assert ended.any() and (~ended).any()
  assert (got[ended][:, -1] == c.pad_token_id).all()


@pytest.mark.parametrize("name,kw", [
    ("tied", dict()),
    ("tied", dict(length_penalty=2.0, early_stopping=True)),
    ("untied_p8", dict()),  # pad id 0: transformers fills with EOS
])
def test_beam_search_matches_transformers(captioner_ckpts, name, kw):
  ckpt = captioner_ckpts(name)
  pre = _ours(ckpt)
  model, params = pre.model, pre.params
  ref = _hf_generate(ckpt.hf, _pixel_values(ckpt.images, ckpt.mean, ckpt.std),
                     num_beams=NUM_BEAMS, **kw)
  got = np.asarray(generation.beam_search(model, params, ckpt.images, num_beams=NUM_BEAMS,
                                          max_length=MAX_LENGTH, **kw))
  fill = model.pad_token_id or model.eos_token_id
  _assert_generated(got, ref, fill)
  assert (ref == model.eos_token_id).any()  # some hypothesis ended on EOS
  # Beam search found something greedy did not (else this test is greedy's).
  greedy = np.asarray(generation.greedy(model, params, ckpt.images, max_length=MAX_LENGTH))
  assert (greedy != got).any()


@functools.partial(jax.jit, static_argnums=(0, 4))
def _stepwise(model, params, images, ids, max_length):
  """Feeds ids (B, T) one column at a time through the cache: (step logits
  (B, T, V), the cache's final index, decode()'s teacher-forced logits)."""
  states = model.encode(params, images)
  cache = model.init_cache(params, states, max_length)

  def step(cache, tokens):
    logits, cache = model.decode_step(params, cache, tokens)
    return cache, logits
  cache, logits = jax.lax.scan(step, cache, ids.T)
  return jnp.swapaxes(logits, 0, 1), cache, model.decode(params, states, ids)


def test_cached_decoding_equals_teacher_forced(captioner_ckpts):
  ckpt = captioner_ckpts("proj_legacy")
  pre = _ours(ckpt)
  model, params = pre.model, pre.params
  ids, mask = _decoder_batch(model, seed=1)
  full = np.asarray(_logits(model, params, ckpt.images, ids, np.ones_like(mask)))
  steps, cache, decoded = _stepwise(model, params, ckpt.images, ids, ids.shape[1] + 3)
  np.testing.assert_allclose(steps, full, atol=1e-5, rtol=0)
  np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=0)  # decode() on states
  # (L, B, max_length, heads, head_dim) self cache; (L, B, 1 + patches, ...) cross.
  assert cache["self_k"].shape == (2, N_IMAGES, ids.shape[1] + 3, 2, 8)
  assert cache["cross_k"].shape == (2, N_IMAGES, 1 + 16, 2, 8)
  assert int(cache["index"]) == ids.shape[1]


def test_generation_compiles_once_per_shape(captioner_ckpts):
  ckpt = captioner_ckpts("tied")
  pre = _ours(ckpt)
  model, params = pre.model, pre.params
  # numpy (no per-leaf compiles), then on device like params: the same jit key.
  other = jax.device_put(jax.tree.map(lambda x: np.asarray(x) * 0.5, params))
  before = generation._greedy._cache_size()  # pylint: disable=protected-access
  a = generation.greedy(model, params, ckpt.images, max_length=MAX_LENGTH)
  mid = generation._greedy._cache_size()  # pylint: disable=protected-access
  b = generation.greedy(model, other, ckpt.images, max_length=MAX_LENGTH)
  # An equal-by-value static model (a fresh load) hits the same compilation.
  twin = load_pretrained(ckpt.path).model
  assert twin == model and twin is not model
  generation.greedy(twin, other, ckpt.images, max_length=MAX_LENGTH)
  assert mid <= before + 1 and generation._greedy._cache_size() == mid  # pylint: disable=protected-access
  assert (np.asarray(a) != np.asarray(b)).any()  # the params did change

  before = generation._beam_search._cache_size()  # pylint: disable=protected-access
  generation.beam_search(model, params, ckpt.images, num_beams=NUM_BEAMS, max_length=MAX_LENGTH)
  mid = generation._beam_search._cache_size()  # pylint: disable=protected-access
  generation.beam_search(model, other, ckpt.images, num_beams=NUM_BEAMS, max_length=MAX_LENGTH)
  assert mid <= before + 1 and generation._beam_search._cache_size() == mid  # pylint: disable=protected-access


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_round_trip(captioner_ckpts, name, tmp_path):
  ckpt = captioner_ckpts(name)
  pre = _ours(ckpt)
  model, params = pre.model, pre.params
  # "Fine-tuned" params: every leaf moved (numpy: no per-leaf compilations).
  rng = np.random.default_rng(3)
  tuned = jax.tree.map(
      lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32), params)
  out = str(tmp_path / "export")
  save_pretrained(model, tuned, out, tokenizer=pre.tokenizer)

  hf = transformers.VisionEncoderDecoderModel.from_pretrained(out).eval()
  ids, mask = _decoder_batch(model, seed=2)
  ref = _hf_logits(hf, ckpt, ckpt.images, ids, mask)
  np.testing.assert_allclose(_logits(model, tuned, ckpt.images, ids, mask), ref, **TOL)
  pre_json = json.load(open(os.path.join(out, "preprocessor_config.json")))
  assert (tuple(pre_json["image_mean"]), tuple(pre_json["image_std"])) == (ckpt.mean, ckpt.std)

  back = load_pretrained(out, remat=model.config.remat)
  assert back.model == model
  assert jax.tree.structure(back.params) == jax.tree.structure(tuned)
  jax.tree.map(np.testing.assert_array_equal, back.params, tuned)
  if pre.tokenizer is not None:
    caption = "a cat sitting on the red mat"
    assert back.tokenizer(caption)["input_ids"] == pre.tokenizer(caption)["input_ids"]
    assert len(pre.tokenizer(caption)["input_ids"]) == len(caption.split())  # one token a word


def test_pickle_refused_unless_allowed(captioner_ckpts, tmp_path):
  ckpt = captioner_ckpts("tied")
  folder = str(tmp_path / "pickled")
  os.makedirs(folder)
  for n in ("config.json", "preprocessor_config.json"):
    with open(os.path.join(ckpt.path, n)) as src, open(os.path.join(folder, n), "w") as dst:
      dst.write(src.read())
  # The in-memory state dict: transformers 5's ViT names, the tied lm_head
  # copy, plus an old GPT-2 mask buffer; adapt_state_dict maps all of it.
  state = dict(ckpt.hf.state_dict())
  assert "encoder.layers.0.attention.q_proj.weight" in state
  state["decoder.transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
  torch.save(state, os.path.join(folder, "pytorch_model.bin"))
  with pytest.raises(ValueError, match="pickle"):
    load_pretrained(folder)
  got = load_pretrained(folder, allow_pickle=True)
  want = _ours(ckpt)
  assert got.model == want.model
  jax.tree.map(np.testing.assert_array_equal, got.params, want.params)


def test_key_map_covers_every_param_once(captioner_ckpts):
  for name in CONFIGS:
    model = _ours(captioner_ckpts(name)).model
    kmap = cap.key_map(model.config)
    names = [hf for hf, _, _ in kmap]
    assert len(names) == len(set(names))
    leaves = {tuple(k.key for k in path)
              for path, _ in jax.tree_util.tree_flatten_with_path(model.param_shapes())[0]}
    assert {path for _, path, _ in kmap} == leaves
    top = {"encoder", "decoder"} | ({"enc_to_dec_proj"} if model.config.has_enc_to_dec_proj
                                    else set())
    assert set(model.param_shapes()) == top


def test_bad_inputs_name_the_argument(captioner_ckpts):
  pre = _ours(captioner_ckpts("tied"))
  model, params = pre.model, pre.params
  d = cap.config_to_hf(model.config).to_dict()
  with pytest.raises(ValueError, match="encoder.model_type"):
    cap.config_from_hf(dict(d, encoder=dict(d["encoder"], model_type="deit")))
  with pytest.raises(ValueError, match="add_cross_attention"):
    cap.config_from_hf(dict(d, decoder=dict(d["decoder"], add_cross_attention=False)))
  with pytest.raises(ValueError, match="images must have shape"):
    model.encode(params, jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="max_length"):
    generation.greedy(model, params, jnp.zeros((1, 16, 16, 3)), max_length=17)
  with pytest.raises(ValueError, match="num_beams"):
    generation.beam_search(model, params, jnp.zeros((1, 16, 16, 3)), num_beams=0)
  # Defaults: a config.json without generation settings.
  assert model.max_length == 16  # min(transformers' 20, n_positions)
  assert cap.Captioner(cap.config_from_hf(d)) == dataclasses.replace(
      model, config=dataclasses.replace(model.config, encoder=dataclasses.replace(
          model.config.encoder, image_mean=cap.VIT_MEAN, image_std=cap.VIT_STD)))


def test_pixel_gradient_matches_torch(captioner_ckpts):
  # What attacks use: d(caption loss)/d(pixels in [0, 1]), here through remat.
  ckpt = captioner_ckpts("proj_legacy")
  pre = _ours(ckpt)
  model, params = pre.model, pre.params
  assert model.config.remat
  ids, mask = _decoder_batch(model, seed=4)
  labels = np.roll(ids, -1, axis=1)

  def loss(images):
    logp = jax.nn.log_softmax(model.logits(params, images, ids, mask))
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))
  value, grad = jax.jit(jax.value_and_grad(loss))(ckpt.images)

  pv = _pixel_values(ckpt.images, ckpt.mean, ckpt.std).requires_grad_()
  logits = ckpt.hf(pixel_values=pv, decoder_input_ids=torch.from_numpy(ids),
                   decoder_attention_mask=torch.from_numpy(mask)).logits
  ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          torch.from_numpy(labels).reshape(-1))
  ref.backward()
  # pv = (x - mean) / std, so d/dx = d/dpv / std.
  ref_grad = pv.grad.numpy().transpose(0, 2, 3, 1) / np.float32(ckpt.std)
  np.testing.assert_allclose(value, ref.item(), atol=1e-5, rtol=0)
  scale = np.abs(ref_grad).max()
  assert scale > 0
  np.testing.assert_allclose(grad, ref_grad, atol=1e-4 * scale, rtol=0)


def test_bfloat16_compute(captioner_ckpts):
  ckpt = captioner_ckpts("tied")
  f32 = _ours(ckpt)
  bf16 = load_pretrained(ckpt.path, dtype=jnp.bfloat16)
  assert bf16.model.config.dtype == jnp.bfloat16
  jax.tree.map(np.testing.assert_array_equal, bf16.params, f32.params)  # params stay float32
  ids, mask = _decoder_batch(f32.model)
  lo = _logits(bf16.model, bf16.params, ckpt.images, ids, mask)
  hi = _logits(f32.model, f32.params, ckpt.images, ids, mask)
  assert lo.dtype == jnp.float32
  err = np.abs(np.asarray(lo) - np.asarray(hi)).max()
  assert 0 < err < 0.05 * np.abs(np.asarray(hi)).max()
  # The cache is kept in the compute dtype and a step traces (shapes only).
  model = bf16.model

  def step(params):
    cache = model.init_cache(params, model.encode(params, ckpt.images), 4)
    return model.decode_step(params, cache, jnp.zeros((N_IMAGES,), jnp.int32))
  logits, cache = jax.eval_shape(step, bf16.params)
  assert logits.dtype == jnp.float32 and logits.shape == (N_IMAGES, model.vocab_size)
  assert cache["self_k"].dtype == jnp.bfloat16 and cache["self_k"].shape[2] == 4


def test_shift_tokens_right_matches_transformers():
  from transformers.models.vision_encoder_decoder import modeling_vision_encoder_decoder as ved  # pylint: disable=g-import-not-at-top
  labels = np.array([[5, 6, 7, -100], [8, -100, -100, -100]])
  want = ved.shift_tokens_right(torch.from_numpy(labels), 1, 9).numpy()
  got = cap.shift_tokens_right(labels, pad_token_id=1, decoder_start_token_id=9)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == jnp.int32


def test_full_size_vit_gpt2_names_and_shapes():
  # nlpconnect/vit-gpt2-image-captioning's architecture (ViT-B/16 + GPT-2
  # small), on torch's meta device: transformers 5's in-memory names (its
  # tied lm_head included) map onto key_map with the shapes our params have.
  config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
      transformers.ViTConfig(), transformers.GPT2Config(add_cross_attention=True, is_decoder=True))
  config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = 50256
  with torch.device("meta"):
    hf = transformers.VisionEncoderDecoderModel(config)
  state, model = cap.adapt_state_dict(
      {k: tuple(v.shape) for k, v in hf.state_dict().items()}, cap.from_hf(config))
  shapes = model.param_shapes()
  kmap = cap.key_map(model.config)
  assert {hf_name for hf_name, _, _ in kmap} == set(state)
  for hf_name, path, kind in kmap:
    flax_shape = functools.reduce(lambda t, k: t[k], path, shapes).shape
    if kind == "linear":
      flax_shape = flax_shape[::-1]  # (in, out) -> torch (out, in)
    elif kind == "conv":
      flax_shape = tuple(flax_shape[i] for i in (3, 2, 0, 1))  # HWIO -> OIHW
    assert tuple(flax_shape) == state[hf_name], hf_name
  assert (model.image_size, model.vocab_size, model.max_length) == (224, 50257, 20)
  assert not model.config.has_enc_to_dec_proj
