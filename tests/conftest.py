"""Tiny random HF CLIP checkpoints, written locally (no hub), shared by tests.

`hf_checkpoint(name)` builds a transformers (PyTorch) CLIPModel from one of
TINY_CONFIGS, perturbs every parameter (so LayerNorm scales/biases and zero-init
biases are not trivially 1/0 and a transposed or swapped weight shows), and saves
it with save_pretrained plus a tokenizer from build_word_tokenizer. Built once
per session.
"""

import dataclasses
import json
import os
import signal

import numpy as np
import pytest

from tests import processes

# This session's XLA flags, before JAX starts its backend (subprocesses inherit
# them, or get them from processes.env).
os.environ["XLA_FLAGS"] = processes.xla_flags()

from prsl_jax.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # pylint: disable=g-import-not-at-top,wrong-import-position
from prsl_jax.models.tokenizer import build_word_tokenizer  # pylint: disable=g-import-not-at-top,wrong-import-position

WORDS = ("this is a photo of a zero one two three four five six seven eight nine "
         "cat dog")
MAX_LEN = 16
# Extra embedding rows beyond the tokenizer's ids: lets random test ids exceed
# the EOS id, which tells "argmax(ids)" pooling from "first EOS" pooling apart.
EXTRA_VOCAB = 8

TINY_CONFIGS = {
    # quick_gelu, real EOS id, custom pixel statistics in preprocessor_config.json.
    "quick_gelu": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, image_size=16, patch_size=4,
                    hidden_act="quick_gelu"),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, hidden_act="quick_gelu"),
        projection_dim=16, eos="real",
        mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
    # exact gelu, legacy eos_token_id == 2 (argmax pooling), OpenAI mean/std.
    "gelu_legacy_eos": dict(
        vision=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=2, image_size=24, patch_size=8,
                    hidden_act="gelu"),
        text=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, hidden_act="gelu"),
        projection_dim=24, eos=2, mean=None, std=None),
    # tanh gelu, towers of different widths, image not a multiple of the patch.
    "gelu_new": dict(
        vision=dict(hidden_size=48, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=3, image_size=30, patch_size=7,
                    hidden_act="gelu_new"),
        text=dict(hidden_size=16, intermediate_size=40, num_hidden_layers=3,
                  num_attention_heads=2, hidden_act="gelu_new"),
        projection_dim=8, eos="real",
        mean=(0.45, 0.45, 0.45), std=(0.25, 0.25, 0.25)),
}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  name: str
  path: str
  vocab_size: int  # rows of the token embedding
  tokenizer_size: int  # ids the tokenizer emits: 0..tokenizer_size-1
  eos_token_id: int  # as in config.json (2 for the legacy config)
  mean: tuple
  std: tuple


def make_hf_config(name, tokenizer_size):
  """transformers.CLIPConfig for TINY_CONFIGS[name]."""
  import transformers  # pylint: disable=g-import-not-at-top
  spec = TINY_CONFIGS[name]
  eos = tokenizer_size - 1 if spec["eos"] == "real" else spec["eos"]
  text = dict(spec["text"], vocab_size=tokenizer_size + EXTRA_VOCAB,
              max_position_embeddings=MAX_LEN, eos_token_id=eos,
              bos_token_id=tokenizer_size - 2, pad_token_id=tokenizer_size - 1)
  return transformers.CLIPConfig(text_config=text, vision_config=dict(spec["vision"]),
                                 projection_dim=spec["projection_dim"])


