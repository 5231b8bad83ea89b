"""Checkpoint conversion: HF round trips and every bad checkpoint's error."""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from tests.conftest import MAX_LEN, random_images
from prsl_jax.models import clip as clip_lib
from prsl_jax.models.convert import load_pretrained, save_pretrained


def _copy_config(src, dst, names=("config.json",)):
  os.makedirs(dst, exist_ok=True)
  for n in names:
    shutil.copy(os.path.join(src, n), dst)
  return str(dst)


def _state(path):
  return safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_key_map_covers_every_param_once(tiny_clip):
  kmap = clip_lib.key_map(tiny_clip.model.config)
  hf_names = [hf for hf, _, _ in kmap]
  assert len(hf_names) == len(set(hf_names))
  leaves = {tuple(k.key for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tiny_clip.params)[0]}
  assert {path for _, path, _ in kmap} == leaves


def test_save_load_round_trip_through_transformers(tiny_clip, tmp_path):
  # "Fine-tuned" params: every leaf moved, so a stale or skipped tensor shows.
  # (numpy: eager jax ops would compile once per leaf shape.)
  rng = np.random.default_rng(0)
  tuned = jax.tree.map(
      lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32),
      tiny_clip.params)
  out = str(tmp_path / "export")
  os.makedirs(out)
  with open(os.path.join(out, "notes.txt"), "w") as f:
    f.write("keep me")
  save_pretrained(tiny_clip.model, tuned, out, tokenizer=tiny_clip.tokenizer)
  assert open(os.path.join(out, "notes.txt")).read() == "keep me"  # nothing else touched
  assert not [n for n in os.listdir(out) if n.startswith(".staging")]

  # transformers loads it and computes what we compute with `tuned`.
  hf = transformers.CLIPModel.from_pretrained(out).eval()
  tok = transformers.CLIPTokenizerFast.from_pretrained(out)
  enc = tok(["this is a photo of a seven", "a dog"], padding="max_length",
            max_length=MAX_LEN, return_tensors="np")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  np.testing.assert_array_equal(ids, tiny_clip.tokenizer(
      ["this is a photo of a seven", "a dog"], padding="max_length", max_length=MAX_LEN,
      return_tensors="np")["input_ids"])
  images = random_images(np.random.default_rng(0), 2, tiny_clip.model.image_size)
  pre = json.load(open(os.path.join(out, "preprocessor_config.json")))
  pv = (images - np.float32(pre["image_mean"])) / np.float32(pre["image_std"])
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             pixel_values=torch.from_numpy(pv.transpose(0, 3, 1, 2).copy()))
  ours = jax.jit(tiny_clip.model.module.apply)({"params": tuned}, images, ids, mask)
  np.testing.assert_allclose(ours["logits_per_image"], ref.logits_per_image.numpy(),
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(ours["image_embeds"], ref.image_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(ours["text_embeds"], ref.text_embeds.numpy(), atol=1e-5)

  # load -> save -> load is the identity on params, config and tokenizer.
  again = load_pretrained(out)
  _assert_same_tree(again.params, tuned)
  assert again.model == tiny_clip.model
  assert again.tokenizer.get_vocab() == tiny_clip.tokenizer.get_vocab()
  out2 = str(tmp_path / "export2")
  save_pretrained(again.model, again.params, out2, tokenizer=again.tokenizer)
  _assert_same_tree(load_pretrained(out2).params, tuned)


def test_sharded_safetensors(tiny_ckpt, tiny_clip, tmp_path):
  hf = transformers.CLIPModel.from_pretrained(tiny_ckpt.path)
  hf.save_pretrained(tmp_path, max_shard_size="50KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 1
  _assert_same_tree(load_pretrained(str(tmp_path)).params, tiny_clip.params)


def test_pickle_refused_without_opt_in_and_never_opened(tiny_ckpt, tmp_path, monkeypatch):
  folder = _copy_config(tiny_ckpt.path, tmp_path)
  with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
    f.write(b"not even a pickle")

  def boom(*a, **k):
    raise AssertionError("torch.load must not be called without allow_pickle")
  monkeypatch.setattr(torch, "load", boom)
  with pytest.raises(ValueError, match="allow_pickle=True") as e:
    load_pretrained(folder)
  assert "arbitrary code" in str(e.value) and "pytorch_model.bin" in str(e.value)


def test_pickle_loads_with_opt_in(tiny_ckpt, tiny_clip, tmp_path):
  folder = _copy_config(tiny_ckpt.path, tmp_path)
  torch.save({k: torch.from_numpy(v) for k, v in _state(tiny_ckpt.path).items()},
             os.path.join(folder, "pytorch_model.bin"))
  clip = load_pretrained(folder, allow_pickle=True)
  _assert_same_tree(clip.params, tiny_clip.params)
  assert clip.tokenizer is None  # no tokenizer files copied


def _write_state(folder, state):
  safetensors.numpy.save_file(state, os.path.join(folder, "model.safetensors"),
                              metadata={"format": "pt"})


def test_shape_mismatch_names_parameter_and_shapes(tiny_ckpt, tmp_path):
  folder = _copy_config(tiny_ckpt.path, tmp_path)
  state = _state(tiny_ckpt.path)
  name = "vision_model.embeddings.position_embedding.weight"
  good = state[name].shape
  state[name] = np.zeros((good[0] + 1, good[1]), np.float32)
  _write_state(folder, state)
  with pytest.raises(ValueError) as e:
    load_pretrained(folder)
  msg = str(e.value)
  assert name in msg and str((good[0] + 1, good[1])) in msg and str(good) in msg


def test_missing_and_unexpected_keys_listed(tiny_ckpt, tmp_path):
  folder = _copy_config(tiny_ckpt.path, tmp_path)
  state = _state(tiny_ckpt.path)
  del state["text_projection.weight"]
  state["extra_head.weight"] = np.zeros(3, np.float32)
  state["text_model.embeddings.position_ids"] = np.arange(MAX_LEN)[None]  # ignored
  _write_state(folder, state)
  with pytest.raises(ValueError, match=r"missing \[text_projection.weight\]; "
                                       r"unexpected \[extra_head.weight\]"):
    load_pretrained(folder)


def test_position_ids_buffers_ignored(tiny_ckpt, tiny_clip, tmp_path):
  folder = _copy_config(tiny_ckpt.path, tmp_path)
  state = _state(tiny_ckpt.path)
  state["text_model.embeddings.position_ids"] = np.arange(MAX_LEN)[None]
  state["vision_model.embeddings.position_ids"] = np.arange(17)[None]
  _write_state(folder, state)
  _assert_same_tree(load_pretrained(folder).params, tiny_clip.params)


def test_missing_folder_and_files(tiny_ckpt, tmp_path):
  missing = str(tmp_path / "no" / "such" / "folder")
  with pytest.raises(FileNotFoundError, match=missing):
    load_pretrained(missing)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json in checkpoint folder .*empty"):
    load_pretrained(str(empty))
  no_weights = _copy_config(tiny_ckpt.path, tmp_path / "no_weights")
  with pytest.raises(FileNotFoundError, match="no weights in .*no_weights"):
    load_pretrained(no_weights)
  with pytest.raises(NotADirectoryError, match="config.json"):
    load_pretrained(os.path.join(tiny_ckpt.path, "config.json"))


def test_hub_id_offline_fails_fast_with_local_folder_hint(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
  start = time.monotonic()
  with pytest.raises(OSError) as e:
    load_pretrained("openai/clip-vit-base-patch32")
  assert time.monotonic() - start < 5
  msg = str(e.value)
  assert "openai/clip-vit-base-patch32" in msg and "HF_HUB_OFFLINE" in msg
  assert "local folder" in msg and "load_pretrained('DIR')" in msg


def test_tokenizer_too_big_for_vocab(tiny_ckpt, tmp_path):
  folder = _copy_config(tiny_ckpt.path, tmp_path, ("config.json", "model.safetensors"))
  from prsl_jax.models.tokenizer import build_word_tokenizer  # pylint: disable=g-import-not-at-top
  build_word_tokenizer([" ".join(f"word{i}xyz" for i in range(30))], folder, MAX_LEN)
  with pytest.raises(ValueError, match="vocab_size"):
    load_pretrained(folder)


def test_save_rejects_params_that_do_not_fit(tiny_clip, tmp_path):
  bad = jax.tree.map(lambda x: x, tiny_clip.params)
  bad["visual_projection"]["kernel"] = jnp.zeros((3, 3))
  with pytest.raises(ValueError, match="visual_projection/kernel"):
    save_pretrained(tiny_clip.model, bad, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")  # validated before touching disk


def test_integer_or_nonfinite_weights_refused_with_the_tensor_named(tiny_ckpt, tmp_path):
  from prsl_jax.models.convert import check_weights  # pylint: disable=g-import-not-at-top
  name = "vision_model.embeddings.position_embedding.weight"
  for case in ("int", "nan"):
    folder = _copy_config(tiny_ckpt.path, tmp_path / case)
    state = _state(tiny_ckpt.path)
    if case == "int":  # the header declares an integer type for a float weight
      state[name] = state[name].astype(np.int32)
    else:
      state[name] = state[name].copy()
      state[name][0, 0] = np.inf
      state[name][1, 1] = np.nan
    _write_state(folder, state)
    if case == "int":  # the preflight's header read finds it, no tensor read
      with pytest.raises(ValueError, match=rf"tensor '{name}' is declared I32 in the file's "
                         r"header, but it is a float weight"):
        check_weights(folder)
    else:
      check_weights(folder)  # headers are fine; the values are found at load
    with pytest.raises(ValueError, match=rf"tensor '{name}' "):
      load_pretrained(folder)
  with pytest.raises(ValueError, match=r"has 2 NaN/Inf value\(s\)"):
    load_pretrained(str(tmp_path / "nan"))


def test_pickle_with_code_is_blocked_in_one_line_even_with_opt_in(tiny_ckpt, tmp_path):
  folder = _copy_config(tiny_ckpt.path, tmp_path)
  torch.save({"weight": torch.zeros(2), "hook": os.getcwd},  # a callable: code, not data
             os.path.join(folder, "pytorch_model.bin"))
  with pytest.raises(ValueError, match=r"holds more than tensors and was not loaded: "
                     r"torch.load\(weights_only=True\) blocked it \(Trying to load "
                     r"unsupported GLOBAL posix.getcwd") as e:
    load_pretrained(folder, allow_pickle=True)
  assert "\n" not in str(e.value)


def test_a_full_disk_during_export_is_one_oserror_and_leaves_the_folder(tiny_clip, tmp_path,
                                                                         monkeypatch):
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  out = tmp_path / "export"
  out.mkdir()
  (out / "model.safetensors").write_text("the earlier export")
  def full(*a, **k):
    raise SafetensorError("Error while serializing: I/O error: No space left on device "
                          "(os error 28)")
  monkeypatch.setattr(safetensors.numpy, "save_file", full)
  with pytest.raises(OSError, match=r"cannot write the model into .*No space left on device"):
    save_pretrained(tiny_clip.model, tiny_clip.params, str(out))
  assert os.listdir(out) == ["model.safetensors"]  # no staging folder, nothing replaced
  assert (out / "model.safetensors").read_text() == "the earlier export"