def write_hf_checkpoint(name, path, seed=0):
  """Random tiny PyTorch CLIPModel saved with save_pretrained + tokenizer."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  spec = TINY_CONFIGS[name]
  tokenizer_size = build_word_tokenizer([WORDS], path, MAX_LEN)
  config = make_hf_config(name, tokenizer_size)
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
    model.logit_scale.fill_(2.3)
  model.save_pretrained(path)
  if spec["mean"] is not None:
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
      json.dump({"image_processor_type": "CLIPImageProcessor",
                 "image_mean": list(spec["mean"]), "image_std": list(spec["std"])}, f)
  return Checkpoint(
      name=name, path=path, vocab_size=config.text_config.vocab_size,
      tokenizer_size=tokenizer_size, eos_token_id=config.text_config.eos_token_id,
      mean=tuple(spec["mean"] or OPENAI_CLIP_MEAN), std=tuple(spec["std"] or OPENAI_CLIP_STD))


@pytest.fixture(autouse=True)
def _signal_handlers_stay_pytests():
  """A test that sends SIGINT or SIGTERM sends it to its own child process; none
  installs handlers in the test process (prsl_jax.cli.run and preemption.install
  do, in the CLIs), where a later signal would surface inside another test."""
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  yield
  after = {s: signal.getsignal(s) for s in before}
  for s, handler in before.items():
    if after[s] is not handler:
      signal.signal(s, handler)
  assert after == before, f"the test changed the process's signal handlers: {after}"


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
  """Lazily built {name: Checkpoint}; each checkpoint written once a session."""
  cache = {}

  def get(name):
    if name not in cache:
      path = str(tmp_path_factory.mktemp(f"hf_{name}"))
      cache[name] = write_hf_checkpoint(name, path, seed=len(cache))
    return cache[name]
  return get


@pytest.fixture(scope="session")
def tiny_ckpt(hf_checkpoints):
  """The quick_gelu checkpoint (the one most tests use)."""
  return hf_checkpoints("quick_gelu")


@pytest.fixture(scope="session")
def tiny_clip(tiny_ckpt):
  from prsl_jax.models.convert import load_pretrained  # pylint: disable=g-import-not-at-top
  return load_pretrained(tiny_ckpt.path)


def random_images(rng, n, size):
  """(n, size, size, 3) float32 uniform in [0, 1]."""
  return rng.uniform(0, 1, (n, size, size, 3)).astype(np.float32)


def random_text_batch(rng, ckpt, n=4):
  """(ids, mask) int64 (n, MAX_LEN): BOS, random tokens, EOS, right padding.

  Tokens are drawn from the whole embedding table and each row holds one id
  above the EOS id (so argmax(ids) is not the EOS position). The last row also
  masks out one token before its EOS (a hole in the mask), so the padding mask
  changes the pooled feature, not only padded positions.
  """
  bos, eos = ckpt.tokenizer_size - 2, ckpt.tokenizer_size - 1
  ids = np.full((n, MAX_LEN), eos, np.int64)
  mask = np.zeros((n, MAX_LEN), np.int64)
  for i in range(n):
    length = int(rng.integers(4, MAX_LEN + 1))
    body = rng.integers(0, ckpt.vocab_size, length - 2)
    body[body == eos] = 0
    body[rng.integers(0, len(body))] = eos + 1 + i % EXTRA_VOCAB  # an id above EOS
    ids[i, :length] = [bos, *body, eos]
    mask[i, :length] = 1
  mask[-1, 2] = 0
  return ids, mask


@pytest.fixture(scope="session", autouse=True)
def _private_compilation_cache(tmp_path_factory):
  """The CLIs' persistent compilation cache goes to a temp folder, not ~/.cache."""
  path = str(tmp_path_factory.mktemp("jax_cache"))
  old = os.environ.get("PRSL_JAX_CACHE")
  os.environ["PRSL_JAX_CACHE"] = path
  yield path
  if old is None:
    os.environ.pop("PRSL_JAX_CACHE", None)
  else:
    os.environ["PRSL_JAX_CACHE"] = old


# Parallel runs (pytest-xdist, `-n auto`): a file's tests share compiled functions
# and module fixtures, so each file runs on one worker (one xdist group). A test
# marked `heavy(seconds)` (whole processes: CLIs, 8 simulated devices, kills) is
# a group of its own, or stays in its file's group with `alone=False` (it uses
# the file's costly fixture). Groups go out longest first by their heavy
# seconds (rough figures measured on 2 busy cores), so the longest work starts
# while the short files fill the other workers. An explicit xdist_group mark
# (e.g. a module whose tests share one study) is kept.
def pytest_configure(config):
  config.addinivalue_line(
      "markers", "heavy(seconds, alone=True): takes about `seconds` (whole processes); "
      "a group of its own unless alone=False; scheduled longest first")


def _heavy_seconds(item):
  mark = item.get_closest_marker("heavy")
  return float(mark.args[0]) if mark is not None and mark.args else 0.0


# tryfirst: xdist's own hook reads the xdist_group marks into the test ids, so
# they must be there before it runs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  group_seconds = {}
  for item in items:
    if item.get_closest_marker("xdist_group"):
      group = item.get_closest_marker("xdist_group").args[0]
    elif item.get_closest_marker("heavy") and item.get_closest_marker("heavy").kwargs.get(
        "alone", True):
      group = item.nodeid
    else:
      group = item.module.__name__
    group_seconds[group] = group_seconds.get(group, 0.0) + _heavy_seconds(item)
    if not item.get_closest_marker("xdist_group"):
      item.add_marker(pytest.mark.xdist_group(group))
  def order(item):
    group = item.get_closest_marker("xdist_group").args[0]
    return -group_seconds[group]
  # Stable: groups without heavy seconds keep the files' order, after the heavy.
  items.sort(key=order)
